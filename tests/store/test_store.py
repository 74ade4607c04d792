"""AdapterStore on a local disk: versioned round trips, checksums, atomic publish, id validation, reads
bound to their path, listing past strays, deletion. The same on S3 is in test_store_s3.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from madapt.store import (
    DELETED_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterNotFound,
    AdapterStore,
    BaseModelMismatch,
    CorruptAdapter,
    StoreError,
    parse_ref,
)
from tests.helpers import STORE_CONFIG, publish, tensors

KEY = "base_model.model.layers.0.q_proj.lora_A.weight"


def test_round_trip_and_versions(store):
    first = publish(store)
    second = publish(store, seed=1)
    assert (first.version, second.version) == (1, 2)
    assert store.versions("coding") == [1, 2]
    latest = store.open("coding")
    assert latest.ref == "coding@2"
    assert torch.equal(
        latest.tensors["base_model.model.layers.0.q_proj.lora_A.weight"],
        tensors(1)["base_model.model.layers.0.q_proj.lora_A.weight"],
    )
    pinned = store.open("coding@1", expected_fingerprint="fp1")
    assert pinned.manifest.metrics == {"final_loss": 1.5}
    assert pinned.manifest.r == 2 and pinned.manifest.target_modules == ["q_proj", "v_proj"]
    assert pinned.config == STORE_CONFIG
    assert store.names() == ["coding"]
    assert [m.ref for m in store.list()] == ["coding@1", "coding@2"]


def test_file_uri_goes_through_pyarrow(tmp_path):
    store = AdapterStore(f"file://{tmp_path}/s")
    publish(store)
    assert store.open("coding").manifest.files[WEIGHTS_FILE]["bytes"] > 0


def _weights_path(store: AdapterStore, version: int = 1) -> Path:
    return Path(store.root) / "coding" / str(version) / WEIGHTS_FILE


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corruption_is_detected(store, damage):
    publish(store)
    path = _weights_path(store)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapter, match=r"coding@1/adapter_model.safetensors: checksum mismatch"):
        store.open("coding")


def test_missing_file_is_reported(store):
    publish(store)
    _weights_path(store).unlink()
    with pytest.raises(CorruptAdapter, match="file missing from the store"):
        store.open("coding")


def test_version_without_manifest_is_invisible(store):
    """A publish interrupted before its manifest leaves nothing a reader can see."""
    publish(store)
    partial = Path(store.root) / "coding" / "2"
    partial.mkdir()
    (partial / WEIGHTS_FILE).write_bytes(b"half")
    assert store.versions("coding") == [1]
    assert store.open("coding").ref == "coding@1"
    assert publish(store).version == 3  # never reuses a number a crashed publisher may hold


def test_failed_publish_writes_nothing(store, monkeypatch):
    publish(store)
    real_rename = os.rename

    def crash(src, dst):
        raise KeyboardInterrupt("killed mid-publish")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        publish(store, seed=5)
    monkeypatch.setattr(os, "rename", real_rename)
    assert store.versions("coding") == [1]
    assert sorted(p.name for p in (Path(store.root) / "coding").iterdir()) == ["1"]


def test_concurrent_publishes_get_distinct_versions(store):
    results, errors = [], []

    def worker(seed):
        try:
            results.append(publish(store, seed=seed).version)
        except Exception as error:  # pragma: no cover - surfaced by the assert below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == list(range(1, 9))
    for version in results:
        store.open(f"coding@{version}")


@pytest.mark.parametrize("ref", ["../etc", "a/b", "", "x" * 65, "..", "coding@-1", "coding@x", "cöding", "a\x00b"])
def test_invalid_ids_are_refused(store, ref):
    with pytest.raises(StoreError):
        store.open(ref)


def test_publish_refuses_bad_names_and_nan(store):
    with pytest.raises(ValueError, match="invalid adapter name"):
        store.publish("../x", STORE_CONFIG, tensors(), base_model="t", base_fingerprint="f")
    bad = tensors()
    bad["base_model.model.layers.0.q_proj.lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(CorruptAdapter, match="NaN or infinite"):
        store.publish("coding", STORE_CONFIG, bad, base_model="t", base_fingerprint="f")
    assert store.versions("coding") == []


def test_unknown_adapter_and_version(store):
    with pytest.raises(AdapterNotFound, match="'nope' is not in the store"):
        store.open("nope")
    publish(store)
    with pytest.raises(AdapterNotFound, match=r"no version 7; published: \[1\]"):
        store.open("coding@7")


def test_other_base_model_is_refused(store):
    publish(store)
    with pytest.raises(BaseModelMismatch, match="trained on base model 'tiny'"):
        store.open("coding", expected_fingerprint="other")


def test_manifest_lists_checksums(store):
    manifest = publish(store, lineage={"sources": []})
    on_disk = json.loads((Path(store.root) / "coding" / "1" / MANIFEST_FILE).read_text())
    assert on_disk["files"] == manifest.files
    assert set(on_disk["files"]) == {"adapter_config.json", WEIGHTS_FILE}
    assert on_disk["lineage"] == {"sources": []}


def test_parse_ref():
    assert parse_ref("coding") == ("coding", None)
    assert parse_ref("coding@latest") == ("coding", None)
    assert parse_ref("coding@3") == ("coding", 3)


def test_a_filesystem_without_create_if_absent_is_read_only(tmp_path):
    """Any other pyarrow filesystem (here fsspec's in-memory one) can be read but not written: without an
    atomic create-if-absent there is no safe way to claim a version number."""
    import fsspec
    import pyarrow.fs as pafs

    publish(AdapterStore(str(tmp_path / "s")))
    memory = fsspec.filesystem("memory", skip_instance_cache=True)
    memory.put(str(tmp_path / "s") + "/", "/bucket/adapters", recursive=True)
    store = AdapterStore("/bucket/adapters", filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(memory)))
    assert store.open("coding").ref == "coding@1"
    with pytest.raises(StoreError, match="cannot write to a 'py::fsspec\\+memory' filesystem"):
        publish(store)
    with pytest.raises(StoreError, match="cannot write"):
        store.delete("coding@1")
    memory.rm("/bucket", recursive=True)


def _version_dir(store: AdapterStore, name: str, version: int) -> Path:
    return Path(store.root) / name / str(version)


def test_reads_are_bound_to_their_path(store, caplog):
    """Files are read from the requested name/version only; a manifest naming another one is corrupt."""
    publish(store)
    publish(store, seed=1)
    shutil.copytree(_version_dir(store, "coding", 1), _version_dir(store, "copycat", 1))
    shutil.copy(_version_dir(store, "coding", 2) / MANIFEST_FILE, _version_dir(store, "coding", 1) / MANIFEST_FILE)
    with pytest.raises(CorruptAdapter, match="manifest names coding@2 but was read from coding@1"):
        store.open("coding@1")
    with pytest.raises(CorruptAdapter, match="manifest names coding@1 but was read from copycat@1"):
        store.manifest("copycat")
    with caplog.at_level(logging.WARNING, logger="madapt.store"):
        assert [m.ref for m in store.list()] == ["coding@2"]
    assert "skipping coding@1" in caplog.text and "skipping copycat@1" in caplog.text


@pytest.mark.parametrize(
    "edit",
    [{"version": "1"}, {"name": 7}, {"files": ["adapter_config.json"]}, {"files": {WEIGHTS_FILE: {"sha256": 1}}}],
    ids=["version-str", "name-int", "files-list", "sha-int"],
)
def test_manifest_fields_of_the_wrong_type_are_corrupt(store, edit):
    publish(store)
    path = _version_dir(store, "coding", 1) / MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(CorruptAdapter, match=r"coding@1: manifest\.json has fields of the wrong type"):
        store.open("coding")
    assert store.list() == []


def test_listing_skips_what_is_not_an_adapter(store, caplog):
    publish(store)
    root = Path(store.root)
    for directory in ("lost+found", ".trash/1", "bad name/1", "coding/notes", "coding/01", "coding/2"):
        (root / directory).mkdir(parents=True)
    (root / "README.md").write_text("hello")
    (root / "bad name" / "1" / MANIFEST_FILE).write_text("{}")
    (root / "coding" / "01" / MANIFEST_FILE).write_text("{}")
    (root / "coding" / "2" / MANIFEST_FILE).write_bytes(b"\xff{not json")
    assert store.names() == ["coding"]
    with caplog.at_level(logging.WARNING, logger="madapt.store"):
        assert [m.ref for m in store.list()] == ["coding@1"]
    assert "skipping coding@2: coding@2: unreadable manifest.json" in caplog.text
    with pytest.raises(CorruptAdapter, match=r"unreadable manifest\.json"):
        store.open("coding")  # the newest is corrupt: say so rather than quietly serve an older one
    assert publish(store).version == 3


def test_delete_leaves_a_tombstone_and_the_number_is_never_reused(store):
    publish(store)
    second = publish(store, seed=1)
    assert store.delete("coding@2") == second
    assert sorted(p.name for p in _version_dir(store, "coding", 2).iterdir()) == [DELETED_FILE]
    tombstone = json.loads((_version_dir(store, "coding", 2) / DELETED_FILE).read_text())
    assert tombstone["ref"] == "coding@2" and tombstone["manifest"]["files"] == second.files
    assert store.versions("coding") == [1] and store.open("coding").ref == "coding@1"
    with pytest.raises(AdapterNotFound, match=r"coding@2 was deleted; published: \[1\]"):
        store.open("coding@2")
    with pytest.raises(AdapterNotFound, match="coding@2 was deleted"):
        store.delete("coding@2")
    assert publish(store, seed=2).version == 3  # 2 was the highest number, and still is not reused
    assert torch.equal(store.open("coding").tensors[KEY], tensors(2)[KEY])


def test_delete_every_version(store):
    publish(store)
    publish(store)
    with pytest.raises(StoreError, match="delete needs an explicit version"):
        store.delete("coding")
    store.delete("coding@1")
    store.delete("coding@2")
    with pytest.raises(AdapterNotFound, match=r"'coding' has no published version; deleted: \[1, 2\]"):
        store.open("coding")
    assert store.names() == [] and store.list() == []
    with pytest.raises(AdapterNotFound, match="'nope' is not in the store"):
        store.delete("nope@1")
    assert publish(store).version == 3


def test_a_corrupt_version_can_be_deleted(store):
    publish(store)
    (_version_dir(store, "coding", 1) / MANIFEST_FILE).write_text("{")
    assert store.delete("coding@1") is None
    assert json.loads((_version_dir(store, "coding", 1) / DELETED_FILE).read_text())["manifest"] is None


def test_a_read_racing_a_delete_says_deleted(store, monkeypatch):
    publish(store)
    read_manifest = store._read_manifest

    def then_deleted(name, version):
        manifest = read_manifest(name, version)
        AdapterStore(store.uri).delete(f"{name}@{version}")  # between the manifest and the payload
        return manifest

    monkeypatch.setattr(store, "_read_manifest", then_deleted)
    with pytest.raises(AdapterNotFound, match="coding@1 was deleted while it was being read"):
        store.open("coding@1")


def test_cli_delete_takes_a_version_and_a_second_delete_is_an_error(store, capsys):
    from madapt.cli import main

    publish(store), publish(store, seed=1)
    assert main(["adapters", "delete", "coding", "--store", store.uri]) == 2  # no version: refused
    assert main(["adapters", "delete", "coding@2", "--store", store.uri]) == 0
    assert "deleted coding@2" in capsys.readouterr().out
    assert store.versions("coding") == [1]
    assert main(["adapters", "delete", "coding@2", "--store", store.uri]) == 2
    assert "deleted" in capsys.readouterr().err
    assert publish(store, seed=2).version == 3
