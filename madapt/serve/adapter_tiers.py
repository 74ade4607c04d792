"""A replica's adapter tiers: which adapters hold slots in `MultiLora` (the device tier, bounded by
`max_adapter_memory` and optionally `max_adapters_per_replica`) and whose served tensors wait in host memory
(the host tier, bounded by `host_adapter_memory`), both kept by `madapt.serve.adapter_cache`'s policy.

Kept apart from the Serve deployment so it runs, and is tested, without Ray: the replica hands it how to
fetch an adapter from the registry (`fetch`) and how to take an evicted id out of Serve's multiplexed table
(`forget`), so the router stops sending that id to this replica as soon as its memory is gone.

The host tier is inclusive, as vLLM's `max_cpu_loras`: an adapter read from the store keeps its served
tensors (what `served_adapter` returned, on the CPU) in host memory whether or not it also holds a slot, so
evicting from the device costs no copy back and a re-load from the host skips the registry, the store
read and the verification. Sizes are each adapter's own tensor bytes as served, rank for rank: never padded
to another adapter's rank.

Reload cost is `size x rate`, the rate (seconds per byte) being the one measured on the first load of each
serving path (gathered LoRA, or PEFT's own layers), then kept: a PEFT-path adapter, slower to build per
byte, weighs more than a gathered one of the same size. Not each load's own measured time: its noise would
reorder equal adapters at random, where equal adapters must leave in LRU order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from madapt.serve.adapter_cache import AdapterCache
from madapt.serve.multilora import AdapterMatrices, MultiLora, Served


@dataclass(frozen=True)
class HostCopy:
    """An adapter ready to load into a slot: its resolved ref, served form, default response_format, and
    where it was read from (`store` or `object_store`: the registry's answer)."""

    ref: str
    adapter: Served
    response_format: dict[str, Any] | None
    source: str


def tensor_bytes(value: object) -> int:
    """The bytes of every tensor `value` holds (in its fields, dicts, lists and tuples), each counted once."""
    seen: dict[int, int] = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            seen[id(item)] = item.nbytes
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, field.name) for field in dataclasses.fields(item))
    return sum(seen.values())


class LoadedAdapter:
    """What Serve's multiplexing caches per adapter; `release` (an eviction, or Serve's `__del__`) unloads it."""

    def __init__(
        self,
        lora: MultiLora,
        ref: str,
        slot: int,
        response_format: dict[str, Any] | None,
        on_release: Callable[[], None],
    ):
        self.lora, self.ref, self.slot, self.live, self.on_release = lora, ref, slot, True, on_release
        self.response_format = response_format
        """The constraint its requests get when they name none (from its manifest), or None."""

    def release(self) -> None:
        if self.live:  # once: an eviction or Serve calls it, the garbage collector again later
            self.live = False
            self.lora.unload(self.ref)
            self.on_release()

    def __del__(self) -> None:
        self.release()


@dataclass
class Load:
    """One load: the adapter in its slot, the tier it came from (`host` or `store`) and how long it took."""

    loaded: LoadedAdapter
    tier: str
    seconds: float
    source: str


class AdapterTiers:
    """The device and host tiers of one replica (see the module docstring). Called from one event loop."""

    def __init__(
        self,
        lora: MultiLora,
        *,
        device_budget: int,
        host_budget: int,
        max_adapters: int | None,
        fetch: Callable[[str], Awaitable[HostCopy]],
        forget: Callable[[str], object],
        on_release: Callable[[], None] = lambda: None,
    ):
        self.lora, self.fetch, self.forget, self.on_release = lora, fetch, forget, on_release
        self.device: AdapterCache[LoadedAdapter] = AdapterCache(device_budget, max_adapters)
        self.host: AdapterCache[HostCopy] = AdapterCache(host_budget)
        self.rates: dict[str, float] = {}  # seconds per byte of each serving path's first load
        self.loads: Counter[str] = Counter()  # per tier
        self.fetches: Counter[str] = Counter()  # per ref: reads through the registry

    async def load(self, ref: str) -> Load:
        """Put `ref` into a slot, from the host tier if it is there, else through `fetch`; room is made by
        evicting first. `fetch`'s and
        `MultiLora.load`'s errors pass through (nothing stays admitted then): `adapter_cache.TooLarge` for
        an adapter above the whole device budget."""
        start = time.perf_counter()
        copy, tier = self.host.get(ref), "host"
        if copy is None:
            self.fetches[ref] += 1
            copy, tier = await self.fetch(ref), "store"
        size = tensor_bytes(copy.adapter)
        self._evict(self.device.make_room(ref, size))
        slot = await asyncio.to_thread(self.lora.load, copy.adapter)
        seconds = time.perf_counter() - start
        path = "gathered" if isinstance(copy.adapter, AdapterMatrices) else "peft"
        cost = size * self.rates.setdefault(path, seconds / max(size, 1))
        loaded = LoadedAdapter(self.lora, ref, slot, copy.response_format, self.on_release)
        self._evict(self.device.admit(ref, size, cost, loaded))
        if tier == "store" and size <= self.host.budget:
            self.host.admit(ref, size, cost, copy)
        self.loads[tier] += 1
        return Load(loaded, tier, seconds, "host" if tier == "host" else copy.source)

    async def hold(self, ref: str, adapter: AdapterMatrices, on_release: Callable[[], object]) -> int:
        """Put an adapter built in this replica (a per-request merge) into a slot inside the device budget: it
        pushes others out and is pushed out as they are (then `on_release` tells its owner). It has no host
        copy (its sources do) and does not count toward `max_adapters_per_replica` (merges have their own cap).
        TooLarge when it is above the whole budget."""
        size = tensor_bytes(adapter)
        self._evict(self.device.make_room(ref, size, counted=False))
        start = time.perf_counter()
        slot = await asyncio.to_thread(self.lora.load, adapter)
        cost = size * self.rates.setdefault("gathered", (time.perf_counter() - start) / max(size, 1))

        def released() -> None:
            on_release()
            self.on_release()

        loaded = LoadedAdapter(self.lora, ref, slot, None, released)
        self._evict(self.device.admit(ref, size, cost, loaded, counted=False))
        return slot

    def drop(self, ref: str) -> None:
        """Unload `ref` now (its owner let it go); rows still on it keep its slot until they end."""
        loaded = self.device.pop(ref)
        if loaded is not None:
            loaded.release()

    def use(self, ref: str) -> None:
        """A request of `ref` starts: refresh its priority, and keep it from early eviction until `done`."""
        if self.device.get(ref) is not None:
            self.device.pin(ref)

    def done(self, ref: str) -> None:
        self.device.unpin(ref)

    def _evict(self, evicted: list[tuple[str, LoadedAdapter]]) -> None:
        """Adapters the budget pushed out: out of Serve's table first (routers stop sending them here), then
        out of `MultiLora` (a slot pinned by running rows lives on until they end)."""
        for ref, loaded in evicted:
            self.forget(ref)
            loaded.release()

    def stats(self) -> dict[str, Any]:
        return {
            "bytes": {"device": self.device.used, "host": self.host.used},
            "budget": {"device": self.device.budget, "host": self.host.budget},
            "loads": dict(self.loads),
            "fetches": dict(self.fetches),
        }
