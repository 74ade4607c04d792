"""The batched mixed-adapter forward equals PEFT row by row (ranks mixed, a per-request-sized merge among
them), each row pays its own adapter's rank, and batched generation equals single requests."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from madapt.data import render_prompt
from madapt.lora import LORA_A, PEFT_PREFIX, attach, publish_random, random_adapter
from madapt.merge import MergeSpec, merge_and_publish
from madapt.models import load_base
from madapt.predict import Predictor
from madapt.serve.engine import Engine, Row, _held_back
from madapt.serve.multilora import BASE_SLOT, MultiLora, RowAdapters, adapter_matrices, swap_remove
from madapt.store import AdapterStore

SPECS = {
    "sql": (4, ["q_proj", "v_proj"]),
    "math": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "poem": (2, ["v_proj"]),
}
MERGED = "sql_math"
"""The exact sum of sql and math, as a per-request merge builds it: rank 4 + 8 = 12."""
PROMPTS = ["Write a loop in Python", "hi", "What is the capital of France? Answer briefly", "2+2="]


@pytest.fixture(scope="module")
def published(tiny_model, tmp_path_factory):
    store = AdapterStore(str(tmp_path_factory.mktemp("store")))
    base = load_base(tiny_model)
    for i, (name, (r, targets)) in enumerate(SPECS.items()):
        publish_random(store, base, name, r=r, seed=i, targets=targets)
    merge_and_publish(store, MergeSpec(MERGED, ("sql", "math"), (0.7, 0.4), combination_type="exact_linear"))
    return store


def batched(tiny_model, store, refs):
    base = load_base(tiny_model)
    lora = MultiLora(base.model)
    slots = {ref: lora.load(adapter_matrices(ref, s.config, s.tensors)) for ref in refs for s in [store.open(ref)]}
    return base, lora, slots


def test_random_adapter_leaves_the_base_unchanged(tiny_model):
    base = load_base(tiny_model)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    random_adapter(base.model, r=4, targets=["q_proj"], seed=0)
    after = base.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mixed_batch_logits_equal_single_adapter_peft(tiny_model, published):
    tokenizer = load_base(tiny_model).tokenizer
    row_adapters = ["sql", "math", "base", "poem", MERGED]
    ids = tokenizer(["the quick brown fox jumps"] * len(row_adapters), return_tensors="pt").input_ids

    peft = load_base(tiny_model).model
    for name in [*SPECS, MERGED]:
        peft = attach(peft, published.open(name))
    expected = []
    with torch.inference_mode():
        for i, name in enumerate(row_adapters):
            if name == "base":
                with peft.disable_adapter():
                    expected.append(peft(input_ids=ids[i : i + 1]).logits)
            else:
                peft.set_adapter(name)
                expected.append(peft(input_ids=ids[i : i + 1]).logits)
        peft_mixed = peft(input_ids=ids, adapter_names=[n if n != "base" else "__base__" for n in row_adapters]).logits
    expected = torch.cat(expected)

    base, lora, slots = batched(tiny_model, published, [*SPECS, MERGED])
    rows = [slots.get(n, BASE_SLOT) for n in row_adapters]
    lora.begin_batch(rows)
    with torch.inference_mode():
        ours = base.model(input_ids=ids).logits
    lora.end_batch(rows)
    with torch.inference_mode():
        plain = base.model(input_ids=ids).logits  # outside a batch: the bare base

    torch.testing.assert_close(peft_mixed, expected, atol=3e-5, rtol=0)
    torch.testing.assert_close(ours, expected, atol=3e-5, rtol=0)
    torch.testing.assert_close(plain[2], expected[2], atol=3e-5, rtol=0)
    assert (ours[0] - plain[0]).abs().max() > 1e-3  # the adapters really change the output


class FactorProducts(TorchFunctionMode):
    """Inside the adapted modules, the second factor of every `bmm` / `baddbmm` that runs, counted by shape
    per module path: what a forward multiplied, (rows, in, rank) then (rows, rank, out), timing-free."""

    def __init__(self, lora: MultiLora):
        super().__init__()
        self.module: str | None = None
        self.shapes: dict[str, Counter] = {}
        self.hooks = []
        for path, layer in lora.layers.items():
            self.hooks.append(layer.register_forward_pre_hook(lambda *_, path=path: setattr(self, "module", path)))
            self.hooks.append(layer.register_forward_hook(lambda *_: setattr(self, "module", None)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.bmm, torch.baddbmm) and self.module is not None:
            factor = args[1] if func is torch.bmm else args[2]
            self.shapes.setdefault(self.module, Counter())[tuple(factor.shape)] += 1
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)


def own_rank_products(lora: MultiLora, published: AdapterStore, row_adapters: list[str]) -> dict[str, Counter]:
    """Per module, what its rows should multiply: per rank among them, one (rows, in, r) and one (rows, r,
    out) product, each rank read from the row's adapter's stored lora_A (a merge's: its sources' sum)."""
    row_tensors = [published.open(name).tensors if name != "base" else {} for name in row_adapters]
    expected = {}
    for path, layer in lora.layers.items():
        key = f"{PEFT_PREFIX}{path}.{LORA_A}"
        ranks = Counter(tensors[key].shape[0] for tensors in row_tensors if key in tensors)
        products: Counter = Counter()
        for rank, rows in ranks.items():
            products[(rows, layer.base.in_features, rank)] += 1
            products[(rows, rank, layer.base.out_features)] += 1
        if products:
            expected[path] = products
    return expected


def test_each_row_pays_its_own_rank_and_holds_its_own_bytes(tiny_model, published):
    """A rank-12 merge, ranks 2, 4 and 8 and base rows in one batch: each module multiplies each rank's rows
    at that rank (no row padded to another's, base rows in no product), in the whole batch and in a
    forward of some of its rows (a prefill of joining rows); the factors held are the adapters' own bytes."""
    base, lora, slots = batched(tiny_model, published, [*SPECS, MERGED])
    row_adapters = ["sql", "base", "math", MERGED, "poem", "sql", "math"]
    ids = base.tokenizer(["the quick brown fox jumps"] * len(row_adapters), return_tensors="pt").input_ids
    adapters = RowAdapters(lora)
    adapters.add([slots.get(n, BASE_SLOT) for n in row_adapters])
    for start, stop in [(0, len(row_adapters)), (2, 6), (1, 2)]:  # (1, 2): a base row, no adapter maths at all
        with torch.inference_mode(), lora.forward_rows(adapters, start, stop), FactorProducts(lora) as seen:
            base.model(input_ids=ids[start:stop])
        assert seen.shapes == own_rank_products(lora, published, row_adapters[start:stop])
    adapters.close()

    held = sum(
        t.numel() * t.element_size() for layer in lora.layers.values() for f in layer.factors.values() for t in f
    )
    own = sum(t.numel() for name in slots for t in published.open(name).tensors.values())
    assert held == own * lora.dtype.itemsize
    lora.unload(MERGED)
    assert all(slots[MERGED] not in layer.factors for layer in lora.layers.values())  # freed, not kept as zeros


def assert_gathered(lora: MultiLora, adapters: RowAdapters, batch: list[int]) -> None:
    """Each row's factors sit once in its module's class of its rank, and a forward of every row and one
    of the last rows multiply exactly those rows' factors."""
    assert adapters.slots == batch
    for layer in lora.layers.values():
        rows = {i: layer.factors[s] for i, s in enumerate(batch) if s in layer.factors}
        classes = adapters.classes.get(layer, {})
        assert sorted(r for c in classes.values() for r in c.rows) == sorted(rows)
        for rank, rank_rows in classes.items():
            for j, row in enumerate(rank_rows.rows):
                assert rows[row][0].shape[1] == rank
                assert torch.equal(rank_rows.a[j], rows[row][0]) and torch.equal(rank_rows.b[j], rows[row][1])
        for start in (0, len(batch) // 2):
            view = adapters.view(start, len(batch))
            products = view.products.get(layer, []) if view else []
            multiplied = {}
            for product in products:
                at = product.rows.tolist() if product.rows is not None else range(len(batch) - start)
                multiplied |= {start + i: (product.a[k], product.b[k]) for k, i in enumerate(at)}
            assert multiplied.keys() == {r for r in rows if r >= start}
            assert all(torch.equal(multiplied[r][0], rows[r][0]) for r in multiplied)


def test_rows_join_and_leave_across_rank_classes(tiny_model, published):
    _, lora, slots = batched(tiny_model, published, [*SPECS, MERGED])
    choices = [BASE_SLOT, *slots.values()]
    adapters, batch = RowAdapters(lora), []  # batch: each row's slot, moved as the engine moves its rows
    generator = random.Random(0)
    for _ in range(12):
        joining = [generator.choice(choices) for _ in range(generator.randint(1, 4))]
        adapters.add(joining)
        batch += joining
        assert_gathered(lora, adapters, batch)
        holes = sorted(generator.sample(range(len(batch)), generator.randint(0, len(batch) - 1)))
        adapters.remove(holes)
        to, moved, live = swap_remove(len(batch), holes)
        for d, s in zip(to, moved, strict=True):
            batch[d] = batch[s]
        del batch[live:]
        assert_gathered(lora, adapters, batch)
    adapters.close()
    assert not lora.pins and not adapters.classes


def test_batched_greedy_generation_equals_single_requests(tiny_model, published):
    predictor = Predictor(load_base(tiny_model), published)
    row_adapters = ["sql", "math", "poem", "base"]
    expected = [predictor.generate(p, a, max_new_tokens=10) for p, a in zip(PROMPTS, row_adapters, strict=True)]

    base, lora, slots = batched(tiny_model, published, list(SPECS))
    engine = Engine(lora, base.tokenizer, context_length=512)
    rows = [
        Row(
            prompt_ids=base.tokenizer(render_prompt(base.tokenizer, p), add_special_tokens=False).input_ids,
            slot=slots.get(a, BASE_SLOT),
            max_tokens=10,
        )
        for p, a in zip(PROMPTS, row_adapters, strict=True)
    ]
    engine.generate(rows)
    assert [r.text.strip() for r in rows] == expected
    assert len(set(expected)) > 1


def test_per_row_max_tokens_stop_and_seeded_sampling(tiny_model, published):
    base, lora, slots = batched(tiny_model, published, ["sql"])
    engine = Engine(lora, base.tokenizer, context_length=512)
    prompt = base.tokenizer("hello", add_special_tokens=False).input_ids
    streamed: list[str] = []
    greedy = Row(prompt_ids=prompt, slot=slots["sql"], max_tokens=12, on_text=streamed.append)
    short = Row(prompt_ids=prompt, slot=slots["sql"], max_tokens=3)
    sampled = [
        Row(prompt_ids=prompt, slot=BASE_SLOT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7) for _ in range(2)
    ]
    engine.generate([greedy, short, *sampled])
    assert len(greedy.ids) == 12 and greedy.finish_reason == "length"
    assert short.ids == greedy.ids[:3]
    assert "".join(streamed) == greedy.text
    assert sampled[0].ids == sampled[1].ids  # same seed, same tokens, whatever else is in the batch

    stop = greedy.text[len(greedy.text) // 2 :][:3]
    stopped = Row(prompt_ids=prompt, slot=slots["sql"], max_tokens=12, stop=[stop])
    engine.generate([stopped])
    assert stopped.finish_reason == "stop"
    assert stopped.text == greedy.text[: greedy.text.find(stop)]


def test_evicted_adapter_stays_until_its_batch_ends(tiny_model, published):
    _, lora, slots = batched(tiny_model, published, ["sql"])
    lora.begin_batch([slots["sql"]])
    lora.unload("sql")
    math = lora.load(adapter_matrices("math", published.open("math").config, published.open("math").tensors))
    assert math != slots["sql"]
    lora.end_batch([slots["sql"]])
    poem = lora.load(adapter_matrices("poem", published.open("poem").config, published.open("poem").tensors))
    assert poem == slots["sql"]  # freed once the batch that used it ended


def test_a_reload_racing_an_eviction_keeps_the_slot(tiny_model, published):
    _, lora, slots = batched(tiny_model, published, ["sql"])
    stored = published.open("sql")
    assert lora.load(adapter_matrices("sql", stored.config, stored.tensors)) == slots["sql"]
    lora.unload("sql")  # the eviction of the first load arrives after the reload
    assert lora.slot("sql") == slots["sql"]
    lora.unload("sql")
    assert lora.slot("sql") is None


def test_stop_prefix_is_held_back():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0
    assert _held_back("caf\ufffd", []) == 1


def test_a_frozen_heads_prefill_input_is_contiguous(tiny_model, published):
    """A prefill keeps the last position only, a strided slice; with a frozen head weight torch would run
    it as a `bmm` against the head expanded per row (5x slower on SmolLM2), so the engine hands the head a
    contiguous input, and the logits stay the same."""
    base, lora, slots = batched(tiny_model, published, ["sql"])
    base.model.requires_grad_(False)  # as PEFT leaves a base it has touched
    engine = Engine(lora, base.tokenizer, context_length=512)
    seen = []  # what the head gets, seen after the engine's own hook
    base.model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    rows = [Row(prompt_ids=[5, 6, 7, 8], slot=slots["sql"], max_tokens=2), Row(prompt_ids=[9], slot=0, max_tokens=2)]
    engine.generate(rows)
    assert seen and all(seen)
    assert all(len(r.ids) + (r.finish_reason == "stop") == 2 for r in rows)
