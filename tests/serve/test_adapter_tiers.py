"""A replica's adapter tiers on the tiny base, without Ray: real adapters read from a real local store into
a real `MultiLora`; budgets by bytes, the host tier, and what leaves Serve's table (madapt.serve.adapter_tiers)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from madapt.lora import publish_random
from madapt.models import load_base
from madapt.serve.adapter_cache import TooLarge
from madapt.serve.adapter_tiers import AdapterTiers, HostCopy, tensor_bytes
from madapt.serve.loading import memory_budget, smallest_adapter_bytes
from madapt.serve.multilora import MultiLora, served_adapter
from madapt.serve.request_merges import MergeCache, Recipe, recipe_id
from madapt.store import AdapterStore

RANKS = {"r2": 2, "r4": 4, "r8": 8, "r16": 16}


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    store = AdapterStore(str(tmp_path_factory.mktemp("store")))
    base = load_base(tiny_model)
    refs = {name: publish_random(store, base, name, r=r, seed=r).ref for name, r in RANKS.items()}
    return base, store, refs, tiny_model


def tiers(setup, device_budget: int, host_budget: int = 1 << 30, max_adapters: int | None = None):
    base, store, _, tiny_model = setup
    lora = MultiLora(load_base(tiny_model).model)  # a fresh base: MultiLora wraps its modules in place
    reads: list[str] = []
    forgotten: list[str] = []

    async def fetch(ref: str) -> HostCopy:
        reads.append(ref)
        stored = store.open(ref, expected_fingerprint=base.fingerprint)
        return HostCopy(stored.ref, served_adapter(stored.ref, stored.config, stored.tensors), None, "store")

    made = AdapterTiers(
        lora,
        device_budget=device_budget,
        host_budget=host_budget,
        max_adapters=max_adapters,
        fetch=fetch,
        forget=forgotten.append,
    )
    return made, lora, reads, forgotten


def sizes(setup) -> dict[str, int]:
    _, store, refs, _ = setup
    return {
        name: tensor_bytes(served_adapter(ref, (s := store.open(ref)).config, s.tensors)) for name, ref in refs.items()
    }


def test_sizes_are_each_adapters_own_rank_not_the_largest_loaded(setup):
    by_name = sizes(setup)
    assert by_name["r4"] == 2 * by_name["r2"] and by_name["r16"] == 8 * by_name["r2"]  # q,v A and B scale with r
    assert by_name["r2"] == sum(t.numel() for t in setup[1].open(setup[2]["r2"]).tensors.values()) * 4  # float32


def test_byte_budget_evicts_from_multilora_and_from_serves_table(setup):
    _, _, refs, _ = setup
    by_name = sizes(setup)
    made, lora, _, forgotten = tiers(setup, device_budget=by_name["r16"] + by_name["r8"])
    for name in ("r2", "r4", "r8"):
        asyncio.run(made.load(refs[name]))
    assert set(lora.by_ref) == {refs["r2"], refs["r4"], refs["r8"]} and forgotten == []
    made.use(refs["r2"])  # a request of r2 is running: r4, now the least recent, goes first, then r8
    asyncio.run(made.load(refs["r16"]))
    made.done(refs["r2"])
    assert forgotten == [refs["r4"], refs["r8"]]  # equal cost per byte (one path): LRU order, by bytes
    assert set(lora.by_ref) == {refs["r2"], refs["r16"]}
    assert made.device.used == by_name["r2"] + by_name["r16"] <= made.device.budget


def test_count_cap_is_honoured_beside_bytes(setup):
    _, _, refs, _ = setup
    made, lora, _, forgotten = tiers(setup, device_budget=1 << 30, max_adapters=2)
    for name in ("r2", "r4", "r8"):
        asyncio.run(made.load(refs[name]))
    assert forgotten == [refs["r2"]] and set(lora.by_ref) == {refs["r4"], refs["r8"]}


def test_a_reload_of_an_evicted_adapter_comes_from_the_host_tier_without_reading_the_store(setup):
    _, _, refs, _ = setup
    by_name = sizes(setup)
    made, lora, reads, _ = tiers(setup, device_budget=by_name["r16"])
    first = asyncio.run(made.load(refs["r2"]))
    asyncio.run(made.load(refs["r16"]))  # evicts r2 from the device
    assert refs["r2"] not in lora.by_ref and not first.loaded.live
    again = asyncio.run(made.load(refs["r2"]))
    assert (first.tier, again.tier) == ("store", "host")
    assert reads == [refs["r2"], refs["r16"]]  # r2 read from the store once
    assert made.stats()["loads"] == {"store": 2, "host": 1} and made.stats()["fetches"][refs["r2"]] == 1
    assert lora.slot(refs["r2"]) == again.loaded.slot


def test_a_full_host_tier_drops_its_least_recent_copy_and_that_adapter_is_read_again(setup):
    _, _, refs, _ = setup
    by_name = sizes(setup)
    made, _, reads, _ = tiers(setup, device_budget=by_name["r16"], host_budget=by_name["r16"])
    for name in ("r2", "r16", "r2"):  # r16's copy pushes r2's out of the host tier
        asyncio.run(made.load(refs[name]))
    assert reads == [refs["r2"], refs["r16"], refs["r2"]]
    assert made.host.used <= made.host.budget


def test_an_adapter_larger_than_the_budget_is_refused_and_the_others_keep_serving(setup):
    _, _, refs, _ = setup
    by_name = sizes(setup)
    made, lora, _, forgotten = tiers(setup, device_budget=by_name["r8"])
    asyncio.run(made.load(refs["r4"]))
    with pytest.raises(TooLarge, match=rf"{refs['r16']}.*{by_name['r16']:,} bytes.*{by_name['r8']:,} bytes"):
        asyncio.run(made.load(refs["r16"]))
    assert set(lora.by_ref) == {refs["r4"]} and forgotten == []
    asyncio.run(made.load(refs["r8"]))  # others still load (r4 makes room)
    assert set(lora.by_ref) == {refs["r8"]}


def test_a_budget_below_the_smallest_adapter_is_an_error_naming_the_field(setup):
    base = setup[0]
    floor = smallest_adapter_bytes(base.model)
    linear = min((m for m in base.model.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.in_features)
    assert floor <= (linear.in_features + linear.out_features) * 4
    assert memory_budget("max_adapter_memory", floor, "cpu", floor) == floor
    with pytest.raises(ValueError, match=r"max_adapter_memory: 100 bytes cannot hold even the smallest adapter"):
        memory_budget("max_adapter_memory", 100, "cpu", floor)
    with pytest.raises(ValueError, match=r"host_adapter_memory: 1e-12 of free memory"):
        memory_budget("host_adapter_memory", 1e-12, "cpu", floor)
    assert memory_budget("max_adapter_memory", 0.5, "cpu", floor) > floor


def test_a_per_request_merge_is_held_inside_the_byte_budget_and_forgotten_when_pushed_out(setup):
    _, store, refs, _ = setup
    by_name = sizes(setup)
    merged_bytes = by_name["r2"] + by_name["r4"]  # the exact sum of r2 and r4: rank 6 on the same modules
    made, lora, _, _ = tiers(setup, device_budget=by_name["r16"], max_adapters=1)  # = merge + r8 + r2
    built: list[str] = []

    async def source(ref: str):
        built.append(ref)
        stored = store.open(ref)
        return stored.config, stored.tensors

    merges = MergeCache(lora, 4, source, made)
    recipe = Recipe(((refs["r2"], 1.0), (refs["r4"], 1.0)))

    def serve_merge() -> None:
        slot = asyncio.run(merges.acquire(recipe))
        made.done(recipe_id(recipe))
        lora.unpin([slot])

    serve_merge()
    asyncio.run(made.load(refs["r8"]))  # fits beside the merge, which the count cap (1) does not count
    assert made.device.used == merged_bytes + by_name["r8"] and lora.slot(recipe_id(recipe)) is not None
    asyncio.run(made.load(refs["r2"]))  # the bytes fit; the count cap pushes out r8, not the older merge
    assert set(lora.by_ref) == {recipe_id(recipe), refs["r2"]} and recipe in merges.slots
    asyncio.run(made.load(refs["r16"]))  # r16 needs the whole budget: the bytes push the merge out too
    assert lora.slot(recipe_id(recipe)) is None and recipe not in merges.slots
    assert set(lora.by_ref) == {refs["r16"]} and made.device.used == by_name["r16"]
    serve_merge()  # built again from its sources, pushing r16 out
    assert built == [refs["r2"], refs["r4"]] * 2 and made.device.used == merged_bytes
