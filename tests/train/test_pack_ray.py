"""Packed training on Ray Train (issue 25): each adapter of a pack trained as one Ray Train run is published
with the tensors and losses it gets alone, whatever else is in the pack (different ranks and target modules),
under DDP and FSDP2; an adapter whose data cannot be read fails alone, before the run; a SIGKILLed worker
resumes every adapter of the pack from the last checkpoint without repeating a step. Every `fit()` is in
the slow tier (`make test` checks the local pack's equivalence)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from madapt.api import Model, PackFailed
from madapt.config import parse_config
from madapt.store import AdapterStore, Manifest
from madapt.train.distributed import PUBLISHED, train_ray
from madapt.train.local import train_local
from madapt.train.spec import FAIL_AT_STEP_ENV
from tests.helpers import ROOT, tensorboard_scalars
from tests.train.test_pack import JOINED, assert_same_tensors, pack_document

pytestmark = pytest.mark.ray
PACK = ["coding", "chat"]


def ray_pack_document(tiny_model: str, tmp_path: Path, **backend) -> dict:
    """test_pack's two adapters (4 steps, an evaluation every 2) on Ray: a checkpoint every 2 pack steps."""
    document = pack_document(tiny_model, str(tmp_path / "store"), steps_per_checkpoint=2)
    document["backend"] = {
        "type": "ray",
        "trainer": {"checkpoint_every": 2, "storage_path": str(tmp_path / "runs"), "pack_max_rows": JOINED, **backend},
    }
    return document


