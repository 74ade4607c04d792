"""Serving on a bitsandbytes-quantized base (CPU): the replica's own construction path (`load_engine`)
with a 4- or 8-bit base, a mixed batch of an adapter row and a base row, each token for token what
PEFT's own `generate` gives on the same quantized base."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from madapt.lora import attach, publish_random
from madapt.models import load_base
from madapt.serve.args import ServeArgs
from madapt.serve.engine import Row
from madapt.serve.loading import load_engine
from madapt.serve.multilora import BASE_SLOT, adapter_matrices
from madapt.store import AdapterStore

PROMPT = "Write a function that adds two numbers"
QUANTIZED = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}


@torch.inference_mode()
def peft_tokens(tiny_model: str, bits: int, store: AdapterStore, ref: str, ids: list[int], n: int) -> list[list[int]]:
    """PEFT's greedy tokens on its own quantized base: with the adapter, then with it disabled."""
    model = attach(load_base(tiny_model, quantization_bits=bits, device="cpu").model, store.open(ref)).eval()
    inputs = {"input_ids": torch.tensor([ids]), "max_new_tokens": n, "do_sample": False, "pad_token_id": 0}
    adapted = model.generate(**inputs)
    with model.disable_adapter():
        plain = model.generate(**inputs)
    return [adapted[0, len(ids) :].tolist(), plain[0, len(ids) :].tolist()]


@pytest.mark.parametrize("bits", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_a_quantized_base_serves_adapters_as_peft_does(bits, tiny_model, tmp_path):
    store = AdapterStore(str(tmp_path))
    publish_random(store, load_base(tiny_model), "sql", r=4, seed=0, targets=["q_proj", "v_proj"])
    settings = ServeArgs(base_model=tiny_model, store=store.uri, device="cpu", quantization={"bits": bits})
    base, engine = load_engine(settings)
    q_proj = base.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q_proj) is QUANTIZED[bits]

    stored = store.open("sql@1")
    slot = engine.lora.load(adapter_matrices("sql@1", stored.config, stored.tensors))
    assert type(base.model.get_submodule("model.layers.0.self_attn.q_proj").base) is QUANTIZED[bits]
    ids = base.tokenizer(PROMPT, add_special_tokens=False).input_ids
    adapted, plain = Row(ids, slot, max_tokens=8), Row(ids, BASE_SLOT, max_tokens=8)
    engine.generate([adapted, plain])

    assert [adapted.ids, plain.ids] == peft_tokens(tiny_model, bits, store, "sql@1", ids, 8)
    assert adapted.ids != plain.ids  # the adapter does change the answer on the quantized base
    assert adapted.text == base.tokenizer.decode(adapted.ids, skip_special_tokens=True)


def test_quantization_args_are_checked():
    with pytest.raises(ValueError, match="bits"):
        ServeArgs(quantization={"bits": 3})
    with pytest.raises(ValueError, match="group_size"):
        ServeArgs(quantization={"bits": 4, "group_size": 64})
