"""PEFT glue: rank padding keeps every output, stored adapters attach exactly, mismatches are refused."""

from __future__ import annotations

import pytest
import torch

from madapt.lora import AdapterMismatch, attach, delta_weights, pad_rank, random_adapter
from madapt.models import load_base
from madapt.store import Manifest, StoredAdapter


def stored_random_adapter(base_dir: str, r: int, seed: int, targets=("q_proj", "v_proj")) -> StoredAdapter:
    """A random LoRA adapter on the model in `base_dir`, as publish/open would hand it over."""
    config, tensors = random_adapter(load_base(base_dir).model, r=r, seed=seed, targets=targets)
    manifest = Manifest("a", 1, base_dir, "fp", r, 2 * r, list(targets), {})
    return StoredAdapter(manifest=manifest, config=config, tensors=tensors)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 200, 31, 7]])


def test_padding_to_a_larger_rank_keeps_outputs(tiny_model):
    adapter = stored_random_adapter(tiny_model, r=4, seed=0)
    reference = logits(attach(load_base(tiny_model).model, adapter), IDS)
    config, tensors = pad_rank(adapter.config, adapter.tensors, 16)
    assert config["r"] == 16 and config["lora_alpha"] == adapter.config["lora_alpha"] * 4
    padded = StoredAdapter(adapter.manifest, config, tensors)
    torch.testing.assert_close(logits(attach(load_base(tiny_model).model, padded), IDS), reference)
    for module, delta in delta_weights(adapter.config, adapter.tensors).items():
        torch.testing.assert_close(delta_weights(config, tensors)[module], delta)


def test_adapter_changes_outputs_and_switching_keeps_each(tiny_model):
    base = load_base(tiny_model).model
    plain = logits(base, IDS)
    model = attach(base, stored_random_adapter(tiny_model, r=4, seed=1), "one")
    model = attach(model, stored_random_adapter(tiny_model, r=8, seed=2), "two")
    model.set_adapter("one")
    one = logits(model, IDS)
    model.set_adapter("two")
    two = logits(model, IDS)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, IDS), plain)
    assert not torch.allclose(one, plain) and not torch.allclose(one, two)
    model.set_adapter("one")
    torch.testing.assert_close(logits(model, IDS), one)


def test_missing_target_module_is_refused(tiny_model):
    adapter = stored_random_adapter(tiny_model, r=2, seed=0)
    adapter.config["target_modules"] = ["q_proj", "wq"]
    with pytest.raises(AdapterMismatch, match=r"no module\(s\) \['wq'\]"):
        attach(load_base(tiny_model).model, adapter)


def test_wrong_shapes_are_refused(tiny_model, tmp_path):
    from madapt.models import build_tiny_llama

    wider = str(build_tiny_llama(tmp_path / "wide", hidden=128))
    model = attach(load_base(tiny_model).model, stored_random_adapter(tiny_model, r=2, seed=0), "fits")
    with pytest.raises(AdapterMismatch, match="weights do not fit this base model"):
        attach(model, stored_random_adapter(wider, r=2, seed=0), "wide")
    assert list(model.peft_config) == ["fits"]


def test_cannot_pad_down():
    with pytest.raises(ValueError, match="cannot pad rank 8 down to 4"):
        pad_rank({"r": 8, "lora_alpha": 16}, {}, 4)


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian", True])
def test_attaching_never_modifies_the_base(tiny_model, init):
    """An adapter_config.json naming an init that rewrites the base (PiSSA measured up to 0.24 in one weight)
    is attached with its stored weights only: every base weight stays bit-identical."""
    adapter = stored_random_adapter(tiny_model, r=4, seed=3)
    adapter = StoredAdapter(adapter.manifest, {**adapter.config, "init_lora_weights": init}, adapter.tensors)
    model = load_base(tiny_model).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(attach(load_base(tiny_model).model, stored_random_adapter(tiny_model, r=4, seed=3)), IDS)
    attached = attach(model, adapter)
    torch.testing.assert_close(logits(attached, IDS), expected, rtol=0, atol=0)
    after = attached.unload().state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("layer", ["embed_tokens", "lm_head"])
def test_an_adapter_on_the_embedding_or_output_layer_is_published_without_a_copy_of_the_base_and_serves(
    tiny_model, layer
):
    """PEFT saves a copy of those layers' base weights by default; madapt's adapters hold only their own."""
    from peft import LoraConfig, get_peft_model

    from madapt.lora import extract
    from madapt.serve.multilora import MultiLora, served_adapter

    config = LoraConfig(r=2, lora_alpha=4, target_modules=[layer, "q_proj"], init_lora_weights=False)
    model = get_peft_model(load_base(tiny_model).model, config)
    config_dict, tensors = extract(model, "default")
    assert any(layer in key for key in tensors) and not any(key.endswith(".base_layer.weight") for key in tensors)
    MultiLora(load_base(tiny_model).model).load(served_adapter("x", config_dict, tensors))
    manifest = Manifest("x", 1, tiny_model, "fp", 2, 4, [layer, "q_proj"], {})
    adapted = attach(load_base(tiny_model).model, StoredAdapter(manifest, config_dict, tensors))
    torch.testing.assert_close(logits(adapted, IDS), logits(model, IDS))
