"""AdapterStore: versioned round trips, checksums, atomic publish, id validation."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from madapt.store import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterNotFound,
    AdapterStore,
    BaseModelMismatch,
    CorruptAdapter,
    StoreError,
    parse_ref,
)

CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["v_proj", "q_proj"]}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 2, generator=g),
    }


def publish(store: AdapterStore, name: str = "coding", seed: int = 0, **kwargs):
    return store.publish(
        name, CONFIG, tensors(seed), base_model="tiny", base_fingerprint="fp1", metrics={"final_loss": 1.5}, **kwargs
    )


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
    assert pinned.config == CONFIG
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
        store.publish("../x", CONFIG, tensors(), base_model="t", base_fingerprint="f")
    bad = tensors()
    bad["base_model.model.layers.0.q_proj.lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(CorruptAdapter, match="NaN or infinite"):
        store.publish("coding", CONFIG, bad, base_model="t", base_fingerprint="f")
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


class CrashingHandler:
    """An in-memory object store (fsspec's, via pyarrow) that dies after `budget` file writes."""

    def __init__(self, budget: int):
        import fsspec
        import pyarrow.fs as pafs

        self.memory = fsspec.filesystem("memory", skip_instance_cache=True)
        self.memory.store.clear()
        self.budget = budget
        handler = pafs.FSSpecHandler(self.memory)
        original = handler.open_output_stream

        def open_output_stream(path, metadata):
            if self.budget == 0:
                raise KeyboardInterrupt(f"killed before writing {path}")
            self.budget -= 1
            return original(path, metadata)

        handler.open_output_stream = open_output_stream
        self.fs = pafs.PyFileSystem(handler)


@pytest.mark.parametrize("writes_before_crash", [0, 1, 2])
def test_object_store_publish_killed_at_each_step_is_invisible(writes_before_crash):
    """On object stores the manifest goes last: a publish killed after any file leaves the old version."""
    crashing = CrashingHandler(budget=3)
    store = AdapterStore("/bucket/adapters", filesystem=crashing.fs)
    publish(store)
    assert not store.local
    crashing.budget = writes_before_crash
    with pytest.raises(KeyboardInterrupt):
        publish(store, seed=1)
    assert store.versions("coding") == [1]
    assert store.open("coding").ref == "coding@1"
    crashing.budget = 3
    # a number the crashed publisher wrote files under is never reused
    expected = 2 if writes_before_crash == 0 else 3
    assert publish(store, seed=2).version == expected
    assert store.open("coding").ref == f"coding@{expected}"
