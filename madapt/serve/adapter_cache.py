"""Which adapters a replica keeps, by bytes: the cache policy of a replica's device tier and its host tier.

Pure Python (no torch, no Ray), so `madapt bench scale` simulates thousands of replicas' caches with this
very code. A cache holds entries of known size (bytes) and reload cost (seconds: the caller's estimate, for
a replica size x its serving path's measured seconds per byte, `madapt.serve.adapter_tiers`); admitting one
evicts until it fits the byte budget (and, when given, the count cap).

Eviction order is GreedyDual-Size (Cao and Irani, 1997), i.e. LRU weighted by reload cost per byte: an
entry's priority is `clock + cost / size`, set when it is admitted and again on every hit; the entry of lowest
priority goes first, and the clock rises to the evicted priority, so entries not touched for a while age out
whatever their cost. With equal cost per byte this is exactly LRU (a tie goes to the least recently used,
whatever the sizes, which only decide how many must go); an adapter that is slow to reload for
its size (a large PEFT-path adapter, one from a remote store) stays longer than a cheap one touched as
recently. GreedyDual-Size-Frequency (priority scaled by hit count) was not chosen: under a shifting
workload its counts keep yesterday's popular adapters, and plain GDS keeps LRU's behaviour that operators
expect. Pinned entries (adapters with requests running) are evicted only when nothing unpinned is left to
evict; the replica's `MultiLora` then keeps their slots until their rows end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: object, field: str) -> int | float:
    """A size: bytes (an int, or a string such as "2GiB", "500MB", "1024") or a fraction 0 < f <= 1 of free
    memory (a float). Anything else is a ValueError naming `field`."""
    if isinstance(value, str):
        match = SIZE.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in UNITS:
            raise ValueError(f"{field}: {value!r} is not a size (bytes, e.g. 2GiB or 500MB, or a fraction 0 < f <= 1)")
        value = int(float(match.group(1)) * UNITS[unit])
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"{field}: {value} is not a fraction of free memory (0 < f <= 1); give bytes as an int")
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field}: {value!r} must be a positive number of bytes or a fraction 0 < f <= 1")
    return value


class TooLarge(Exception):
    """An entry larger than the whole budget: it can never be cached."""

    def __init__(self, key: str, size: int, budget: int):
        super().__init__(
            f"adapter {key!r} needs {size:,} bytes, more than this replica's whole adapter memory budget "
            f"(max_adapter_memory: {budget:,} bytes)"
        )
        self.key, self.size, self.budget = key, size, budget


@dataclass
class Entry(Generic[T]):
    size: int
    cost: float
    priority: float
    value: T
    used_at: int
    pins: int = 0
    counted: bool = True  # toward `max_entries` (a per-request merge is not: it has its own count cap)


class AdapterCache(Generic[T]):
    """A byte-budgeted GreedyDual-Size cache of `key -> value` (see the module docstring); not thread-safe:
    the replica calls it from its event loop only."""

    def __init__(self, budget: int, max_entries: int | None = None):
        self.budget, self.max_entries = budget, max_entries
        self.entries: dict[str, Entry[T]] = {}
        self.used = 0
        self.clock = 0.0
        self.uses = 0  # a sequence number per admission or hit: among equal priorities, least recent goes first

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> T | None:
        """The value, refreshed as just used; None when absent."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.uses += 1
        entry.priority, entry.used_at = self.clock + entry.cost / max(entry.size, 1), self.uses
        return entry.value

    def make_room(self, key: str, size: int, *, counted: bool = True) -> list[tuple[str, T]]:
        """Evict until `size` more bytes (and, if `counted`, one more entry) fit; returns what was evicted, in
        order. TooLarge when `size` is above the whole budget (nothing is evicted then). A copy of `key` itself
        is dropped."""
        if size > self.budget:
            raise TooLarge(key, size, self.budget)
        self.pop(key)
        evicted = []
        while self.entries and self.used + size > self.budget:
            evicted.append(self._evict())
        while counted and self._full():  # only an entry that counts frees a place under the count cap
            evicted.append(self._evict(counted_only=True))
        return evicted

    def admit(self, key: str, size: int, cost: float, value: T, *, counted: bool = True) -> list[tuple[str, T]]:
        """Add `key` at the priority of a fresh use, making room first (`make_room`); returns what was evicted."""
        evicted = self.make_room(key, size, counted=counted)
        self.uses += 1
        self.entries[key] = Entry(size, cost, self.clock + cost / max(size, 1), value, self.uses, counted=counted)
        self.used += size
        return evicted

    def pop(self, key: str) -> T | None:
        """Remove `key` without aging the clock (it was taken, not evicted)."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        self.used -= entry.size
        return entry.value

    def pin(self, key: str) -> None:
        if key in self.entries:
            self.entries[key].pins += 1

    def unpin(self, key: str) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.pins:
            entry.pins -= 1

    def _full(self) -> bool:
        return self.max_entries is not None and sum(e.counted for e in self.entries.values()) >= self.max_entries

    def _evict(self, *, counted_only: bool = False) -> tuple[str, T]:
        candidates = [key for key, entry in self.entries.items() if entry.counted or not counted_only]
        unpinned = [key for key in candidates if not self.entries[key].pins]
        key = min(unpinned or candidates, key=lambda k: (self.entries[k].priority, self.entries[k].used_at))
        entry = self.entries.pop(key)
        self.used -= entry.size
        self.clock = max(self.clock, entry.priority)
        return key, entry.value
