"""Mixed-adapter LoRA forward: every row of a batch runs with its own adapter in one pass.

PEFT's mixed batch (`adapter_names=[...]`) loops over the distinct adapters inside every LoRA layer, so
its cost grows with how many adapters a batch mixes. Here each adapted `nn.Linear` keeps every loaded
adapter's A and B stacked in slots (`A: [slots, in, r]`, `B: [slots, r, out]`, B pre-scaled by alpha/r,
ranks zero-padded to the largest, which changes no product). A batch gathers each row's A and B once
(`RowAdapters.add` as rows join), and every forward of that batch, prefill and each decoded token alike,
is `y = base(x) + (x @ A_row) @ B_row` as one `bmm` and one `baddbmm`, whatever the number of adapters:
the plain-torch form of Punica's BGMV. Slot 0 is all zeros: the base model.

A running batch's gathered rows live in its own `RowAdapters` (buffers with spare capacity), not on the
layers: rows join by copying only their own A/B in, and leave by moving the last rows into their places
(`swap_remove`), so the cost of a change is proportional to the rows that changed. A forward names its
rows with `MultiLora.forward_rows(...)`, which is per thread: two batches on two threads cannot see each
other's rows, and a second batch begun on a thread that is already running one is refused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from madapt.lora import LORA_A, LORA_B, PEFT_PREFIX, lora_scale

BASE_SLOT = 0


class UnsupportedAdapter(ValueError):
    """An adapter this forward cannot apply exactly (DoRA, per-module ranks, unknown modules)."""


@dataclass(frozen=True)
class AdapterMatrices:
    """One adapter as plain matrices per module path: A^T [in, r] and scaled B^T [r, out]."""

    ref: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def adapter_matrices(ref: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterMatrices:
    """Turn PEFT's adapter_config + state dict into per-module (A^T, scale * B^T)."""
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise UnsupportedAdapter(f"{ref}: {key} is not supported by the batched forward")
    r = int(config["r"])
    scale = lora_scale(config)
    modules = {}
    for key, a in tensors.items():
        if not key.endswith(LORA_A):
            continue
        module = key.removesuffix("." + LORA_A).removeprefix(PEFT_PREFIX)
        b = tensors.get(key.removesuffix(LORA_A) + LORA_B)
        if b is None or a.shape[0] != r or b.shape[1] != r:
            raise UnsupportedAdapter(f"{ref}: {module} has no matching lora_B of rank {r}")
        modules[module] = (a.t().float(), (scale * b.float()).t())
    if not modules:
        raise UnsupportedAdapter(f"{ref}: no LoRA A/B tensors found")
    return AdapterMatrices(ref=ref, rank=r, modules=modules)


