"""Inits that rewrite the base at init (PiSSA, OLoRA, CorDA) are trained on a residual base and published, through
PEFT's conversion, as an ordinary LoRA on the original base: attached to an untouched base it reproduces the
trained model, and the base stays bit-identical. EVA's data pass runs on CPU. Inits madapt cannot publish
exactly are refused by name."""

from __future__ import annotations

import pytest
import torch

import madapt.train.local
from madapt.config import ConfigError, parse_config
from madapt.lora import attach
from madapt.models import load_base
from madapt.store import AdapterStore
from madapt.train.local import train_local
from tests.helpers import tiny_config

IDS = torch.tensor([[1, 17, 300, 42, 9, 5]])


def pissa_document(tiny_model: str, store: str, init: str = "pissa", **overrides) -> dict:
    document = tiny_config(tiny_model, store, **overrides)
    coding = {**document["adapters"]["adapters"]["coding"], "r": 4, "alpha": 8, "init_lora_weights": init}
    document["adapters"] = {"adapters": {"coding": coding}}
    document["trainer"]["max_steps"] = 3
    return document


@pytest.mark.parametrize(
    "init", ["pissa", pytest.param("olora", marks=pytest.mark.slow), pytest.param("corda", marks=pytest.mark.slow)]
)
def test_base_rewriting_init_is_published_as_plain_lora_on_the_original_base(tiny_model, tmp_path, monkeypatch, init):
    monkeypatch.setenv("MADAPT_HOME", str(tmp_path / "home"))
    trained = {}
    convert = madapt.train.local.extract_for_original_base

    def spy(model, name, initial):  # the trained PEFT model (on the init's residual base), just before conversion
        model.eval()
        with torch.no_grad():
            trained["logits"] = model(input_ids=IDS).logits
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        trained["residual"] = layer.base_layer.weight.detach().clone()
        return convert(model, name, initial)

    monkeypatch.setattr(madapt.train.local, "extract_for_original_base", spy)
    config = parse_config(pissa_document(tiny_model, str(tmp_path / "store"), init))
    store = AdapterStore(config.storage.uri)
    manifest = train_local(config, "coding", store, progress=False)

    base = load_base(tiny_model)
    original = {k: v.clone() for k, v in base.model.state_dict().items()}
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained["residual"], original[q_proj])  # the init did rewrite the training copy's base
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


def test_eva_initialises_from_a_data_pass_and_publishes_as_is(tiny_model, tmp_path, monkeypatch):
    """EVA runs on CPU: each A starts as the top right-singular vectors of its layer's inputs (orthonormal
    rows, unlike the default random init); one step at a tiny rate keeps them so."""
    monkeypatch.setenv("MADAPT_HOME", str(tmp_path / "home"))
    document = pissa_document(tiny_model, str(tmp_path / "store"), "eva")
    document["adapters"]["adapters"]["coding"]["eva_config"] = {"rho": 1.0}
    document["trainer"].update(max_steps=1, learning_rate=1e-7)
    config = parse_config(document)
    store = AdapterStore(config.storage.uri)
    train_local(config, "coding", store, progress=False)
    base = load_base(tiny_model)
    stored = store.open("coding", expected_fingerprint=base.fingerprint)
    assert stored.config["init_lora_weights"] == "eva" and stored.config["eva_config"]["rho"] == 1.0
    factors = [t for k, t in stored.tensors.items() if k.endswith("lora_A.weight")]
    assert factors and all(a.shape[0] == 4 for a in factors)
    for a in factors:
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("init", "overrides", "message"),
    [
        ("pissa", {"backend": {"type": "ray"}}, "'pissa' trains on backend: local only"),
        ("olora", {"quantization": {"bits": 4}}, "'olora' with quantization is refused"),
        ("loftq", {}, "LoftQ's adapter is only exact on LoftQ's re-quantised copy of the base"),
        ("corda", {"backend": {"type": "ray"}}, "'corda' trains on backend: local only"),
        ("eva", {"backend": {"type": "ray"}}, "EVA's data pass, needs the whole adapter in one process"),
    ],
)
def test_inits_that_cannot_be_published_exactly_are_refused(tiny_model, init, overrides, message):
    with pytest.raises(ConfigError) as error:
        parse_config(pissa_document(tiny_model, "/tmp/unused-store", init, **overrides))
    where = "adapters.adapters.coding.init_lora_weights:"
    assert any(p.startswith(where) and message in p for p in error.value.problems), error.value.problems


@pytest.mark.parametrize("init", ["pissa", "corda", "eva", True])
def test_a_config_naming_no_backend_trains_a_local_only_init_in_this_process_as_ludwig_does(tiny_model, init):
    document = pissa_document(tiny_model, "/tmp/unused-store", init)
    document.pop("backend", None)
    config = parse_config(document)
    local_only = init is not True
    assert config.backend.type == ("local" if local_only else "ray")
    assert ("backend" in config.notes) == local_only
    if local_only:
        assert f"{init!r} needs the whole adapter in one process" in config.notes["backend"]


@pytest.mark.parametrize(
    ("init", "eva_config", "message"),
    [
        ("eva", {"rho": 1.0, "rhoo": 2}, "eva_config.rhoo: not an EVA option"),
        (True, {"rho": 1.0}, "eva_config: only used with init_lora_weights: eva"),
    ],
)
def test_eva_config_is_checked(tiny_model, init, eva_config, message):
    document = pissa_document(tiny_model, "/tmp/unused-store", init)
    document["adapters"]["adapters"]["coding"]["eva_config"] = eva_config
    with pytest.raises(ConfigError) as error:
        parse_config(document)
    assert any(p.startswith("adapters.adapters.coding.") and message in p for p in error.value.problems)
