"""One process, no Ray: train two adapters on the tiny model, reload them exactly, predict with each."""

from __future__ import annotations

import pytest
import torch

import madapt.predict
from madapt.lora import attach
from madapt.models import load_base
from madapt.predict import Predictor
from madapt.store import AdapterStore
from madapt.train.local import train_local


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    from madapt.config import parse_config
    from tests.helpers import tiny_config

    store = AdapterStore(str(tmp_path_factory.mktemp("store")))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    feature = {"name": "response", "decoder": {"type": "text_parser", "json_schema": schema}}
    config = parse_config(tiny_config(tiny_model, store.uri, output_features=[feature]))
    manifests = {name: train_local(config, name, store, progress=False) for name in config.named_adapters}
    return config, store, manifests


def test_training_lowers_the_loss(trained):
    _, _, manifests = trained
    for manifest in manifests.values():
        losses = manifest.metrics["losses"]
        assert len(losses) == 6
        # A random tiny model starts at ~ln(vocab); q/v LoRA moves it slowly but steadily.
        assert losses[-1] < losses[0] - 0.03, losses
        assert sum(losses[3:]) < sum(losses[:3]), losses
        assert manifest.metrics["tokens"] > 0 and manifest.metrics["tokens_per_s"] > 0


def test_the_decoders_json_schema_is_published_as_the_default_response_format(trained):
    config, store, manifests = trained
    assert config.response_format["json_schema"]["schema"]["required"] == ["answer"]
    for name, manifest in manifests.items():
        assert manifest.response_format == store.manifest(name).response_format == config.response_format


def test_published_adapter_reloads_to_the_same_outputs(trained, tiny_model):
    _, store, _ = trained
    stored = store.open("coding", expected_fingerprint=load_base(tiny_model).fingerprint)
    assert stored.manifest.r == 8 and stored.manifest.target_modules == ["q_proj", "v_proj"]
    ids = torch.tensor([[1, 17, 300, 42, 9]])
    first = attach(load_base(tiny_model).model, stored)
    second = attach(load_base(tiny_model).model, store.open("coding@1"))
    with torch.no_grad():
        torch.testing.assert_close(first(input_ids=ids).logits, second(input_ids=ids).logits)
        with first.disable_adapter():
            assert not torch.allclose(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_predict_switches_adapters_without_reloading_the_base(trained, tiny_model, monkeypatch):
    _, store, _ = trained
    predictor = Predictor(load_base(tiny_model), store)
    loads = []
    monkeypatch.setattr(madapt.predict, "attach", lambda *a, **k: loads.append(a[1].ref) or attach(*a, **k))
    base_weight = predictor.base.model.get_input_embeddings().weight
    outputs = {a: predictor.generate("How do I sort a list?", a, max_new_tokens=8) for a in ("coding", "chat", "base")}
    again = predictor.generate("How do I sort a list?", "coding", max_new_tokens=8)
    assert again == outputs["coding"]
    assert loads == ["coding@1", "chat@1"]  # each adapter attached once, the base never reloaded
    assert predictor.model.get_input_embeddings().weight is base_weight
    assert len(set(outputs.values())) == 3, outputs


def test_qlora_4bit_trains_and_reloads_on_the_quantized_base(tiny_model, tmp_path):
    """QLoRA without Ray (the Ray run's equality with this trainer is a `slow` test): a 4-bit NF4 base
    (bitsandbytes on CPU) trains a LoRA whose loss goes down and which reloads onto the 4-bit base."""
    pytest.importorskip("bitsandbytes")
    from madapt.config import parse_config
    from tests.helpers import tiny_config

    document = tiny_config(tiny_model, str(tmp_path / "store"), quantization={"bits": 4})
    document["adapters"] = {"adapters": {"coding": document["adapters"]["adapters"]["coding"]}}
    store = AdapterStore(str(tmp_path / "store"))
    manifest = train_local(parse_config(document), "coding", store, progress=False)
    losses = manifest.metrics["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    base = load_base(tiny_model, quantization_bits=4)
    assert type(base.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = attach(base.model, store.open("coding", expected_fingerprint=base.fingerprint)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 17, 300]])).logits).all()