class MultiLoraLinear(nn.Module):
    """A frozen `nn.Linear` (or a bitsandbytes 4/8-bit one) plus every loaded adapter's update, selected
    per row. The factors are kept in `dtype`, the activations' (a quantized weight's own is an integer)."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.a = torch.zeros(slots, base.in_features, rank, dtype=dtype, device=device)
        self.b = torch.zeros(slots, rank, base.out_features, dtype=dtype, device=device)

    def resize(self, slots: int, rank: int) -> None:
        a = self.a.new_zeros(slots, self.a.shape[1], rank)
        b = self.b.new_zeros(slots, rank, self.b.shape[2])
        a[: self.a.shape[0], :, : self.a.shape[2]] = self.a
        b[: self.b.shape[0], : self.b.shape[1]] = self.b
        self.a, self.b = a, b

    def write(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        if pair is not None:
            a, b = pair
            self.a[slot, :, : a.shape[1]] = a.to(self.a.dtype)
            self.b[slot, : b.shape[0]] = b.to(self.b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        view = _ACTIVE.view
        if view is None:
            return y
        adapters, start, stop = view
        pair = adapters.buffers.get(self)
        if pair is None:  # wrapped after this batch's rows were gathered: none of them adapts it
            return y
        a, b = pair[0][start:stop], pair[1][start:stop]
        shape = y.shape
        h = torch.bmm(x.reshape(shape[0], -1, x.shape[-1]), a)
        return torch.baddbmm(y.reshape(shape[0], -1, shape[-1]), h, b).reshape(shape)


class MultiLora:
    """Owns the slot tables of a base model's adapted layers; thread-safe load/unload/gather.

    Loads and unloads come from Serve's multiplexing (any thread); a batch pins the slots its rows use
    so an adapter evicted mid-batch is only freed when the batch ends.
    """

    def __init__(self, model: nn.Module, *, slots: int = 4, rank: int = 8):
        self.model = model
        self.layers: dict[str, MultiLoraLinear] = {}
        self.slots = max(2, slots)
        self.rank = rank
        self.by_ref: dict[str, int] = {}
        self.holders: dict[str, int] = {}  # loads minus unloads per ref: a reload racing an eviction keeps it
        self.pins: dict[int, int] = {}
        self.doomed: set[int] = set()
        self.lock = threading.RLock()
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # the activations'

    def load(self, adapter: AdapterMatrices) -> int:
        """Write `adapter` into a free slot (stacking its matrices once) and return the slot."""
        with self.lock:
            if adapter.ref in self.by_ref:
                self.holders[adapter.ref] += 1
                return self.by_ref[adapter.ref]
            for module in adapter.modules:
                self._wrap(module)
            used = set(self.by_ref.values()) | self.doomed | {BASE_SLOT}
            free = [s for s in range(self.slots) if s not in used]
            if not free or adapter.rank > self.rank:
                self._resize(self.slots * 2 if not free else self.slots, max(self.rank, adapter.rank))
                free = [s for s in range(self.slots) if s not in used]
            slot = free[0]
            for path, layer in self.layers.items():
                layer.write(slot, adapter.modules.get(path))
            self.by_ref[adapter.ref] = slot
            self.holders[adapter.ref] = 1
            return slot

    def unload(self, ref: str) -> None:
        with self.lock:
            if ref not in self.by_ref:
                return
            self.holders[ref] -= 1
            if self.holders[ref]:
                return
            del self.holders[ref]
            slot = self.by_ref.pop(ref)
            if self.pins.get(slot):
                self.doomed.add(slot)

    def slot(self, ref: str) -> int | None:
        with self.lock:
            return self.by_ref.get(ref)

    def pin(self, slots: list[int]) -> None:
        """Keep these slots' weights until `unpin`, even if their adapters are unloaded meanwhile."""
        with self.lock:
            for s in slots:
                self.pins[s] = self.pins.get(s, 0) + 1

    def unpin(self, slots: list[int]) -> None:
        with self.lock:
            for s in slots:
                self.pins[s] -= 1
                if not self.pins[s]:
                    del self.pins[s]
                    self.doomed.discard(s)

    def begin_batch(self, slots: list[int]) -> None:
        """Gather each row's A/B once and use them for every forward on this thread until `end_batch`
        (the one-shot form of `RowAdapters` + `forward_rows`). A thread already in a batch is refused."""
        if getattr(_ACTIVE, "batch", None) is not None or _ACTIVE.view is not None:
            raise RuntimeError("this thread is already running a batch; end it first")
        adapters = RowAdapters(self, capacity=len(slots))
        adapters.add(slots)
        _ACTIVE.batch = adapters
        _ACTIVE.view = adapters.view(0, len(slots))

    def end_batch(self, slots: list[int]) -> None:
        adapters: RowAdapters | None = getattr(_ACTIVE, "batch", None)
        _ACTIVE.batch = None
        _ACTIVE.view = None
        if adapters is not None:
            adapters.close()

    @contextmanager
    def forward_rows(self, adapters: RowAdapters, start: int, stop: int) -> Iterator[None]:
        """Run the forwards inside with rows `start:stop` of `adapters`, on this thread only."""
        if _ACTIVE.view is not None:
            raise RuntimeError("this thread is already inside a batched forward")
        _ACTIVE.view = adapters.view(start, stop)
        try:
            yield
        finally:
            _ACTIVE.view = None

    def _wrap(self, path: str) -> None:
        if path in self.layers:
            return
        parent_path, _, child = path.rpartition(".")
        try:
            parent = self.model.get_submodule(parent_path)
            linear = getattr(parent, child)
        except AttributeError:
            raise UnsupportedAdapter(f"the base model has no module {path!r} to adapt") from None
        if not isinstance(linear, nn.Linear):
            raise UnsupportedAdapter(f"module {path!r} is a {type(linear).__name__}, not a Linear")
        layer = MultiLoraLinear(linear, self.slots, self.rank, self.dtype)  # zeros: earlier adapters skip it
        setattr(parent, child, layer)
        self.layers[path] = layer

    def _resize(self, slots: int, rank: int) -> None:
        for layer in self.layers.values():
            layer.resize(slots, rank)
        self.slots, self.rank = slots, rank

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


