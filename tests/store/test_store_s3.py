"""AdapterStore on a real S3 server (moto's): version claims by conditional PUT, concurrent publisher
processes, publishes killed at every step, reads bound to their path, listing past strays, deletion."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import uuid

import boto3
import pyarrow.fs as pafs
import pytest
import torch
from botocore.exceptions import ClientError

from madapt.store import (
    CLAIM_FILE,
    CONFIG_FILE,
    DELETED_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterNotFound,
    AdapterStore,
    CorruptAdapter,
    _s3_client_options,
    filesystem_for,
    portable_filesystem,
)
from tests.helpers import ROOT, publish, tensors
from tests.s3server import BUCKET, s3_environment

KEY = "base_model.model.layers.0.q_proj.lora_A.weight"
# Child processes are forked from one server process that imported torch once (spawn would import it in
# every child) and, through this module, built a boto3 client once: botocore's S3 model then sits in
# boto3's default session, which the children inherit instead of each parsing it again.
PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(["madapt.store", "tests.store.test_store_s3"])
boto3.client("s3", region_name="us-east-1")


@pytest.fixture(scope="module")
def s3_env():
    """moto's S3 server for this module, with boto3 and pyarrow pointed at it through the environment."""
    with s3_environment() as env:
        yield env


@pytest.fixture
def s3(s3_env):
    return boto3.client("s3")


@pytest.fixture
def s3_uri(s3_env) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/store"


def keys(s3, uri: str, under: str) -> set[str]:
    prefix = f"{uri.removeprefix(f's3://{BUCKET}/')}/{under}/"
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {item["Key"].removeprefix(prefix) for item in listed}


def put(s3, uri: str, key: str, body: bytes) -> None:
    s3.put_object(Bucket=BUCKET, Key=f"{uri.removeprefix(f's3://{BUCKET}/')}/{key}", Body=body)


def same_tensors(adapter, seed: int) -> bool:
    return torch.equal(adapter.tensors[KEY], tensors(seed)[KEY])


def test_moto_refuses_a_second_conditional_put(s3):
    """The fake must do what the store relies on: If-None-Match: * on an existing key is a 412."""
    s3.put_object(Bucket=BUCKET, Key="precondition/once", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as raised:
        s3.put_object(Bucket=BUCKET, Key="precondition/once", Body=b"2", IfNoneMatch="*")
    assert raised.value.response["Error"]["Code"] == "PreconditionFailed"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=BUCKET, Key="precondition/once")["Body"].read() == b"1"


