"""Preference tuning through Ray Train (issue 28): Ludwig's DPO example config on two workers under each
strategy, the reference pass (adapters disabled) running through the FSDP2-sharded model, DDP's wrapper and
DeepSpeed's engine; publishes with reward metrics and the held-out preference accuracies. One Ray fit per
strategy, in the slow tier."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from madapt.config import parse_config
from madapt.store import AdapterStore
from madapt.train.distributed import train_ray
from tests.helpers import ROOT, tensorboard_scalars

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "deepspeed"])
def test_ludwigs_dpo_example_trains_on_two_workers(strategy, ray_cluster, tiny_model, tmp_path):
    document = yaml.safe_load((Path(__file__).parents[1] / "config/ludwig_corpus/alignment_dpo.yaml").read_text())
    document["base_model"] = tiny_model
    document["trainer"].update(max_steps=4, learning_rate=1e-2, gradient_accumulation_steps=1)
    document["storage"] = {"uri": str(tmp_path / "store")}
    document["backend"] = {
        "type": "ray",
        "trainer": {"num_workers": 2, "strategy": strategy, "storage_path": str(tmp_path / "runs")},
    }
    config = parse_config(document)
    store = AdapterStore(config.storage.uri)
    manifest = train_ray(config, "default", store, dataset=str(ROOT / "examples/data/preferences.jsonl"))
    metrics = manifest.metrics
    assert metrics["strategy"] == strategy and metrics["steps"] == 4
    assert metrics["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as the reference
    assert metrics["preference_pairs"] > 0 and "base_preference_accuracy" in metrics
    accuracies = metrics["base_preference_accuracy"], metrics["preference_accuracy"]
    print(f"ray {strategy}: held-out preference accuracy of the base, then the adapter", *accuracies)
    scalars = tensorboard_scalars(metrics["run_dir"])
    for tag in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert len(scalars[f"train/{tag}"]) == 4