@pytest.mark.slow  # a fit (~1 min) and two local runs; the local pack's equivalence runs in make test
def test_a_ddp_pack_publishes_each_adapter_as_it_trains_alone(ray_cluster, tiny_model, tmp_path):
    """One DDP worker sees the rows, batches and seeds that train_local sees, so each adapter of the pack
    matches its local run alone; a third adapter whose data cannot be read fails before the run, alone."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\nnot json at all\n')
    document = ray_pack_document(tiny_model, tmp_path, num_workers=1, strategy="ddp")
    adapters = document["adapters"]["adapters"]
    adapters["broken"] = {**adapters["coding"], "dataset": str(broken)}
    model = Model(parse_config(document))
    with pytest.raises(PackFailed) as failed:
        model.train(progress=False, pack=True)
    assert list(failed.value.failures) == ["broken"] and "broken.jsonl" in str(failed.value)
    assert sorted(failed.value.published) == sorted(PACK)

    local = parse_config({**document, "backend": {"type": "local"}})
    alone = AdapterStore(str(tmp_path / "alone"))
    for name in PACK:
        metrics = model.store.manifest(name).metrics
        assert metrics["backend"] == "ray" and metrics["pack"] == PACK
        assert metrics["steps_trained"] == [1, 2, 3, 4] and metrics["resumed_from"] == []
        assert (tmp_path / "runs" / metrics["run"] / PUBLISHED).exists()
        logged = tensorboard_scalars(metrics["run_dir"])  # each adapter its own TensorBoard run
        assert [step for step, _ in logged["train/loss"]] == [1, 2, 3, 4]
        assert [step for step, _ in logged["eval/loss"]] == [2, 4]
        manifest = train_local(local, name, alone, progress=False)
        assert metrics["losses"] == pytest.approx(manifest.metrics["losses"], rel=1e-5)
        assert_same_tensors(alone.open(name).tensors, model.store.open(name).tensors)


@pytest.fixture(scope="module")
def fsdp_pack(ray_cluster, tiny_model, tmp_path_factory) -> tuple[dict, dict[str, Manifest]]:
    """(document, manifests) of the pack trained uninterrupted by FSDP2 on 2 workers."""
    document = ray_pack_document(tiny_model, tmp_path_factory.mktemp("fsdp-pack"), num_workers=2, strategy="fsdp")
    return document, Model(parse_config(document)).train(progress=False, pack=True)


@pytest.mark.slow  # three fits: the pack (shared with the next test), then each adapter alone
def test_an_fsdp_pack_on_two_workers_matches_each_adapter_trained_alone(fsdp_pack, tmp_path):
    """The base sharded once for the whole pack; each adapter as its own FSDP2 run on the same 2 workers."""
    document, packed = fsdp_pack
    alone_config = parse_config({**document, "storage": {"uri": str(tmp_path / "alone")}})
    alone = AdapterStore(alone_config.storage.uri)
    for name in PACK:
        assert packed[name].metrics["pack"] == PACK and packed[name].metrics["strategy"] == "fsdp"
        manifest = train_ray(alone_config, name, alone, progress=False)
        assert packed[name].metrics["losses"] == pytest.approx(manifest.metrics["losses"], rel=1e-5)
        assert_same_tensors(alone.open(name).tensors, Model(parse_config(document)).store.open(name).tensors)


@pytest.mark.slow  # a fit with a restart (~1.5 min)
def test_a_killed_worker_resumes_every_adapter_of_the_pack(tiny_model, tmp_path, monkeypatch, fsdp_pack):
    """Rank 1 of 2 DDP workers is SIGKILLed after pack step 3; the restart continues every adapter from the
    step-2 checkpoint (its weights, optimizer state, batches, losses and tokens): each is published once with
    the losses of the uninterrupted pack (FSDP2's: both average the same 2 shards' gradients)."""
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")
    config = parse_config(ray_pack_document(tiny_model, tmp_path, num_workers=2, strategy="ddp", max_failures=1))
    manifests = Model(config).train(progress=False, pack=True)
    for name in PACK:
        metrics = manifests[name].metrics
        assert metrics["steps_trained"] == [1, 2, 3, 4] and metrics["resumed_from"] == [2]
        assert metrics["losses"] == pytest.approx(fsdp_pack[1][name].metrics["losses"], rel=1e-4)
        assert Model(config).store.versions(name) == [1]


@pytest.mark.slow  # one more fit; QLoRA's single-adapter Ray run is tested in test_train_ray.py
def test_a_qlora_pack_shares_one_4bit_base(ray_cluster, tiny_model, tmp_path):
    """One 4-bit base for the pack; each adapter trains on it as it does alone on its own 4-bit base."""
    document = ray_pack_document(tiny_model, tmp_path, num_workers=1, strategy="ddp")
    document["quantization"] = {"bits": 4}
    manifests = Model(parse_config(document)).train(progress=False, pack=True)
    local = parse_config({**document, "backend": {"type": "local"}})
    for name in PACK:
        metrics = manifests[name].metrics
        assert metrics["pack"] == PACK and metrics["steps_trained"] == [1, 2, 3, 4]
        alone = train_local(local, name, AdapterStore(str(tmp_path / "alone")), progress=False)
        assert metrics["losses"] == pytest.approx(alone.metrics["losses"], rel=1e-4)


@pytest.mark.slow  # one more fit
def test_an_ensembles_members_are_lanes_of_a_ray_pack(ray_cluster, tiny_model, tmp_path):
    """Each member trains on its shard as a lane of the Ray pack, as in a local pack (where each member is
    what it is alone: test_pack.py); the merge of the members is published under the adapter's name."""
    document = ray_pack_document(tiny_model, tmp_path, num_workers=1, strategy="ddp")
    document["adapters"]["adapters"]["coding"]["ensemble"] = {"members": 2}
    manifests = Model(parse_config(document)).train(progress=False, pack=True)
    assert [source["name"] for source in manifests["coding"].lineage["sources"]] == ["coding-m1", "coding-m2"]
    local = Model(parse_config({**document, "backend": {"type": "local"}, "storage": {"uri": str(tmp_path / "l")}}))
    local.train(progress=False, pack=True)
    ray_store = Model(parse_config(document)).store
    for name in ("coding-m1", "coding-m2", "chat", "coding"):
        assert_same_tensors(local.store.open(name).tensors, ray_store.open(name).tensors)


@pytest.mark.parametrize("how", ["--pack", "pack_adapters"])
def test_the_training_job_packs_as_the_cli_does(tiny_model, tmp_path, monkeypatch, capsys, how):
    """`ray job submit -- python jobs/train.py CONFIG --pack` (or the config's pack_adapters) announces the
    pack as `madapt train --pack` does and trains through Model.train(pack=True)."""
    import ray

    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    assert spec is not None and spec.loader is not None
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    document = ray_pack_document(tiny_model, tmp_path, num_workers=1, pack_adapters=how == "pack_adapters")
    path = tmp_path / "pack.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    calls: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda: None)
    monkeypatch.setattr(Model, "train", lambda self, **kwargs: calls.append(kwargs) or {})
    assert job.main([str(path), *(["--pack"] if how == "--pack" else [])]) == 0
    assert calls == [{"adapters": PACK, "parallel": False, "pack": True}]
    assert capsys.readouterr().out == f"training coding, chat as one pack: one Ray Train run on one {tiny_model}\n"
