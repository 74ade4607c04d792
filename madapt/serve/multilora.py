"""Mixed-adapter forward: every row of a batch runs with its own adapter in one pass.

PEFT's mixed batch (`adapter_names=[...]`) loops over the distinct adapters inside every LoRA layer, so
its cost grows with how many adapters a batch mixes. Here each adapted `nn.Linear` keeps every loaded
adapter's A and B stacked in slots (`A: [slots, in, r]`, `B: [slots, r, out]`, B pre-scaled by alpha/r,
ranks zero-padded to the largest, which changes no product). A batch gathers each row's A and B once
(`RowAdapters.add` as rows join), and every forward of that batch, prefill and each decoded token alike,
is `y = base(x) + (x @ A_row) @ B_row` as one `bmm` and one `baddbmm`, whatever the number of adapters:
the plain-torch form of Punica's BGMV. Slot 0 is all zeros: the base model. rsLoRA and per-module
rank_pattern/alpha_pattern fold their own scale into each module's B, ranks padded: exact too.

Adapters this form cannot apply exactly (DoRA and other LoRA variants, non-LoRA types: see
`served_adapter`) take the per-adapter path (`madapt.serve.tuners`): their slot holds PEFT's own layer per
target module, and in each wrapped module the rows of such an adapter are picked out (`index_select`), run
through that layer (which includes the base) and put back, while the other rows stay on the gathered path
(their slot's gathered A/B are zero). That costs in proportion to those rows; a batch without them pays
one empty check per module. Modules such adapters target that are not Linear (norms for LN tuning) are
wrapped for this routing only. What an adapter saves besides its layers (a trained `lm_head` or
`embed_tokens`, retrained token rows: `madapt.serve.saved_modules`) is routed the same way, the slot's
gathered factors kept.

A running batch's gathered rows live in its own `RowAdapters` (buffers with spare capacity), not on the
layers: rows join by copying only their own A/B in, and leave by moving the last rows into their places
(`swap_remove`), so the cost of a change is proportional to the rows that changed. A forward names its
rows with `MultiLora.forward_rows(...)`, which is per thread: two batches on two threads cannot see each
other's rows, and a second batch begun on a thread that is already running one is refused.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from madapt.compat.peft import pattern_key
from madapt.lora import LORA_A, LORA_B, PEFT_PREFIX
from madapt.serve.saved_modules import WithSaved, saved_layers, split_saved
from madapt.serve.tuners import (
    PeftAdapter,
    UnsupportedAdapter,
    build_layers,
    lora_variants,
    peft_adapter,
    target_paths,
)

BASE_SLOT = 0


@dataclass(frozen=True)
class AdapterMatrices:
    """One adapter as plain matrices per module path: A^T [in, r] and scaled B^T [r, out]."""

    ref: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def gatherable(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the gathered form is exact: plain LoRA (no variant) whose tensors are all A/B factors."""
    if str(config.get("peft_type", "")).upper() != "LORA" or config.get("modules_to_save"):
        return False
    if lora_variants(config):
        return False
    return all(key.endswith(("." + LORA_A, "." + LORA_B)) for key in tensors)


Served = AdapterMatrices | PeftAdapter | WithSaved[AdapterMatrices | PeftAdapter]


