"""Per-request merges without Ray: how a request names one, the merged slot's maths against the sources'
deltas and against the published `exact_linear` merge, and the replica's cache of built merges."""

from __future__ import annotations

import asyncio

import pytest
import torch

from madapt.lora import lora_scale, publish_random
from madapt.merge import MergeSpec, merge_and_publish
from madapt.serve.engine import Engine, Row
from madapt.serve.multilora import BASE_SLOT, MultiLora, adapter_matrices
from madapt.serve.openai.errors import ProtocolError
from madapt.serve.request_merges import EXACT, MergeCache, Recipe, recipe_id, requested_merge
from madapt.store import AdapterStore

WEIGHTS = {"chat@1": 0.4, "coding@1": 0.7}
"""In the recipe's order (sorted refs): the published twin then holds the very same stacked factors."""


@pytest.fixture(scope="module")
def published(base, tmp_path_factory):
    """Two sources of different ranks, scales and modules, and their published exact_linear merge."""
    store = AdapterStore(str(tmp_path_factory.mktemp("store")))
    publish_random(store, base, "chat", r=8, seed=2, targets=("q_proj", "k_proj", "o_proj"))
    publish_random(store, base, "coding", r=4, seed=1, alpha=4.0)
    spec = MergeSpec("both", ("chat", "coding"), tuple(WEIGHTS.values()), combination_type="exact_linear")
    merge_and_publish(store, spec)
    return store


@pytest.fixture(scope="module")
def lora(base):
    return MultiLora(base.model)  # wraps the module's base in place: one per module


def fetcher(store: AdapterStore, fetched: list[str]):
    async def fetch(ref: str):
        fetched.append(ref)
        await asyncio.sleep(0)  # lets a second request for the same recipe arrive meanwhile
        source = store.open(ref)
        return source.config, source.tensors

    return fetch


@pytest.mark.parametrize(
    ("model", "adapters", "expected"),
    [
        ("coding", None, None),
        ("coding+chat", None, [("coding", 1.0), ("chat", 1.0)]),
        ("coding+chat@2", {"chat@2": 0.3, "coding": 0.7}, [("coding", 0.7), ("chat@2", 0.3)]),
        ("coding", {"coding": 0.5}, [("coding", 0.5)]),
    ],
)
def test_a_request_names_a_merge_by_model_and_weights(model, adapters, expected):
    recipe = requested_merge(model, adapters, None, max_sources=3)
    assert (recipe and list(recipe.sources)) == expected and (recipe is None or recipe.combination_type == EXACT)


@pytest.mark.parametrize(
    ("model", "adapters", "param", "needle"),
    [
        ("coding+", None, "model", "joins 1 to 3"),
        ("a+b+c+d", None, "model", "joins 1 to 3"),
        ("coding+coding", None, "model", "twice"),
        ("coding+chat", {"coding": 1.0}, "adapters", "name the same"),
        ("coding", {"coding": 1.0, "chat": 1.0}, "adapters", "name the same"),
        ("coding+chat", {"coding": "1", "chat": 1.0}, "adapters", "a number"),
        ("coding+chat", {"coding": True, "chat": 1.0}, "adapters", "a number"),
        ("coding+chat", {"coding": float("inf"), "chat": 1.0}, "adapters", "finite"),
        ("coding+chat", {"coding": -1.0, "chat": 0.5}, "adapters", "non-negative"),
        ("coding+chat", [["coding", 1.0]], "adapters", "an object"),
    ],
)
def test_a_bad_merge_is_a_400_naming_the_field(model, adapters, param, needle):
    with pytest.raises(ProtocolError) as caught:
        requested_merge(model, adapters, None, max_sources=3)
    assert caught.value.status == 400 and caught.value.param == param and needle in caught.value.message


def test_the_merged_slot_is_the_weighted_sum_and_serves_as_the_published_exact_linear(base, lora, published):
    recipe = Recipe(tuple(sorted(WEIGHTS.items())))
    slot = asyncio.run(MergeCache(lora, 2, fetcher(published, [])).acquire(recipe))
    twin = published.open("both")
    twin_slot = lora.load(adapter_matrices(twin.ref, twin.config, twin.tensors))
    sources = {ref: published.open(ref) for ref in WEIGHTS}
    for path, layer in lora.layers.items():
        delta = torch.zeros(layer.a.shape[1], layer.b.shape[2], dtype=torch.float64)
        for ref, weight in WEIGHTS.items():
            config, tensors = sources[ref].config, sources[ref].tensors
            a = tensors.get(f"base_model.model.{path}.lora_A.weight")
            if a is not None:
                b = tensors[f"base_model.model.{path}.lora_B.weight"]
                delta += weight * lora_scale(config) * (b.double() @ a.double()).T
        merged = layer.a[slot].double() @ layer.b[slot].double()
        torch.testing.assert_close(merged, delta, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.a[slot], layer.a[twin_slot]) and torch.equal(layer.b[slot], layer.b[twin_slot])
    engine = Engine(lora, base.tokenizer, context_length=256)
    prompt = base.tokenizer("Write a function", add_special_tokens=False).input_ids
    rows = engine.generate([Row(prompt, s, 8) for s in (slot, twin_slot, BASE_SLOT)])
    assert rows[0].text == rows[1].text != rows[2].text


def test_merges_are_built_once_per_recipe_and_the_least_recent_is_evicted(lora, published):
    fetched: list[str] = []
    cache = MergeCache(lora, 1, fetcher(published, fetched))
    first, second = Recipe((("chat@1", 1.0), ("coding@1", 1.0))), Recipe((("chat@1", 0.5), ("coding@1", 0.5)))

    async def scenario() -> tuple[list[int], int]:
        together = await asyncio.gather(cache.acquire(first), cache.acquire(first))
        return together, await cache.acquire(second)

    (one, same), other = asyncio.run(scenario())
    assert one == same != other and fetched == ["chat@1", "coding@1"] * 2  # the first recipe built once
    assert lora.slot(recipe_id(first)) is None and lora.slot(recipe_id(second)) == other
    assert one in lora.doomed  # still pinned by its two requests: its weights stay until they end
    lora.unpin([one, same])
    assert one not in lora.doomed and not lora.pins.get(one)
