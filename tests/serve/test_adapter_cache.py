"""The byte-budget cache policy (madapt.serve.adapter_cache): what is evicted, in which order, and why."""

from __future__ import annotations

import pytest

from madapt.serve.adapter_cache import AdapterCache, TooLarge, parse_bytes


def test_equal_costs_and_sizes_evict_in_lru_order():
    cache: AdapterCache[str] = AdapterCache(budget=300)
    for key in "abc":
        cache.admit(key, 100, 1.0, key)
    assert cache.get("a") == "a"  # a is now the most recent
    assert [key for key, _ in cache.admit("d", 100, 1.0, "d")] == ["b"]
    assert [key for key, _ in cache.admit("e", 100, 1.0, "e")] == ["c"]
    assert set(cache.entries) == {"a", "d", "e"}


def test_admission_evicts_until_the_new_entry_fits_by_bytes():
    cache: AdapterCache[str] = AdapterCache(budget=1000)
    for key in "abcd":
        cache.admit(key, 250, 1.0, key)
    evicted = cache.admit("big", 600, 1.0, "big")
    assert [key for key, _ in evicted] == ["a", "b", "c"]
    assert cache.used == 850 and set(cache.entries) == {"d", "big"}


def test_an_entry_costly_to_reload_outlives_cheaper_ones_touched_as_recently():
    cache: AdapterCache[str] = AdapterCache(budget=300)
    cache.admit("slow", 100, 5.0, "slow")  # 5 s to reload: from a remote store, or a PEFT-path adapter
    cache.admit("fast1", 100, 0.1, "fast1")
    cache.admit("fast2", 100, 0.1, "fast2")
    assert [key for key, _ in cache.admit("x", 100, 0.1, "x")] == ["fast1"]  # not slow, the least recent
    assert [key for key, _ in cache.admit("y", 100, 0.1, "y")] == ["fast2"]
    # aging: each eviction raises the clock to the victim's priority, so untouched entries go in the end
    for n in range(200):
        cache.admit(f"z{n}", 100, 0.1, "z")
    assert "slow" not in cache


def test_count_cap_holds_beside_the_byte_budget():
    cache: AdapterCache[str] = AdapterCache(budget=10_000, max_entries=2)
    cache.admit("a", 10, 1.0, "a")
    cache.admit("b", 10, 1.0, "b")
    assert [key for key, _ in cache.admit("c", 10, 1.0, "c")] == ["a"]
    assert len(cache) == 2 and cache.used == 20


def test_pinned_entries_go_last():
    cache: AdapterCache[str] = AdapterCache(budget=200)
    cache.admit("running", 100, 1.0, "running")
    cache.admit("idle", 100, 1.0, "idle")
    cache.pin("running")
    assert [key for key, _ in cache.admit("new", 100, 1.0, "new")] == ["idle"]
    cache.pin("new")
    assert [key for key, _ in cache.admit("newer", 100, 1.0, "newer")] == ["running"]  # all pinned: oldest first


def test_an_entry_above_the_whole_budget_is_refused_and_evicts_nothing():
    cache: AdapterCache[str] = AdapterCache(budget=1000)
    cache.admit("a", 600, 1.0, "a")
    with pytest.raises(TooLarge, match=r"'huge'.*1,001 bytes.*max_adapter_memory: 1,000 bytes"):
        cache.admit("huge", 1001, 1.0, "huge")
    assert set(cache.entries) == {"a"} and cache.used == 600


@pytest.mark.parametrize(
    ("given", "expected"),
    [(2048, 2048), ("2GiB", 2 << 30), ("500MB", 500_000_000), ("1.5KiB", 1536), (0.5, 0.5), (1.0, 1.0)],
)
def test_sizes_are_bytes_or_a_fraction_of_free_memory(given, expected):
    assert parse_bytes(given, "max_adapter_memory") == expected


@pytest.mark.parametrize("given", [0, -5, 1.5, 0.0, "2 parsecs", "", True])
def test_bad_sizes_name_the_field(given):
    with pytest.raises(ValueError, match="max_adapter_memory"):
        parse_bytes(given, "max_adapter_memory")


def test_serve_args_take_sizes_and_name_the_field_they_refuse():
    from pydantic import ValidationError

    from madapt.serve.args import ServeArgs

    settings = ServeArgs.model_validate({"max_adapter_memory": "2GiB", "host_adapter_memory": 0.5})
    assert (settings.max_adapter_memory, settings.host_adapter_memory) == (2 << 30, 0.5)
    assert ServeArgs().max_adapters_per_replica is None  # the count cap is optional
    with pytest.raises(ValidationError, match="max_adapter_memory: 'lots' is not a size"):
        ServeArgs.model_validate({"max_adapter_memory": "lots"})


def test_an_uncounted_entry_takes_bytes_but_no_place_under_the_count_cap():
    cache: AdapterCache[str] = AdapterCache(budget=1000, max_entries=1)
    cache.admit("merge", 300, 1.0, "merge", counted=False)  # a per-request merge: bytes only
    cache.admit("a", 300, 1.0, "a")
    assert [key for key, _ in cache.admit("b", 300, 1.0, "b")] == ["a"]  # the older merge frees no place
    assert [key for key, _ in cache.admit("c", 500, 1.0, "c")] == ["merge", "b"]  # bytes first, then the cap
