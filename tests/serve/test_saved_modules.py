"""Adapters that save more than their layers, served per row: PEFT adapters trained with `modules_to_save`
(a whole `lm_head`, a whole `embed_tokens`) and with `trainable_token_indices`, saved by PEFT's
save_pretrained, imported into a store as a user imports them, and served in mixed batches beside a plain
LoRA row and a base row: each row's greedy tokens equal PEFT's own `generate` with that adapter, and the
other rows equal their outputs alone."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from madapt.lora import attach, publish_random
from madapt.models import LoadedBase, load_base
from madapt.peft_import import import_peft_dir
from madapt.serve.engine import Engine, Row
from madapt.serve.multilora import BASE_SLOT, MultiLora, served_adapter
from madapt.serve.saved_modules import WithSaved
from madapt.serve.tuners import UnsupportedAdapter
from madapt.store import WEIGHTS_FILE, AdapterStore, CorruptAdapter
from tests.helpers import decode_joining

PROMPTS = ["Write a loop in Python", "What is the capital of France? Answer briefly"]
MAX_TOKENS = 4
TARGETS = ["q_proj", "v_proj"]


def saving_configs(tokens: list[int]) -> dict[str, PeftConfig]:
    """The adapters under test; `tokens`: ids whose embedding rows (and tied logits) they retrain. The tiny
    base ties its head to its embedding, as small models do."""
    lora = {"r": 4, "target_modules": TARGETS, "init_lora_weights": False}
    return {
        "head": LoraConfig(**lora, modules_to_save=["lm_head"]),
        "embed": LoraConfig(**lora, modules_to_save=["embed_tokens"]),
        "embed_tied": LoraConfig(**lora, modules_to_save=["embed_tokens"], ensure_weight_tying=True),
        "tokens": LoraConfig(**lora, trainable_token_indices=tokens),  # the tied head follows the new rows
        "tokens_own_head": LoraConfig(**lora, trainable_token_indices={"embed_tokens": tokens, "lm_head": tokens[1:]}),
        "ia3_norm": IA3Config(target_modules=TARGETS, feedforward_modules=[], modules_to_save=["model.norm"]),
    }


def save_randomised(model: torch.nn.Module, config: PeftConfig, seed: int, target: Path) -> PeftModel:
    """A PEFT adapter on `model` (a fresh base) whose saved modules and token rows are moved well away from the base's
    (PEFT starts them as copies), saved with PEFT's save_pretrained (safetensors) to `target`."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:  # the adapter's own: factors, saved copies, token rows
                parameter.add_(torch.randn_like(parameter) * (3 * parameter.std()).clamp(min=0.5))
    peft_model.save_pretrained(target)
    return peft_model.eval()


