"""Preference tuning end to end (issue 28): Ludwig's own DPO/KTO/ORPO example configs (tests/config/ludwig_corpus,
copied verbatim from ludwig-ai/ludwig examples/alignment) train locally on the preference data madapt ships,
publish with reward metrics, and DPO lifts held-out preference accuracy above the base's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from madapt.cli import main
from madapt.store import AdapterStore
from madapt.train.objectives import collate_for, objective_for
from madapt.train.settings import PreferenceSettings
from tests.helpers import tensorboard_scalars

CORPUS = Path(__file__).parents[1] / "config" / "ludwig_corpus"
DATA = Path(__file__).parents[2] / "examples" / "data"


def ludwig_config(kind: str, tiny_model: str, tmp_path: Path, **trainer) -> Path:
    """Ludwig's example config for `kind`, on the tiny model, a few steps, its own store."""
    document = yaml.safe_load((CORPUS / f"alignment_{kind}.yaml").read_text())
    document["base_model"] = tiny_model
    document["trainer"].update(gradient_accumulation_steps=1, **trainer)
    document["storage"] = {"uri": str(tmp_path / "store")}
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.slow  # ~10 s each on a busy 2-core machine; the default tier trains the DPO example
@pytest.mark.parametrize("kind", ["kto", "orpo"])
def test_ludwigs_kto_and_orpo_examples_train_and_publish(kind, tiny_model, tmp_path, capsys):
    config = ludwig_config(kind, tiny_model, tmp_path, max_steps=2, learning_rate=1e-2)
    data = DATA / ("preferences_kto.jsonl" if kind == "kto" else "preferences.jsonl")
    assert main(["train", str(config), "--dataset", str(data), "--quiet"]) == 0
    assert "published default@1" in capsys.readouterr().out
    metrics = AdapterStore(str(tmp_path / "store")).manifest("default").metrics
    assert metrics["steps"] == 2 and metrics["preference_pairs"] > 0
    assert 0 <= metrics["preference_accuracy"] <= 1 and 0 <= metrics["base_preference_accuracy"] <= 1
    scalars = tensorboard_scalars(metrics["run_dir"])
    assert "train/rewards/chosen" in scalars and "train/rewards/rejected" in scalars
    assert "eval/loss" in scalars and (kind != "kto" or "train/kl" in scalars)
    if kind == "orpo":
        assert "train/rewards/accuracies" in scalars and "train/nll_loss" in scalars


def test_ludwigs_dpo_example_lifts_held_out_preference_accuracy_above_the_base(tiny_model, tmp_path, capsys):
    """Held-out pairs are prompts the adapter never saw (the carve-out goes by prompt); the base's accuracy is
    measured on the same pairs with the adapter disabled."""
    config = ludwig_config("dpo", tiny_model, tmp_path, max_steps=4, learning_rate=1e-2)
    assert main(["train", str(config), "--dataset", str(DATA / "preferences.jsonl"), "--quiet"]) == 0
    assert "published default@1" in capsys.readouterr().out
    metrics = AdapterStore(str(tmp_path / "store")).manifest("default").metrics
    print("held-out preference accuracy", metrics["base_preference_accuracy"], "->", metrics["preference_accuracy"])
    assert metrics["preference_pairs"] >= 5
    assert metrics["preference_accuracy"] > metrics["base_preference_accuracy"]
    assert metrics["final_loss"] < metrics["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy = ref
    scalars = tensorboard_scalars(metrics["run_dir"])
    for tag in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert len(scalars[f"train/{tag}"]) == 4 and f"eval/{tag}" in scalars
    assert scalars["train/rewards/margins"][-1][1] > 0

    # madapt eval: the quality report gains held-out preference accuracy, the base's and the adapter's
    data = str(DATA / "preferences.jsonl")
    assert main(["eval", str(config), "--dataset", data, "--max-examples", "12"]) == 0
    table = capsys.readouterr().out
    assert "preferences.jsonl pref acc" in table
    report_path = next(line for line in table.splitlines() if line.startswith("report: ")).removeprefix("report: ")
    accuracies = json.loads(Path(report_path).read_text())["accuracies"]
    assert set(accuracies) == {"base", "default@1"}
    (base_accuracy,), (adapter_accuracy,) = accuracies["base"].values(), accuracies["default@1"].values()
    assert 0 <= base_accuracy < adapter_accuracy <= 1


def test_the_preference_objective_is_the_dpo_loss_on_the_collated_pairs(base):
    """The loop's objective on a collated batch: at the start (adapter = base) DPO's loss is log 2 and the
    rewards are 0; the batch holds the chosen rows first."""
    from madapt.config import LoraAdapterConfig
    from madapt.lora import add_trainable_adapter
    from madapt.preference_data import PreferenceExample, tokenize_pair
    from madapt.train.settings import TrainSettings

    settings = TrainSettings(2, 1, 1e-3, 0.0, 1, 64, 0, preference=PreferenceSettings("dpo", 0.1))
    pairs = [PreferenceExample(f"Q{i}?", f"A{i}.", f"um, well, A{i}?") for i in range(2)]
    rows = [tokenize_pair(base.tokenizer, pair, 64) for pair in pairs]
    batch = collate_for(settings)(rows, base.tokenizer.pad_token_id)
    model = add_trainable_adapter(base.model, LoraAdapterConfig(type="lora", r=4), "pref", quantized=False)
    try:
        outcome = objective_for(settings)(model, batch)
        assert outcome.loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
        assert outcome.metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
        assert torch.equal(batch["input_ids"][0, : len(rows[0]["chosen"]["input_ids"])],
                           torch.tensor(rows[0]["chosen"]["input_ids"]))  # fmt: skip
    finally:
        model.unload()
