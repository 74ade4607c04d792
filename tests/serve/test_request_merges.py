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
from madapt.serve.request_merges import EXACT, MergeCache, Recipe, build, recipe_id, requested_merge, resolved
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
        a_merged, b_merged = layer.factors[slot]
        delta = torch.zeros(a_merged.shape[0], b_merged.shape[1], dtype=torch.float64)
        for ref, weight in WEIGHTS.items():
            config, tensors = sources[ref].config, sources[ref].tensors
            a = tensors.get(f"base_model.model.{path}.lora_A.weight")
            if a is not None:
                b = tensors[f"base_model.model.{path}.lora_B.weight"]
                delta += weight * lora_scale(config) * (b.double() @ a.double()).T
        torch.testing.assert_close(a_merged.double() @ b_merged.double(), delta, rtol=1e-5, atol=1e-6)
        a_twin, b_twin = layer.factors[twin_slot]
        assert torch.equal(a_merged, a_twin) and torch.equal(b_merged, b_twin)
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


PRUNING = [
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("dare_ties", {"density": 0.6, "seed": 3}),
    ("dare_linear", {"density": 0.6, "seed": 3}),
    ("magnitude_prune", {"density": 0.4}),
]
"""Recipes beyond the exact sum, over sources of ranks 8 and 4 on different modules (TIES pads the ranks)."""
PRUNED_WEIGHTS = {"coding": 0.7, "chat": 0.6}


def asked(merge: dict, weights: dict[str, float] = PRUNED_WEIGHTS) -> Recipe:
    """The recipe a request for `coding+chat` with `merge` resolves to (both at version 1)."""
    recipe = requested_merge("+".join(weights), weights, merge, max_sources=3)
    assert recipe is not None
    return resolved(recipe, [f"{name}@1" for name in weights])


def opened(store: AdapterStore, recipe: Recipe) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    return [(source.config, source.tensors) for source in (store.open(ref) for ref, _ in recipe.sources)]


@pytest.mark.parametrize(("combination_type", "parameters"), PRUNING)
def test_a_pruning_merge_is_the_published_merge_and_serves_its_text(
    base, lora, published, combination_type, parameters
):
    merge = {"combination_type": combination_type, **parameters}
    recipe = asked(merge)
    name = f"twin-{combination_type.replace('_', '-')}-{len(parameters)}"
    spec = MergeSpec(name, tuple(PRUNED_WEIGHTS), tuple(PRUNED_WEIGHTS.values()), **merge)
    manifest = merge_and_publish(published, spec)
    assert manifest.lineage and manifest.lineage.get("majority_sign_method") == parameters.get("majority_sign_method")
    twin = published.open(manifest.ref)
    config, tensors = build(recipe, opened(published, recipe))
    assert tensors.keys() == twin.tensors.keys() and all(torch.equal(tensors[k], twin.tensors[k]) for k in tensors)
    assert config["r"] == twin.config["r"] == 8  # the rank-4 source padded, as `madapt merge` pads it

    slot = asyncio.run(MergeCache(lora, 2, fetcher(published, [])).acquire(recipe))
    twin_slot = lora.load(adapter_matrices(twin.ref, twin.config, twin.tensors))
    engine = Engine(lora, base.tokenizer, context_length=256)
    prompt = base.tokenizer("Write a function", add_special_tokens=False).input_ids
    rows = engine.generate([Row(prompt, s, 8) for s in (slot, twin_slot, BASE_SLOT)])
    assert rows[0].text == rows[1].text != rows[2].text
    lora.unpin([slot])


