"""Inits that rewrite the base at init (PiSSA, OLoRA) are trained on a residual base and published, through
PEFT's conversion, as an ordinary LoRA on the original base: attached to an untouched base it reproduces the
trained model, and the base stays bit-identical. Inits madapt cannot publish that way are refused by name."""

from __future__ import annotations

import pytest
import torch

import madapt.train
from madapt.config import ConfigError, parse_config
from madapt.lora import attach
from madapt.models import load_base
from madapt.store import AdapterStore
from madapt.train import train_local
from tests.helpers import tiny_config

IDS = torch.tensor([[1, 17, 300, 42, 9, 5]])


def pissa_document(tiny_model: str, store: str, init: str = "pissa", **overrides) -> dict:
    document = tiny_config(tiny_model, store, **overrides)
    coding = {**document["adapters"]["adapters"]["coding"], "r": 4, "alpha": 8, "init_lora_weights": init}
    document["adapters"] = {"adapters": {"coding": coding}}
    document["trainer"]["max_steps"] = 3
    return document


def test_pissa_adapter_is_published_as_plain_lora_on_the_original_base(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MADAPT_HOME", str(tmp_path / "home"))
    trained = {}
    convert = madapt.train.extract_for_original_base

    def spy(model, name, initial):  # the trained PEFT model (on PiSSA's residual base), just before conversion
        model.eval()
        with torch.no_grad():
            trained["logits"] = model(input_ids=IDS).logits
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        trained["residual"] = layer.base_layer.weight.detach().clone()
        return convert(model, name, initial)

    monkeypatch.setattr(madapt.train, "extract_for_original_base", spy)
    config = parse_config(pissa_document(tiny_model, str(tmp_path / "store")))
    store = AdapterStore(config.storage.uri)
    manifest = train_local(config, "coding", store, progress=False)

    base = load_base(tiny_model)
    original = {k: v.clone() for k, v in base.model.state_dict().items()}
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained["residual"], original[q_proj])  # PiSSA did rewrite the training copy's base
    stored = store.open("coding", expected_fingerprint=base.fingerprint)
    assert manifest.r == 8 and stored.config["r"] == 8  # [B | -B0] [A ; A0]: twice the trained rank
    assert stored.config["init_lora_weights"] is True and stored.config["lora_alpha"] == 16
    model = attach(base.model, stored).eval()
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
        with model.disable_adapter():
            plain = model(input_ids=IDS).logits
    torch.testing.assert_close(adapted, trained["logits"], atol=2e-5, rtol=1e-5)
    assert (plain - trained["logits"]).abs().max() > 1e-3, "the adapter changed nothing"
    after = model.unload().state_dict()
    assert after.keys() == original.keys() and all(torch.equal(after[k], original[k]) for k in original)


@pytest.mark.parametrize(
    ("init", "overrides", "message"),
    [
        ("pissa", {"backend": {"type": "ray"}}, "'pissa' trains on backend: local only"),
        ("olora", {"quantization": {"bits": 4}}, "'olora' with quantization is refused"),
        ("loftq", {}, "LoftQ's adapter is only exact on LoftQ's re-quantised copy of the base"),
        ("corda", {}, "calibration pass madapt does not run"),
    ],
)
def test_inits_that_cannot_be_published_exactly_are_refused(tiny_model, init, overrides, message):
    with pytest.raises(ConfigError) as error:
        parse_config(pissa_document(tiny_model, "/tmp/unused-store", init, **overrides))
    where = "adapters.adapters.coding.init_lora_weights:"
    assert any(p.startswith(where) and message in p for p in error.value.problems), error.value.problems
