"""Every adapter type besides LoRA that madapt trains: trained locally, published with its type and options,
reattached to a fresh base with the trained model's exact logits (VeRA's shared projections, VB-LoRA's vector
bank, FourierFT's indices included), imported from PEFT's own save_pretrained directory, predicted with, and
served (the replica's engine) with the same text as `madapt predict`.
Options a type does not take, strategies and merges PEFT cannot do with it, are refused by name."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch

import madapt.train.local
from madapt.adapter_types import LORA_ENTRY_KEYS, TRAINED_TYPES, config_class, peft_field
from madapt.config import ADAPTER_TYPE_KEYS, ConfigError, LoraAdapterConfig, parse_config
from madapt.data import Example, render_prompt
from madapt.evaluate import evaluate
from madapt.lora import AdapterMismatch, attach
from madapt.merge import MergeError, MergeSpec, merge_and_publish
from madapt.models import load_base
from madapt.peft_import import import_peft_dir
from madapt.predict import Predictor
from madapt.serve.args import ServeArgs
from madapt.serve.engine import Row
from madapt.serve.loading import load_engine
from madapt.serve.multilora import BASE_SLOT, served_adapter
from madapt.store import AdapterStore
from madapt.train.local import train_local
from tests.helpers import EXAMPLES

IDS = torch.tensor([[1, 17, 300, 42, 9, 5]])

OPTIONS = {
    "adalora": {"init_r": 4, "target_r": 2, "tfinal": 1, "delta_t": 1},
    "boft": {"boft_block_size": 8},
    "c3a": {"block_size": 16},
    "fourierft": {"n_frequency": 50},
    "hra": {"r": 4},
    "ia3": {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "ln_tuning": {},
    "loha": {"r": 4, "alpha": 8},
    "lokr": {"r": 4},
    "oft": {"oft_block_size": 16},
    "tinylora": {"u": 2},
    "vblora": {"r": 4, "vector_length": 16, "num_vectors": 32},
    "vera": {"r": 8},
    "waveft": {"n_frequency": 50},
}
"""Options that fit the tiny model's 64-wide (q) and 32-wide (v) projections; the rest are PEFT's defaults."""


def document(tiny_model: str, store: str, adapters: dict, **overrides) -> dict:
    """A config training each of `adapters` for 3 steps on 12 example rows, scoring 2 held-out ones."""
    rows = (EXAMPLES / "data" / "coding.jsonl").read_text().splitlines()
    data, held_out = Path(store).parent / "train.jsonl", Path(store).parent / "eval.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(rows[:12]) + "\n")
    held_out.write_text("\n".join(rows[12:14]) + "\n")
    entry = {"dataset": str(data), "eval_dataset": str(held_out)}
    return {
        "base_model": tiny_model,
        "adapters": {"adapters": {n: {**entry, **a} for n, a in adapters.items()}},
        "trainer": {"batch_size": 4, "max_steps": 3, "learning_rate": 0.05, "max_length": 64},
        "storage": {"uri": store},
        "backend": {"type": "local"},
        **overrides,
    }


def problems_of(doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(doc)
    return error.value.problems


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_every_ludwig_type_is_trained_and_each_of_its_keys_is_a_peft_field():
    assert set(OPTIONS) == set(TRAINED_TYPES) == set(ADAPTER_TYPE_KEYS) - {"lora"}
    for kind in TRAINED_TYPES:
        fields = typing.get_type_hints(config_class(kind))
        keys = LoraAdapterConfig.passed_keys({"type": kind}) | (set(LORA_ENTRY_KEYS) & ADAPTER_TYPE_KEYS[kind])
        assert all(peft_field(kind, key) in fields for key in keys), kind


@pytest.mark.parametrize("kind", sorted(OPTIONS))  # ~2 s each on an idle 2-core machine
def test_type_trains_publishes_reattaches_imports_and_predicts(tiny_model, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("MADAPT_HOME", str(tmp_path / "home"))
    trained = {}
    extract = madapt.train.local.extract_for_original_base

    def spy(model, name, initial):  # the trained PeftModel, just before publishing
        trained["logits"] = logits(model)
        return extract(model, name, initial)

    monkeypatch.setattr(madapt.train.local, "extract_for_original_base", spy)
    config = parse_config(document(tiny_model, str(tmp_path / "store"), {"a": {"type": kind, **OPTIONS[kind]}}))
    store = AdapterStore(config.storage.uri)
    manifest = train_local(config, "a", store, progress=False)

    assert manifest.peft_type == kind.upper()
    own = {k: v for k, v in OPTIONS[kind].items() if k not in ("target_modules", "alpha", "delta_t")}
    assert own.items() <= manifest.type_options.items()
    if kind == "adalora":  # the budget's final allocation cut ranks: what is published is the cut adapter
        assert manifest.type_options["rank_pattern"] and manifest.type_options["total_step"] == 3
    base = load_base(tiny_model)
    untouched = logits(base.model)
    # Slot "exported": PEFT's own AdaLoRA saving mistakes module paths that contain the adapter name ("a").
    model = attach(base.model, store.open("a", expected_fingerprint=base.fingerprint), "exported")
    reattached = logits(model)
    torch.testing.assert_close(reattached, trained["logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(reattached, untouched, atol=1e-4), "training changed nothing"

    model.save_pretrained(str(tmp_path / "peft"))  # PEFT's own directory of the attached adapter
    imported = import_peft_dir(store, load_base(tiny_model), str(tmp_path / "peft" / "exported"), "imported")
    assert imported.peft_type == kind.upper()
    again = attach(load_base(tiny_model).model, store.open("imported"))
    torch.testing.assert_close(logits(again), trained["logits"], rtol=0, atol=1e-5)

    predictor = Predictor(load_base(tiny_model), store)
    prompt = "def add(a, b):"
    predicted = predictor.generate(prompt, "a", max_new_tokens=6)
    text, served_logits = served(tiny_model, store, "a", prompt, 6)
    assert text == predicted  # many answers are empty (EOS first) after 3 steps: the logits say more
    torch.testing.assert_close(served_logits, trained["logits"], rtol=0, atol=1e-4)


def served(tiny_model: str, store: AdapterStore, ref: str, prompt: str, max_tokens: int) -> tuple[str, torch.Tensor]:
    """What a replica makes of `ref` (the engine a replica builds, the adapter on whichever path it takes):
    the text of its row decoded in one batch with a base row, `prompt` rendered as `madapt predict` renders
    it, and its logits on IDS in a batch with a base row."""
    _, engine = load_engine(ServeArgs(base_model=tiny_model, store=store.uri, device="cpu"))
    stored = store.open(ref)
    slot = engine.lora.load(served_adapter(ref, stored.config, stored.tensors))
    ids = engine.tokenizer(render_prompt(engine.tokenizer, prompt), add_special_tokens=False).input_ids
    row, beside = (Row(prompt_ids=ids, slot=s, max_tokens=max_tokens) for s in (slot, BASE_SLOT))
    engine.generate([row, beside])
    engine.lora.begin_batch([slot, BASE_SLOT])
    try:
        with torch.inference_mode():
            out = engine.model(input_ids=IDS.repeat(2, 1)).logits
    finally:
        engine.lora.end_batch([slot, BASE_SLOT])
    return row.text.strip(), out[:1]


def test_lora_options_on_another_type_are_refused_by_key(tiny_model, tmp_path):
    found = problems_of(document(tiny_model, str(tmp_path / "store"), {"a": {"type": "ia3", "use_dora": True, "r": 4}}))
    assert any(p.startswith("adapters.adapters.a.use_dora: a lora option; ia3 adapters do not take it") for p in found)
    assert any(p.startswith("adapters.adapters.a.r: a lora option; ia3") for p in found), found


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "ia3", "modules_to_save": ["lm_head"]}, "a.modules_to_save: madapt does not train whole copies"),
        ({"type": "oft", "oft_block_size": "big"}, "a.oft_block_size: Input should be a valid integer"),
        ({"type": "ia3", "target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}, "a: PEFT refuses"),
        ({"type": "vera", "bias_type": "all"}, "a.bias_type: vera adapters train no biases"),
        ({"type": "oft", "nope": 1}, "a.nope: unknown key"),
        ({"type": "oft", "options": {"init_weights": False}}, "a.options.init_weights: not a key of Ludwig's oft"),
        ({"type": "lora", "options": {"oft_block_size": 4}}, "a.options: only other adapter types than lora"),
        ({"type": "oft", "ensemble": {"members": 2}}, "a.ensemble: oft adapters cannot be merged"),
    ],
)
def test_bad_type_options_are_refused(tiny_model, tmp_path, entry, message):
    found = problems_of(document(tiny_model, str(tmp_path / "store"), {"a": entry}))
    assert any(message in p for p in found), found


def test_ray_strategies_peft_cannot_do_are_refused(tiny_model, tmp_path):
    ray = {"type": "ray", "trainer": {"num_workers": 2, "strategy": "fsdp"}}
    adapters = {"a": {"type": "adalora"}, "b": {"type": "vblora"}}
    found = problems_of(document(tiny_model, str(tmp_path / "store"), adapters, backend=ray))
    assert any("a.type: adalora cannot train with backend.trainer.strategy 'fsdp'" in p for p in found), found
    assert any("b.type: vblora cannot train with backend.trainer.strategy 'fsdp'" in p for p in found), found
    parse_config(document(tiny_model, str(tmp_path / "store"), {"a": {"type": "oft"}}, backend=ray))


@pytest.mark.parametrize(
    ("kinds", "combination", "message"),
    [
        (("ia3", "oft"), "linear", "sources mix adapter types ['ia3', 'oft']"),
        (("oft", "oft"), "linear", "oft adapters cannot be merged"),
        (("ia3", "ia3"), "ties", "ia3 adapters merge by ['linear'] only, not 'ties'"),
    ],
)
def test_merges_peft_cannot_do_are_refused_in_the_config(tiny_model, tmp_path, kinds, combination, message):
    adapters = {"a": {"type": kinds[0]}, "b": {"type": kinds[1]}}
    merge = {"name": "m", "sources": ["a", "b"], "combination_type": combination}
    doc = document(tiny_model, str(tmp_path / "store"), adapters)
    doc["adapters"]["merge"] = merge
    if combination == "ties":
        merge["density"] = 0.5
    found = problems_of(doc)
    assert any(p.startswith(f"adapters.merge: {message}") for p in found), found


def train_pair(tiny_model: str, tmp_path, monkeypatch, kinds: tuple[str, str]) -> AdapterStore:
    monkeypatch.setenv("MADAPT_HOME", str(tmp_path / "home"))
    adapters = {f"s{i}": {"type": kind} for i, kind in enumerate(kinds)}
    config = parse_config(document(tiny_model, str(tmp_path / "store"), adapters, trainer={"max_steps": 2}))
    store = AdapterStore(config.storage.uri)
    for name in adapters:
        train_local(config, name, store, progress=False)
    return store


def test_ia3_adapters_merge_by_a_weighted_sum(tiny_model, tmp_path, monkeypatch):
    store = train_pair(tiny_model, tmp_path, monkeypatch, ("ia3", "ia3"))
    merged = merge_and_publish(store, MergeSpec("m", ("s0", "s1"), (0.25, 0.75)))
    assert merged.peft_type == "IA3"
    sources = [store.open(s).tensors for s in ("s0", "s1")]
    for key, vector in store.open("m").tensors.items():
        torch.testing.assert_close(vector, 0.25 * sources[0][key] + 0.75 * sources[1][key])
    attach(load_base(tiny_model).model, store.open("m"))  # fits the base it was trained on


def test_adapters_of_two_types_predict_and_evaluate_side_by_side_but_never_merge(tiny_model, tmp_path, monkeypatch):
    store = train_pair(tiny_model, tmp_path, monkeypatch, ("ia3", "oft"))
    with pytest.raises(MergeError, match=r"sources mix adapter types \['ia3', 'oft'\].*s0@1 is ia3, s1@1 is oft"):
        merge_and_publish(store, MergeSpec("m", ("s0", "s1"), (0.5, 0.5)))
    assert store.versions("m") == []

    base = load_base(tiny_model)
    with pytest.raises(AdapterMismatch, match="s1@1: a oft adapter cannot join the ia3 adapters"):
        attach(attach(base.model, store.open("s0")), store.open("s1"))
    predictor = Predictor(load_base(tiny_model), store)  # PEFT holds one type per model: the predictor swaps
    first = predictor.generate("def add(a, b):", "s0", max_new_tokens=4)
    predictor.generate("def add(a, b):", "s1", max_new_tokens=4)
    assert predictor.generate("def add(a, b):", "s0", max_new_tokens=4) == first

    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    held_out = [Example(prompt=r["prompt"], response=r["response"]) for r in rows]
    report = evaluate(load_base(tiny_model), store, ["s0", "s1"], {"coding": held_out}, title="two types")
    assert len({report.losses[label]["coding"] for label in report.models}) == 3  # base, ia3 and oft differ