class _Active(threading.local):
    """What the forwards running on this thread use: (rows' adapters, first row, end row), or None."""

    view: tuple[RowAdapters, int, int] | None = None
    batch: RowAdapters | None = None


_ACTIVE = _Active()


def swap_remove(count: int, holes: list[int]) -> tuple[list[int], list[int], int]:
    """Where rows go when the rows `holes` of `count` leave: the surviving rows among the last ones move
    into the holes below the new end. Returns (to, from, new count); everything else stays put."""
    gone = set(holes)
    live = count - len(gone)
    to = sorted(h for h in gone if h < live)
    moved = [i for i in range(live, count) if i not in gone]
    return to, moved, live


class RowAdapters:
    """The gathered A/B of one running batch, row by row, with spare capacity: a joining row copies its
    own factors in, a leaving row is replaced by the last row, so each change costs only its rows. The
    rows' slots stay pinned (their weights kept even if unloaded) until they leave."""

    def __init__(self, lora: MultiLora, capacity: int = 8):
        self.lora = lora
        self.capacity = max(1, capacity)
        self.slots: list[int] = []
        self.adapted = 0  # rows not on the base slot: none, and forwards skip the adapter maths
        self.buffers: dict[MultiLoraLinear, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, slots: list[int]) -> None:
        """Append rows (in order) using these slots."""
        with self.lora.lock:
            self.lora.pin(slots)
            start = len(self.slots)
            needed = start + len(slots)
            if needed > self.capacity:
                self.capacity = max(needed, 2 * self.capacity)
            for layer in self.lora.layers.values():
                a, b = self._buffer(layer, start)
                if any(s != BASE_SLOT for s in slots):
                    index = torch.tensor(slots, device=layer.a.device)
                    a[start:needed] = layer.a[index]
                    b[start:needed] = layer.b[index]
                else:
                    a[start:needed].zero_()
                    b[start:needed].zero_()
        self.slots.extend(slots)
        self.adapted += sum(s != BASE_SLOT for s in slots)

    def remove(self, holes: list[int]) -> None:
        """Drop rows `holes` the way `swap_remove` says (the caller moves its own per-row state alike)."""
        to, moved, live = swap_remove(len(self.slots), holes)
        gone = [self.slots[h] for h in holes]
        if to:
            dst = torch.tensor(to, dtype=torch.long)
            src = torch.tensor(moved, dtype=torch.long)
            for a, b in self.buffers.values():
                a[dst.to(a.device)] = a[src.to(a.device)]
                b[dst.to(b.device)] = b[src.to(b.device)]
            for d, s in zip(to, moved, strict=True):
                self.slots[d] = self.slots[s]
        del self.slots[live:]
        self.adapted -= sum(s != BASE_SLOT for s in gone)
        self.lora.unpin(gone)

    def close(self) -> None:
        """Every row leaves."""
        self.lora.unpin(self.slots)
        self.slots, self.adapted, self.buffers = [], 0, {}

    def view(self, start: int, stop: int) -> tuple[RowAdapters, int, int] | None:
        if not self.adapted or all(s == BASE_SLOT for s in self.slots[start:stop]):
            return None  # base-only rows skip the adapter maths entirely
        return (self, start, stop)

    def _buffer(self, layer: MultiLoraLinear, live: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's buffers, (re)made to hold `capacity` rows at the layer's current rank."""
        held = self.buffers.get(layer)
        rank = layer.a.shape[2]
        if held is not None and held[0].shape[0] >= self.capacity and held[0].shape[2] == rank:
            return held
        a = layer.a.new_zeros(self.capacity, layer.a.shape[1], rank)
        b = layer.b.new_zeros(self.capacity, rank, layer.b.shape[2])
        if held is not None and live:
            r = held[0].shape[2]
            a[:live, :, :r] = held[0][:live]
            b[:live, :r] = held[1][:live]
        self.buffers[layer] = (a, b)
        return a, b