@torch.inference_mode()
def peft_generate(model: torch.nn.Module, ids: list[int], eos: int) -> list[int]:
    """PEFT's (or the plain base's) own greedy `generate`, up to EOS."""
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@dataclasses.dataclass
class Served:
    engine: Engine
    slots: dict[str, int]
    expected: dict[str, list[list[int]]]
    """Per adapter, each prompt's greedy tokens: PEFT's generate with it (base: the base's own; lora: the
    engine's with the row alone)."""
    prompts: list[list[int]]
    store: AdapterStore
    base: LoadedBase
    """The served base (its model wrapped for serving: `fresh` gives another copy)."""


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("saved")
    store = AdapterStore(str(root / "store"))
    base = load_base(tiny_model)
    eos = base.tokenizer.eos_token_id
    prompts = [base.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    expected = {"base": [peft_generate(base.model, ids, eos) for ids in prompts]}
    tokens = sorted({*prompts[0][:3], *(t for out in expected["base"] for t in out[:2])})  # read and written
    for seed, (name, config) in enumerate(saving_configs(tokens).items()):
        reference = save_randomised(fresh(base).model, config, seed, root / name)
        import_peft_dir(store, fresh(base), str(root / name), name)  # what `madapt adapters import` runs
        expected[name] = [peft_generate(reference, ids, eos) for ids in prompts]
    publish_random(store, base, "lora", r=4, seed=7)
    lora = MultiLora(base.model)
    slots = {
        name: lora.load(served_adapter(name, s.config, s.tensors)) for name in store.names() for s in [store.open(name)]
    }
    slots["base"] = BASE_SLOT
    engine = Engine(lora, base.tokenizer, context_length=512)
    expected["lora"] = [engine.generate([row(slots["lora"], ids)])[0].ids for ids in prompts]  # each alone
    return Served(engine, slots, expected, prompts, store, base)


def fresh(base: LoadedBase) -> LoadedBase:
    """Another copy of the base model, sharing the loaded tokenizer (loading it again is most of a load)."""
    model = AutoModelForCausalLM.from_pretrained(base.name, dtype=torch.float32, use_safetensors=True)
    return dataclasses.replace(base, model=model)


def row(slot: int, ids: list[int]) -> Row:
    return Row(prompt_ids=ids, slot=slot, max_tokens=MAX_TOKENS)


SAVING = ["head", "embed", "embed_tied", "tokens", "tokens_own_head", "ia3_norm"]


def test_each_saved_module_changes_the_output_so_the_comparisons_can_fail(served):
    for name in SAVING:
        assert served.expected[name] != served.expected["base"], name


def test_each_adapter_saves_what_peft_saved_for_its_options(served):
    """What the served form holds besides the layers: (whole modules, heads tied to a saved embedding, token rows)."""
    meant = {
        "head": (["lm_head"], [], []),
        "embed": (["model.embed_tokens"], [], []),
        "embed_tied": (["model.embed_tokens"], ["lm_head"], []),  # PEFT saves the tied head too
        "tokens": ([], [], ["model.embed_tokens"]),  # the tied head follows the embedding's rows
        "tokens_own_head": ([], [], ["lm_head", "model.embed_tokens"]),  # other indices: rows of its own
        "ia3_norm": (["model.norm"], [], []),
    }
    for name, (modules, tied, tokens) in meant.items():
        stored = served.store.open(name)
        adapter = served_adapter(name, stored.config, stored.tensors)
        assert isinstance(adapter, WithSaved)
        assert (sorted(adapter.saved.modules), sorted(adapter.saved.tied), sorted(adapter.saved.tokens)) == (
            modules,
            tied,
            tokens,
        ), name


def test_a_mixed_batch_gives_each_row_what_peft_generates_with_its_adapter(served):
    plan = [(name, p) for p in range(len(PROMPTS)) for name in [*SAVING, "lora", "base"]]
    rows = served.engine.generate([row(served.slots[name], served.prompts[p]) for name, p in plan])
    assert [r.ids for r in rows] == [served.expected[name][p] for name, p in plan]


def test_rows_joining_mid_flight_decode_as_peft_alone(served):
    plan = [(step % 4, name, step % len(PROMPTS)) for step, name in enumerate([*SAVING, "lora", "base", *SAVING])]
    rows = [row(served.slots[name], served.prompts[p]) for _, name, p in plan]
    batch = decode_joining(served.engine, rows, [at for at, *_ in plan], 4 + MAX_TOKENS)
    assert not batch.rows and batch.adapters.routed == 0
    assert [r.ids for r in rows] == [served.expected[name][p] for _, name, p in plan]


def test_the_saved_tensors_are_stored_checksummed_and_counted(served):
    stored = served.store.open("head")
    adapter = served_adapter("head", stored.config, stored.tensors)
    assert isinstance(adapter, WithSaved)
    head = stored.tensors["base_model.model.lm_head.weight"]
    assert adapter.saved.nbytes == head.nbytes  # what the replica holds besides the LoRA factors
    assert stored.manifest.files[WEIGHTS_FILE]["bytes"] > head.nbytes
    manifest = stored.manifest
    served.store.publish(
        "head_copy",
        stored.config,
        stored.tensors,
        base_model=manifest.base_model,
        base_fingerprint=manifest.base_fingerprint,
    )
    weights = next(Path(served.store.root).glob(f"head_copy/1/{WEIGHTS_FILE}"))
    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header])["base_model.model.lm_head.weight"]["data_offsets"]
    data[8 + header + start] ^= 0xFF  # one byte of the saved lm_head only
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapter, match="checksum mismatch"):
        served.store.open("head_copy")


