"""Every PEFT adapter type in one replica: the LoRA forms the gathered forward applies exactly (rsLoRA,
rank_pattern/alpha_pattern) and the per-adapter path (DoRA, IA3, OFT, ...) give each row the greedy tokens
PEFT gives it alone, in batches that mix them with plain LoRA and base rows, rows joining mid-flight too;
an adapter serving would apply only in part is refused by name, and the others keep serving."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft import IA3Config, get_peft_model

from madapt.bench.typed import KINDS, typed_peft_model
from madapt.lora import extract
from madapt.models import load_base
from madapt.serve.engine import Engine, Row
from madapt.serve.multilora import BASE_SLOT, MultiLora, served_adapter
from madapt.serve.tuners import UnsupportedAdapter
from madapt.store import AdapterStore
from tests.helpers import decode_joining

GATHERED = {"lora", "rslora", "rank_pattern"}
PROMPTS = ["Write a loop in Python", "hi", "What is the capital of France? Answer briefly"]
MAX_TOKENS = 4


@torch.inference_mode()
def greedy(model: torch.nn.Module, ids: list[int], eos: int | None) -> list[int]:
    """The reference: one row alone, no cache, no padding, argmax until EOS or MAX_TOKENS."""
    out: list[int] = []
    while len(out) < MAX_TOKENS:
        token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    store = AdapterStore(str(tmp_path_factory.mktemp("store")))
    base = load_base(tiny_model)
    eos = base.tokenizer.eos_token_id
    prompt_ids = [base.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    references = {"base": [greedy(base.model, ids, eos) for ids in prompt_ids]}
    logits = {"base": last_logits(base.model, prompt_ids[0])}
    for i, kind in enumerate(KINDS):
        peft_model = typed_peft_model(load_base(tiny_model).model, kind, seed=i)  # PEFT's own, on a fresh base
        config, tensors = extract(peft_model, "random")
        store.publish(kind, config, tensors, base_model=base.name, base_fingerprint=base.fingerprint)
        references[kind] = [greedy(peft_model, ids, eos) for ids in prompt_ids]
        logits[kind] = last_logits(peft_model, prompt_ids[0])
    lora = MultiLora(base.model)
    slots = {kind: lora.load(served_adapter(kind, s.config, s.tensors)) for kind in KINDS for s in [store.open(kind)]}
    slots["base"] = BASE_SLOT
    engine = Engine(lora, base.tokenizer, context_length=512)
    return Served(engine, slots, references, logits, prompt_ids, store)


@dataclass
class Served:
    engine: Engine
    slots: dict[str, int]
    references: dict[str, list[list[int]]]
    """Per kind, each prompt's greedy tokens through PEFT alone."""
    logits: dict[str, torch.Tensor]
    """Per kind, PEFT's last-position logits for the first prompt."""
    prompt_ids: list[list[int]]
    store: AdapterStore


@torch.inference_mode()
def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1]


def make_row(served: Served, kind: str, prompt: int) -> Row:
    return Row(prompt_ids=served.prompt_ids[prompt], slot=served.slots[kind], max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_type_mixed_with_lora_and_base_rows_decodes_as_peft_alone(served, kind):
    engine, slots, references, logits = served.engine, served.slots, served.references, served.logits
    assert (slots[kind] in engine.lora.tuned) == (kind not in GATHERED)  # the path it was meant to take
    batch = [slots["lora"], slots[kind], BASE_SLOT, slots[kind]]
    engine.lora.begin_batch(batch)
    try:
        with torch.inference_mode():
            got = engine.model(input_ids=torch.tensor([served.prompt_ids[0]] * len(batch))).logits[:, -1]
    finally:
        engine.lora.end_batch(batch)
    assert (logits[kind] - logits["base"]).abs().max() > 1e-2  # the adapter matters, so the test can fail
    for row, name in zip(got, ["lora", kind, "base", kind], strict=True):
        torch.testing.assert_close(row, logits[name], rtol=1e-4, atol=1e-4)
    plan = [(kind, 0), ("lora", 1), ("base", 2), (kind, 2), ("dora", 1), (kind, 1)]
    rows = engine.generate([make_row(served, k, p) for k, p in plan])
    assert [r.ids for r in rows] == [references[k][p] for k, p in plan]


def test_every_type_joining_mid_flight_decodes_as_peft_alone(served):
    engine, references = served.engine, served.references
    plan = [(step % 5, kind, i % len(PROMPTS)) for i, kind in enumerate([*KINDS, "base"]) for step in [i]]
    rows = [make_row(served, kind, prompt) for _, kind, prompt in plan]
    batch = decode_joining(engine, rows, [at for at, *_ in plan], 5 + MAX_TOKENS)
    assert not batch.rows and batch.adapters.routed == 0
    assert [r.ids for r in rows] == [references[kind][prompt] for _, kind, prompt in plan]


def partial_adapters(tiny_model, store: AdapterStore) -> dict[str, tuple[dict, dict, str]]:
    """Adapters serving would apply only in part: (config, tensors, what the refusal says). (An adapter with
    modules_to_save is served whole: tests/serve/test_saved_modules.py.)"""
    found = {}
    ia3_saves = IA3Config(target_modules=["q_proj"], feedforward_modules=[], modules_to_save=["model.norm"])
    config, tensors = extract(get_peft_model(load_base(tiny_model).model, ia3_saves, adapter_name="random"), "random")
    hidden = {**config, "modules_to_save": None}  # a config that hides the saved module: refused
    found["ia3_extra"] = (hidden, tensors, "not part of its layers")
    missing = {k: v for k, v in tensors.items() if "norm" not in k and "layers.0." not in k}
    found["ia3_missing"] = (hidden, missing, "is missing")
    lora = store.open("lora")
    bias = {"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.ones(64)}
    found["trained_bias"] = ({**lora.config, "bias": "all"}, {**lora.tensors, **bias}, "bias")
    found["stray_bias"] = (lora.config, {**lora.tensors, **bias}, "not part of its layers")
    return found


def test_partial_adapters_are_refused_by_name_and_the_rest_keeps_serving(served, tiny_model):
    engine, references = served.engine, served.references
    for name, (config, tensors, needle) in partial_adapters(tiny_model, served.store).items():
        with pytest.raises(UnsupportedAdapter, match=needle) as refused:
            engine.lora.load(served_adapter(name, config, tensors))
        assert str(refused.value).startswith(f"{name}: ")
        assert name not in engine.lora.by_ref
    rows = engine.generate([make_row(served, "ia3", 0), make_row(served, "base", 1), make_row(served, "lora", 2)])
    assert [r.ids for r in rows] == [references["ia3"][0], references["base"][1], references["lora"][2]]


def test_an_unloaded_per_adapter_slot_drops_its_layers_and_reloads(served):
    engine, references, lora = served.engine, served.references, served.engine.lora
    stored = served.store.open("oft")
    slot = lora.slot("oft")
    lora.unload("oft")
    assert slot not in lora.tuned and all(slot not in layer.peft for layer in lora.layers.values())
    served.slots["oft"] = lora.load(served_adapter("oft", stored.config, stored.tensors))
    assert [r.ids for r in engine.generate([make_row(served, "oft", 1)])] == [references["oft"][1]]