def served_adapter(ref: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Served:
    """How a replica serves an adapter: gathered when that is exact, else PEFT's own layers; with what it
    saves besides its layers (modules_to_save, trainable tokens), if anything."""
    config, tensors, saved = split_saved(ref, config, tensors)
    adapter = (
        adapter_matrices(ref, config, tensors) if gatherable(config, tensors) else peft_adapter(ref, config, tensors)
    )
    return WithSaved(adapter, saved) if saved else adapter


def adapter_matrices(ref: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterMatrices:
    """Turn PEFT's adapter_config + state dict into per-module (A^T, scale * B^T), each module with its own
    rank and alpha (rank_pattern/alpha_pattern, matched as PEFT matches them) and PEFT's scale."""
    if not gatherable(config, tensors):
        raise UnsupportedAdapter(f"{ref}: not a plain LoRA adapter of A/B factors")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = {}
    for key, a in tensors.items():
        if not key.endswith(LORA_A):
            continue
        module = key.removesuffix("." + LORA_A).removeprefix(PEFT_PREFIX)
        r = int(rank_pattern.get(pattern_key(rank_pattern.keys(), module), config["r"]))
        alpha = float(alpha_pattern.get(pattern_key(alpha_pattern.keys(), module), config["lora_alpha"]))
        b = tensors.get(key.removesuffix(LORA_A) + LORA_B)
        if b is None or a.shape[0] != r or b.shape[1] != r:
            raise UnsupportedAdapter(f"{ref}: {module} has no matching lora_B of rank {r}")
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        modules[module] = (a.t().float(), (scale * b.float()).t())
    if not modules or len(modules) * 2 != len(tensors):
        raise UnsupportedAdapter(f"{ref}: every lora_A needs its lora_B (found {len(tensors)} tensors)")
    return AdapterMatrices(ref=ref, rank=max(a.shape[1] for a, _ in modules.values()), modules=modules)


class AdaptedModule(nn.Module):
    """A frozen base module plus every loaded adapter's change, selected per row: for a `nn.Linear` (or a
    bitsandbytes 4/8-bit one) the gathered LoRA slot tables, made when a LoRA adapter first adapts it and
    kept in `dtype`, the activations' (a quantized weight's own is an integer); for any module, PEFT's own
    layer per slot of an adapter on the per-adapter path (`peft`)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.peft: dict[int, nn.Module] = {}  # a plain dict: not submodules, so never in the model's state

    def make_tables(self, slots: int, rank: int, dtype: torch.dtype) -> None:
        if self.a is None:
            if not isinstance(self.base, nn.Linear):
                raise UnsupportedAdapter(f"a {type(self.base).__name__} has no LoRA A/B to gather")
            device = self.base.weight.device
            self.a = torch.zeros(slots, self.base.in_features, rank, dtype=dtype, device=device)
            self.b = torch.zeros(slots, rank, self.base.out_features, dtype=dtype, device=device)

    def resize(self, slots: int, rank: int) -> None:
        if self.a is None or self.b is None:
            return
        a = self.a.new_zeros(slots, self.a.shape[1], rank)
        b = self.b.new_zeros(slots, rank, self.b.shape[2])
        a[: self.a.shape[0], :, : self.a.shape[2]] = self.a
        b[: self.b.shape[0], : self.b.shape[1]] = self.b
        self.a, self.b = a, b

    def write(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Give `slot` these gathered factors (None: none), and no PEFT layer."""
        self.peft.pop(slot, None)
        if self.a is None or self.b is None:
            return
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
        pair = view.adapters.buffers.get(self)
        if pair is not None:  # None: no LoRA adapts it, or wrapped after this batch's rows were gathered
            a, b = pair[0][view.start : view.stop], pair[1][view.start : view.stop]
            shape = y.shape
            h = torch.bmm(x.reshape(shape[0], -1, x.shape[-1]), a)
            y = torch.baddbmm(y.reshape(shape[0], -1, shape[-1]), h, b).reshape(shape)
        for slot, rows in view.groups.items():  # rows on the per-adapter path: PEFT's layer, base included
            layer = self.peft.get(slot)
            if layer is not None:
                y = y.index_copy(0, rows, layer(x.index_select(0, rows)).to(y.dtype))
        return y


class MultiLora:
    """Owns the slot tables of a base model's adapted layers; thread-safe load/unload/gather.

    Loads and unloads come from Serve's multiplexing (any thread); a batch pins the slots its rows use
    so an adapter evicted mid-batch is only freed when the batch ends.
    """

    def __init__(self, model: nn.Module, *, slots: int = 4, rank: int = 8):
        self.model = model
        self.layers: dict[str, AdaptedModule] = {}
        self.slots = max(2, slots)
        self.rank = rank
        self.by_ref: dict[str, int] = {}
        self.holders: dict[str, int] = {}  # loads minus unloads per ref: a reload racing an eviction keeps it
        self.pins: dict[int, int] = {}
        self.doomed: set[int] = set()
        self.tuned: set[int] = set()  # slots on the per-adapter path (PEFT's own layers)
        self.lock = threading.RLock()
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # the activations'

    def load(self, served: Served) -> int:
        """Put an adapter into a free slot and return the slot: its matrices stacked once into the gathered
        tables, or (per-adapter path) PEFT's layers built, outside the lock, on the unwrapped base modules;
        what it saves besides (`WithSaved`) built there too and routed like PEFT's layers."""
        adapter, saved = (served.adapter, served.saved) if isinstance(served, WithSaved) else (served, None)
        with self.lock:
            if adapter.ref in self.by_ref:
                self.holders[adapter.ref] += 1
                return self.by_ref[adapter.ref]
            modules = dict(self._base_modules()) if isinstance(adapter, PeftAdapter) or saved else {}
        peft: dict[str, nn.Module] = {}
        if isinstance(adapter, PeftAdapter):  # seconds for a large model: decoding goes on meanwhile
            peft = build_layers(adapter, {p: modules[p] for p in target_paths(adapter, modules.items())})
        peft.update(saved_layers(adapter.ref, saved, modules, self.model) if saved else {})
        with self.lock:
            if adapter.ref in self.by_ref:  # loaded by another thread meanwhile
                self.holders[adapter.ref] += 1
                return self.by_ref[adapter.ref]
            gathered = adapter.modules if isinstance(adapter, AdapterMatrices) else {}
            for path in [*gathered, *peft]:
                self._wrap(path, gathered=path in gathered)
            rank = adapter.rank if isinstance(adapter, AdapterMatrices) else 0
            used = set(self.by_ref.values()) | self.doomed | {BASE_SLOT}
            free = [s for s in range(self.slots) if s not in used]
            if not free or rank > self.rank:
                self._resize(self.slots * 2 if not free else self.slots, max(self.rank, rank))
                free = [s for s in range(self.slots) if s not in used]
            slot = free[0]
            for path, layer in self.layers.items():
                layer.write(slot, gathered.get(path))
            for path, peft_layer in peft.items():
                self.layers[path].peft[slot] = peft_layer
            if peft:
                self.tuned.add(slot)
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
            else:
                self._free(slot)

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
                    if s in self.doomed:
                        self.doomed.discard(s)
                        self._free(s)

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

    def _free(self, slot: int) -> None:
        """A slot nothing uses any more drops its PEFT layers (its gathered rows are rewritten on reuse)."""
        if slot in self.tuned:
            self.tuned.discard(slot)
            for layer in self.layers.values():
                layer.peft.pop(slot, None)

    def _base_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Every module of the base model by path, the wrapped ones unwrapped (their wrappers' insides and
        PEFT's layers are not modules of the base)."""
        for path, module in self.model.named_modules():
            if any(path.startswith(wrapped + ".") for wrapped in self.layers):
                continue
            yield path, module.base if isinstance(module, AdaptedModule) else module

    def _wrap(self, path: str, *, gathered: bool) -> None:
        """Wrap the module at `path` (once), with gathered LoRA tables if `gathered` (Linear only)."""
        if path not in self.layers:
            parent_path, _, child = path.rpartition(".")
            try:
                parent = self.model.get_submodule(parent_path)
                module = getattr(parent, child)
            except AttributeError:
                raise UnsupportedAdapter(f"the base model has no module {path!r} to adapt") from None
            if gathered and not isinstance(module, nn.Linear):
                raise UnsupportedAdapter(f"module {path!r} is a {type(module).__name__}, not a Linear")
            layer = AdaptedModule(module)
            setattr(parent, child, layer)
            self.layers[path] = layer
        if gathered:  # zeros: the adapters loaded before skip it
            self.layers[path].make_tables(self.slots, self.rank, self.dtype)

    def _resize(self, slots: int, rank: int) -> None:
        for layer in self.layers.values():
            layer.resize(slots, rank)
        self.slots, self.rank = slots, rank

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class RowView:
    """The rows `start:stop` of a running batch that a forward computes, and among them (by index from
    `start`) the rows of each per-adapter slot."""

    adapters: RowAdapters
    start: int
    stop: int
    groups: dict[int, torch.Tensor]


class _Active(threading.local):
    """What the forwards running on this thread use, or None."""

    view: RowView | None = None
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
        self.routed = 0  # rows on a per-adapter slot: none, and forwards skip the routing
        self.buffers: dict[AdaptedModule, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, slots: list[int]) -> None:
        """Append rows (in order) using these slots."""
        with self.lora.lock:
            self.lora.pin(slots)
            start = len(self.slots)
            needed = start + len(slots)
            if needed > self.capacity:
                self.capacity = max(needed, 2 * self.capacity)
            for layer in self.lora.layers.values():
                if layer.a is None or layer.b is None:
                    continue
                a, b = self._buffer(layer, layer.a, layer.b, start)
                if any(s != BASE_SLOT for s in slots):
                    index = torch.tensor(slots, device=layer.a.device)
                    a[start:needed] = layer.a[index]
                    b[start:needed] = layer.b[index]
                else:
                    a[start:needed].zero_()
                    b[start:needed].zero_()
            self.routed += sum(s in self.lora.tuned for s in slots)
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
        self.routed -= sum(s in self.lora.tuned for s in gone)  # still pinned: still tuned
        self.lora.unpin(gone)

    def close(self) -> None:
        """Every row leaves."""
        self.lora.unpin(self.slots)
        self.slots, self.adapted, self.routed, self.buffers = [], 0, 0, {}

    def view(self, start: int, stop: int) -> RowView | None:
        rows = self.slots[start:stop]
        if not self.adapted or all(s == BASE_SLOT for s in rows):
            return None  # base-only rows skip the adapter maths entirely
        groups: dict[int, list[int]] = {}
        if self.routed:
            for i, s in enumerate(rows):
                if s in self.lora.tuned:
                    groups.setdefault(s, []).append(i)
        device = self.lora.device
        return RowView(self, start, stop, {s: torch.tensor(g, device=device) for s, g in groups.items()})

    def _buffer(
        self, layer: AdaptedModule, table_a: torch.Tensor, table_b: torch.Tensor, live: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's buffers, (re)made to hold `capacity` rows at the layer's current rank."""
        held = self.buffers.get(layer)
        rank = table_a.shape[2]
        if held is not None and held[0].shape[0] >= self.capacity and held[0].shape[2] == rank:
            return held
        a = table_a.new_zeros(self.capacity, table_a.shape[1], rank)
        b = table_b.new_zeros(self.capacity, rank, table_b.shape[2])
        if held is not None and live:
            r = held[0].shape[2]
            a[:live, :, :r] = held[0][:live]
            b[:live, :r] = held[1][:live]
        self.buffers[layer] = (a, b)
        return a, b