def refused_adapters(served: Served) -> dict[str, tuple[dict, dict, str]]:
    """Saving adapters serving cannot apply as PEFT does: (config, tensors, what the refusal says)."""
    head, tokens = served.store.open("embed@1"), served.store.open("tokens")
    delta = next(k for k in tokens.tensors if k.endswith("trainable_tokens_delta"))
    factors = {"A": torch.zeros(4, 49152), "B": torch.zeros(64, 4)}
    wrong = {**head.tensors, "base_model.model.model.embed_tokens.weight": torch.zeros(8, 64)}
    return {
        "tied": ({**head.config, "ensure_weight_tying": True}, head.tensors, "ensure_weight_tying"),
        "misfit": (head.config, wrong, re.escape("the saved model.embed_tokens.weight is (8, 64)")),
        "no_entry": (
            {**tokens.config, "trainable_token_indices": {"lm_head": [1]}},
            tokens.tensors,
            "has no entry for 'model.embed_tokens'",
        ),
        "short_rows": (
            {**tokens.config, "trainable_token_indices": [1]},
            tokens.tensors,
            "1 trainable token indices but",
        ),
        "adapted_and_saved": (
            {**head.config, "target_modules": ["q_proj", "embed_tokens"]},
            {**head.tensors, **{f"base_model.model.model.embed_tokens.lora_{f}.weight": t for f, t in factors.items()}},
            "'model.embed_tokens' is adapted by its layers and replaced",
        ),
        "not_ids": ({**tokens.config, "trainable_token_indices": "<|im_start|>"}, tokens.tensors, "is not token ids"),
        "no_rows": (tokens.config, {k: v for k, v in tokens.tensors.items() if k != delta}, "no token_adapter"),
    }


def test_what_cannot_be_applied_as_peft_does_is_refused_by_name_and_the_rest_keeps_serving(served):
    engine = served.engine
    for name, (config, tensors, needle) in refused_adapters(served).items():
        with pytest.raises(UnsupportedAdapter, match=needle) as refused:
            engine.lora.load(served_adapter(name, config, tensors))
        assert str(refused.value).startswith(f"{name}: ")
        assert name not in engine.lora.by_ref
    rows = engine.generate([row(served.slots[n], served.prompts[0]) for n in ["tokens", "base", "head"]])
    assert [r.ids for r in rows] == [served.expected[n][0] for n in ["tokens", "base", "head"]]


def test_an_unloaded_saving_adapter_drops_its_modules_and_reloads(served):
    lora, stored = served.engine.lora, served.store.open("tokens")
    slot = lora.slot("tokens")
    lora.unload("tokens")
    assert slot not in lora.tuned and all(slot not in layer.peft for layer in lora.layers.values())
    served.slots["tokens"] = lora.load(served_adapter("tokens", stored.config, stored.tensors))
    rows = served.engine.generate([row(served.slots["tokens"], served.prompts[1])])
    assert [r.ids for r in rows] == [served.expected["tokens"][1]]


def test_offline_prediction_attaches_them_through_peft_as_served(served):
    """`madapt predict` and `evaluate` attach a stored adapter with PEFT itself: the same tokens."""
    eos = served.engine.tokenizer.eos_token_id
    for name in ["head", "tokens"]:
        attached = attach(fresh(served.base).model, served.store.open(name))
        assert peft_generate(attached, served.prompts[0], eos) == served.expected[name][0], name
