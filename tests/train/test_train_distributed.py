"""The Ray Train driver's checks and naming, without starting Ray: they must fail before any cluster work."""

from __future__ import annotations

import pytest

from madapt.config import ConfigError, parse_config
from madapt.store import Manifest
from madapt.train.distributed import (
    PUBLISHED,
    check_resources,
    mark_published,
    run_name,
    run_spec,
    storage_path,
    worker_resources,
)
from tests.helpers import tiny_config


def ray_cfg(tiny_model, tmp_path, quantization=None, **trainer):
    document = tiny_config(tiny_model, str(tmp_path / "store"), backend={"type": "ray", "trainer": trainer})
    if quantization:
        document["quantization"] = {"bits": quantization}
    return parse_config(document)


def test_default_worker_share_fits_two_cores(tiny_model, tmp_path):
    config = ray_cfg(tiny_model, tmp_path, num_workers=2)
    assert config.backend.trainer.strategy == "fsdp"
    resources = worker_resources(config)
    assert resources == {"CPU": 0.5}
    check_resources("coding", 2, resources, {"CPU": 2.0})  # two workers leave a CPU for controller and data


def test_impossible_request_names_adapter_and_resource():
    with pytest.raises(ConfigError) as error:
        check_resources("coding", 4, {"CPU": 1, "GPU": 1}, {"CPU": 2.0})
    message = str(error.value)
    assert "'coding' needs 4 CPU (4 workers x 1) but the Ray cluster has 2" in message
    assert "needs 4 GPU (4 workers x 1) but the Ray cluster has 0" in message


def test_local_storage_refused_on_multi_node_cluster(tiny_model, tmp_path):
    config = ray_cfg(tiny_model, tmp_path, storage_path=str(tmp_path / "runs"))
    assert storage_path(config, alive_nodes=1) == str(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"storage_path: .* is local but the Ray cluster has 3 nodes"):
        storage_path(config, alive_nodes=3)
    shared = ray_cfg(tiny_model, tmp_path, storage_path="s3://bucket/runs")
    assert storage_path(shared, alive_nodes=3) == "s3://bucket/runs"


def test_quantised_base_needs_ddp(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"'fsdp' cannot shard 4-bit quantised weights"):
        run_spec(ray_cfg(tiny_model, tmp_path, quantization=4, num_workers=2), "coding", 100)
    spec = run_spec(ray_cfg(tiny_model, tmp_path, quantization=4, strategy="ddp"), "coding", 100)
    assert (spec.quantization_bits, spec.settings.total_steps) == (4, 6)


def test_run_name_is_stable_until_published(tiny_model, tmp_path):
    storage = str(tmp_path / "runs")
    config = ray_cfg(tiny_model, tmp_path)
    first = run_name(config, "coding", storage)
    assert first == run_name(ray_cfg(tiny_model, tmp_path), "coding", storage)  # a rerun resumes the same run
    assert first.startswith("coding-") and first.endswith("-1")
    assert run_name(config, "chat", storage) != first
    other = parse_config(tiny_config(tiny_model, str(tmp_path / "store"), backend={"type": "ray"}, trainer={}))
    assert run_name(other, "coding", storage) != first  # a changed config is a different run
    manifest = Manifest("coding", 1, "m", "f", 8, 16, ["q_proj"], {})
    mark_published(storage, first, manifest)
    assert (tmp_path / "runs" / first / PUBLISHED).exists()
    assert run_name(config, "coding", storage) == first.removesuffix("-1") + "-2"  # a finished run is not reused