def test_pyarrow_and_boto3_find_the_endpoint(s3_env, s3, monkeypatch):
    """pyarrow (26) honours AWS_ENDPOINT_URL like boto3; without it, the URI's endpoint_override reaches both
    (pyarrow reads, boto3 writes); a configured S3FileSystem can be handed in as well."""
    s3.put_object(Bucket=BUCKET, Key="endpoint/probe", Body=b"via boto3")
    fs, root = filesystem_for(f"s3://{BUCKET}/endpoint")
    assert (fs.type_name, root) == ("s3", f"{BUCKET}/endpoint")
    with fs.open_input_stream(f"{root}/probe") as stream:
        assert stream.read() == b"via boto3"

    endpoint = s3_env["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    host = endpoint.removeprefix("http://")
    store = AdapterStore(f"s3://{BUCKET}/endpoint/query?endpoint_override={host}&scheme=http")
    assert publish(store).ref == "coding@1"
    assert same_tensors(store.open("coding"), 0)

    configured = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # for boto3's writes
    store = AdapterStore(f"{BUCKET}/endpoint/configured", filesystem=configured)
    assert publish(store).ref == "coding@1" and store.versions("coding") == [1]


def test_round_trip(s3_uri, s3):
    store = AdapterStore(s3_uri)
    assert not store.local and store.names() == []
    first, second = publish(store), publish(store, seed=1)
    assert (first.version, second.version) == (1, 2)
    assert store.names() == ["coding"] and store.versions("coding") == [1, 2]
    assert [m.ref for m in store.list()] == ["coding@1", "coding@2"]
    assert same_tensors(store.open("coding"), 1) and same_tensors(store.open("coding@1", expected_fingerprint="fp1"), 0)
    assert store.manifest("coding@1").files == first.files
    assert keys(s3, s3_uri, "coding/1") == {CLAIM_FILE, CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE}
    copy = pickle.loads(pickle.dumps(store))  # e.g. sent to a Ray task: the boto3 client is left behind
    assert publish(copy, seed=2).version == 3 and same_tensors(store.open("coding"), 2)


def test_boto3_gets_the_uri_options_pyarrow_reads():
    fs = pafs.S3FileSystem(anonymous=True, region="eu-west-1")
    uri = "s3://AK%2F1:S%40K@bucket/p?region=eu-central-1&endpoint_override=minio:9000&scheme=http"
    assert _s3_client_options(uri, fs) == {
        "region_name": "eu-central-1",
        "endpoint_url": "http://minio:9000",
        "aws_access_key_id": "AK/1",
        "aws_secret_access_key": "S@K",
    }
    assert _s3_client_options("s3://bucket/p", fs) == {"region_name": "eu-west-1"}


def _publish_in_child(env: dict[str, str], uri: str, seed: int, barrier, results) -> None:
    os.environ.update(env)
    store = AdapterStore(uri)
    store.versions("coding")  # connect pyarrow and boto3 before the race, so the publishes overlap
    assert store._objects is not None and store._objects.client
    barrier.wait(timeout=60)
    results.put((seed, publish(store, seed=seed).version))


def test_concurrent_publisher_processes_get_distinct_versions(s3_env, s3_uri):
    """8 processes publish one adapter at once: 8 numbers, each opening with its own publisher's tensors."""
    barrier, results = PROCESSES.Barrier(8), PROCESSES.SimpleQueue()
    children = [
        PROCESSES.Process(target=_publish_in_child, args=(s3_env, s3_uri, seed, barrier, results)) for seed in range(8)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0] * 8
    versions = dict(results.get() for _ in range(8))
    assert sorted(versions.values()) == list(range(1, 9))
    store = AdapterStore(s3_uri)
    assert store.versions("coding") == list(range(1, 9))
    for seed, version in versions.items():
        assert same_tensors(store.open(f"coding@{version}"), seed)


STEPS = {1: "after the claim", 2: "after the config", 3: "after the weights, before the manifest"}


def _fail_at(store: AdapterStore, step: int, fail) -> None:
    """Make the publish's `step`-th conditional write (claim, config, weights, manifest) call `fail` first."""
    create, calls = store._objects.create, []

    def failing(path: str, data: bytes) -> bool:
        calls.append(path)
        if len(calls) == step + 1:
            fail()
        return create(path, data)

    store._objects.create = failing


def _publish_and_die(env: dict[str, str], uri: str, step: int) -> None:
    os.environ.update(env)
    store = AdapterStore(uri)
    _fail_at(store, step, lambda: os._exit(9))  # SIGKILL-like: no finally, no cleanup
    publish(store, seed=5)


@pytest.mark.parametrize("mode", ["raises", "killed"])
@pytest.mark.parametrize("step", STEPS, ids=STEPS.values())
def test_interrupted_publish_is_invisible_and_its_number_is_not_reused(s3_env, s3_uri, s3, step, mode):
    store = AdapterStore(s3_uri)
    publish(store)
    if mode == "killed":
        child = PROCESSES.Process(target=_publish_and_die, args=(s3_env, s3_uri, step))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 9
    else:
        broken = AdapterStore(s3_uri)

        def fail():
            raise ConnectionError("network down")

        _fail_at(broken, step, fail)
        with pytest.raises(ConnectionError):
            publish(broken, seed=5)
    written = [CLAIM_FILE, CONFIG_FILE, WEIGHTS_FILE][:step]
    assert keys(s3, s3_uri, "coding/2") == set(written)
    assert store.versions("coding") == [1] and store.names() == ["coding"]
    assert store.open("coding").ref == "coding@1" and [m.ref for m in store.list()] == ["coding@1"]
    with pytest.raises(AdapterNotFound, match=r"no version 2; published: \[1\]"):
        store.open("coding@2")
    assert publish(store, seed=2).version == 3
    assert same_tensors(store.open("coding"), 2)


def test_a_lost_claim_takes_the_next_number_and_writes_nothing_there(s3_uri, s3):
    store = AdapterStore(s3_uri)
    publish(store)
    create = store._objects.create
    rival = b'{"token": "rival"}'

    def rival_first(path: str, data: bytes) -> bool:
        if path.endswith(f"/coding/2/{CLAIM_FILE}"):
            put(s3, s3_uri, f"coding/2/{CLAIM_FILE}", rival)  # another publisher claims 2 a moment earlier
        return create(path, data)

    store._objects.create = rival_first
    assert publish(store, seed=1).version == 3
    assert keys(s3, s3_uri, "coding/2") == {CLAIM_FILE}
    assert (
        s3.get_object(Bucket=BUCKET, Key=f"{s3_uri[len(f's3://{BUCKET}/') :]}/coding/2/{CLAIM_FILE}")["Body"].read()
        == rival
    )
    assert store.versions("coding") == [1, 3] and same_tensors(store.open("coding"), 1)


def test_reads_are_bound_to_their_path(s3_uri, s3, caplog):
    store = AdapterStore(s3_uri)
    publish(store)
    publish(store, seed=1)
    prefix = s3_uri.removeprefix(f"s3://{BUCKET}/")
    for file_name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        source = {"Bucket": BUCKET, "Key": f"{prefix}/coding/1/{file_name}"}
        s3.copy_object(CopySource=source, Bucket=BUCKET, Key=f"{prefix}/copycat/1/{file_name}")
    s3.copy_object(
        CopySource={"Bucket": BUCKET, "Key": f"{prefix}/coding/2/{MANIFEST_FILE}"},
        Bucket=BUCKET,
        Key=f"{prefix}/coding/1/{MANIFEST_FILE}",
    )
    with pytest.raises(CorruptAdapter, match="manifest names coding@2 but was read from coding@1"):
        store.open("coding@1")
    with pytest.raises(CorruptAdapter, match="manifest names coding@1 but was read from copycat@1"):
        store.manifest("copycat")
    with caplog.at_level(logging.WARNING, logger="madapt.store"):
        assert [m.ref for m in store.list()] == ["coding@2"]
    assert "skipping coding@1" in caplog.text and "skipping copycat@1" in caplog.text


def test_listing_skips_what_is_not_an_adapter(s3_uri, s3, caplog):
    store = AdapterStore(s3_uri)
    publish(store)
    for key, body in [
        ("lost+found/x", b""),
        ("README.md", b"hello"),
        (".trash/1/manifest.json", b"{}"),
        ("coding/notes/x", b""),
        ("coding/01/manifest.json", b"{}"),
        ("coding/2/manifest.json", b"{not json"),
    ]:
        put(s3, s3_uri, key, body)
    assert store.names() == ["coding"]
    with caplog.at_level(logging.WARNING, logger="madapt.store"):
        assert [m.ref for m in store.list()] == ["coding@1"]
    assert "skipping coding@2: coding@2: unreadable manifest.json" in caplog.text
    with pytest.raises(CorruptAdapter, match=r"unreadable manifest\.json"):
        store.open("coding")  # the newest is corrupt: say so rather than quietly serve an older one
    assert publish(store).version == 3


def test_delete_leaves_a_tombstone_and_the_number_is_never_reused(s3_uri, s3):
    store = AdapterStore(s3_uri)
    publish(store)
    second = publish(store, seed=1)
    assert store.delete("coding@2") == second
    assert keys(s3, s3_uri, "coding/2") == {CLAIM_FILE, DELETED_FILE}
    tombstone = json.loads(
        s3.get_object(Bucket=BUCKET, Key=f"{s3_uri[len(f's3://{BUCKET}/') :]}/coding/2/deleted.json")["Body"].read()
    )
    assert tombstone["manifest"]["files"] == second.files
    assert store.versions("coding") == [1] and store.open("coding").ref == "coding@1"
    with pytest.raises(AdapterNotFound, match=r"coding@2 was deleted; published: \[1\]"):
        store.open("coding@2")
    with pytest.raises(AdapterNotFound, match="coding@2 was deleted"):
        store.delete("coding@2")
    assert publish(store, seed=2).version == 3
    assert same_tensors(store.open("coding"), 2)


def test_records_are_read_modify_written_with_if_match(s3_uri, s3):
    """Aliases and splits (madapt.store.releases) on S3: concurrent writers lose nothing, a stale ETag or an
    existing record refuses a write, and a write whose answer was lost is not applied twice."""
    import threading

    from madapt.store import ALIASES_FILE, SPLIT_FILE, releases
    from madapt.store.releases import Resolver

    store = AdapterStore(s3_uri)
    publish(store)
    publish(store, seed=1)
    threads = [threading.Thread(target=releases.tag, args=(store, "coding@1", f"t{i}")) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(store.read_record("coding", ALIASES_FILE)["aliases"]) == {f"t{i}" for i in range(4)}

    releases.promote(store, "coding@1")
    releases.set_split(store, "coding", {"coding@1": 50, "coding@2": 50})
    cached = Resolver(store, ttl_s=60)
    assert {cached.resolve("coding", f"u{i}").ref for i in range(20)} == {"coding@1", "coding@2"}
    assert cached.reads["state"] == 1
    releases.clear_split(store, "coding")
    assert Resolver(store, ttl_s=0).resolve("coding").ref == "coding@1" and releases.rollback(store, "coding") is None
    assert Resolver(store, ttl_s=0).resolve("coding").ref == "coding@2"

    objects = store._writable()
    path = store._record_path("coding", SPLIT_FILE)
    data, etag = objects.read_for_update(path)
    assert objects.replace(path, b"{}", '"0123456789abcdef0123456789abcdef"') is False  # stale ETag: 412
    assert objects.replace(path, b"{}", None) is False  # If-None-Match: * on an existing record
    assert objects.read_for_update(path) == (data, etag)

    real_replace = objects.replace
    calls = []

    def answer_lost(path, data, tag):
        calls.append(tag)
        landed = real_replace(path, data, tag)
        return landed and len(calls) > 1  # the first PUT lands, its answer is lost: the store sees a 412

    objects.replace = answer_lost
    try:
        record = store.update_record("coding", SPLIT_FILE, lambda r: {"n": (r or {}).get("n", 0) + 1})
    finally:
        del objects.replace
    assert record["n"] == 1 and len(calls) == 1  # recognised by its token on the re-read, not applied again
    assert store.read_record("coding", SPLIT_FILE)["n"] == 1


def test_datasets_are_read_from_s3_as_from_a_local_path(s3, s3_env, tmp_path):
    """Training data on the bucket: the same examples as the local file, CSV and JSONL; a missing key is a
    DataError naming it."""
    from madapt.data import DataError, load_examples

    local = ROOT / "examples" / "data" / "coding.jsonl"
    prefix = uuid.uuid4().hex[:12]
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/coding.jsonl", Body=local.read_bytes())
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/tiny.csv", Body=b"prompt,response\nzip?,02134\nhi,hello\n")
    columns = {"input_column": "prompt", "output_column": "response", "template": None}
    remote = load_examples(f"s3://{BUCKET}/{prefix}/coding.jsonl", **columns)
    assert remote == load_examples(str(local), **columns) and len(remote) > 10
    tiny = load_examples(f"s3://{BUCKET}/{prefix}/tiny.csv", **columns)
    assert [(e.prompt, e.response) for e in tiny] == [("zip?", "02134"), ("hi", "hello")]  # CSV cells stay text
    with pytest.raises(DataError, match=f"s3://{BUCKET}/{prefix}/missing.jsonl: dataset file not found"):
        load_examples(f"s3://{BUCKET}/{prefix}/missing.jsonl", **columns)


WRITE_IN_CHILD = """
import os, pickle, sys
fs, path = pickle.loads(sys.stdin.buffer.read())
try:
    fs.create_dir(path)  # what Ray Train's controller does first on storage_path
    with fs.open_output_stream(f"{path}/probe") as stream:
        stream.write(b"written without the environment")
except OSError as error:
    print(f"refused: {error}", file=sys.stderr, flush=True)
    os._exit(1)
os._exit(0)  # without pyarrow's S3 finalisation at exit, which can crash a short-lived process
"""


def test_a_portable_filesystem_reaches_the_server_without_the_environment(s3_env, s3_uri, s3):
    """What Ray Train's controller and workers and Ray Data's read tasks get: a pickle, in a process whose
    environment has no endpoint and no keys. The portable filesystem carries both; a plain one only the
    endpoint, and its anonymous write is refused (what Ray Train's controller hit)."""
    portable, root = portable_filesystem(s3_uri)
    bare = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    for fs, name in ((portable, "portable"), (filesystem_for(s3_uri)[0], "plain")):
        child = subprocess.run(
            [sys.executable, "-c", WRITE_IN_CHILD],
            input=pickle.dumps((fs, f"{root}/{name}")),
            env=bare,
            capture_output=True,
            timeout=120,
        )
        if name == "portable":
            assert child.returncode == 0, child.stderr.decode()[-2000:]
        else:
            assert child.returncode == 1 and b"ACCESS_DENIED" in child.stderr, child.stderr.decode()[-2000:]
    prefix = root.removeprefix(f"{BUCKET}/")
    assert (
        s3.get_object(Bucket=BUCKET, Key=f"{prefix}/portable/probe")["Body"].read()
        == b"written without the environment"
    )
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/plain")