def test_dare_draws_by_its_seed_and_the_cache_keeps_one_merge_per_parameters(lora, published):
    dare = {"combination_type": "dare_ties", "density": 0.5}
    recipes = [asked({**dare, "seed": 1}), asked({**dare, "seed": 1}), asked({**dare, "seed": 2}), asked(dare)]
    built = [build(recipe, opened(published, recipe))[1] for recipe in recipes]
    key = next(iter(built[0]))
    assert torch.equal(built[0][key], built[1][key]) and not torch.equal(built[0][key], built[2][key])
    assert recipes[3] == asked({**dare, "seed": 0})  # the default seed, as `madapt merge`'s

    variants = [
        *recipes,
        asked({**dare, "density": 0.6}),
        asked({**dare, "combination_type": "dare_linear"}),
        asked({"combination_type": "ties", "density": 0.5}),
        asked({"combination_type": "ties", "density": 0.5, "majority_sign_method": "frequency"}),
        asked({"combination_type": "ties", "density": 0.5}, {"chat": 0.6, "coding": 0.7}),  # the sources' order
        asked({"combination_type": EXACT}),
    ]
    fetched: list[str] = []
    cache = MergeCache(lora, len(variants), fetcher(published, fetched))

    async def acquire_all() -> list[int]:
        return [await cache.acquire(recipe) for recipe in variants]

    slots = asyncio.run(acquire_all())
    assert slots[0] == slots[1] and len(set(slots)) == len(variants) - 1 == len(fetched) / 2
    assert len({recipe_id(recipe) for recipe in variants}) == len(variants) - 1
    assert recipe_id(variants[0]) == "dare_ties(coding@1*0.7+chat@1*0.6,density=0.5,majority_sign_method=total,seed=1)"
    assert recipe_id(variants[-1]) == "chat@1*0.6+coding@1*0.7"  # the exact sum: sorted, as without `merge`
    lora.unpin(slots)


@pytest.mark.parametrize(
    ("model", "adapters", "merge", "param", "needle"),
    [
        ("coding", None, {"combination_type": "ties", "density": 0.5}, "merge", "needs adapters"),
        ("a+b", None, ["ties"], "merge", "an object"),
        ("a+b", None, {"combination_type": "ties", "density": 0.5, "top_k": 3}, "merge", "unknown key 'top_k'"),
        ("a+b", None, {"density": 0.5}, "merge.combination_type", "None is not one of"),
        ("a+b", None, {"combination_type": "bogus"}, "merge.combination_type", "'bogus' is not one of"),
        ("a+b", None, {"combination_type": "ties_svd", "density": 0.5}, "merge.combination_type", "dense SVD"),
        ("a+b", None, {"combination_type": "ties"}, "merge", "density must be in (0, 1] for ties, got None"),
        ("a+b", None, {"combination_type": "ties", "density": 1.5}, "merge", "density must be in (0, 1]"),
        ("a+b", None, {"combination_type": "dare_ties", "density": 0}, "merge", "density must be in (0, 1]"),
        ("a+b", None, {"combination_type": "ties", "density": "0.5"}, "merge.density", "a number"),
        ("a+b", None, {"combination_type": "ties", "density": True}, "merge.density", "a number"),
        ("a+b", None, {"combination_type": "linear", "density": 0.5}, "merge", "density is only used by"),
        (
            "a+b",
            {"a": 1, "b": 2},
            {"combination_type": "ties", "density": 0.5, "majority_sign_method": "most"},
            "merge",
            "majority_sign_method must be one of",
        ),
        (
            "a+b",
            None,
            {"combination_type": "ties", "density": 0.5, "majority_sign_method": 1},
            "merge.majority_sign_method",
            "'total' or 'frequency'",
        ),
        (
            "a+b",
            None,
            {"combination_type": "dare_linear", "density": 0.5, "majority_sign_method": "frequency"},
            "merge",
            "majority_sign_method is only used by",
        ),
        ("a+b", None, {"combination_type": "dare_ties", "density": 0.5, "seed": -1}, "merge.seed", "an integer"),
        ("a+b", None, {"combination_type": "dare_ties", "density": 0.5, "seed": 1.5}, "merge.seed", "an integer"),
        ("a+b", None, {"combination_type": "ties", "density": 0.5, "seed": 1}, "merge.seed", "only used by"),
        ("a+b", {"a": 0, "b": 0}, {"combination_type": "ties", "density": 0.5}, "adapters", "positive sum"),
    ],
)
def test_a_bad_merge_object_is_a_400_naming_it(model, adapters, merge, param, needle):
    with pytest.raises(ProtocolError) as caught:
        requested_merge(model, adapters, merge, max_sources=3)
    assert caught.value.status == 400 and caught.value.param == param and needle in caught.value.message
