"""Mixed-adapter forward: every row of a batch runs with its own adapter in one pass, at its own rank.

PEFT's mixed batch (`adapter_names=[...]`) loops over the distinct adapters inside every LoRA layer, so
its cost grows with how many adapters a batch mixes. Here each adapted `nn.Linear` keeps every loaded
adapter's factors at that adapter's own rank (`A^T: [in, r]`, `B^T: [r, out]`, B pre-scaled by alpha/r;
rsLoRA and per-module rank_pattern/alpha_pattern fold their own scale in), in the activations' dtype:
a loaded adapter holds exactly its own factors' bytes, never padded to another adapter's rank, and an
unloaded one's are freed (slot 0, the base model, holds none).

A batch gathers each row's A and B once, as the row joins (`RowAdapters.add`), into rank classes per
module: a class stacks the factors of its rows (`[rows, in, r]`, `[rows, r, out]`), and every forward of
the batch, prefill and each decoded token alike, runs one `bmm` pair per class present, `y[rows] +=
(x[rows] @ A) @ B`, whatever the number of adapters: the plain-torch form of Punica's BGMV, segmented by
rank. So a row pays its own adapter's rank: a rank-64 per-request merge beside rank-8 rows costs one
row's rank-64 product, not rank 64 for every row. Rows whose adapter does not adapt a module (base rows
among them) are in none of its classes and skip it; when one class holds every row of the forward in
order, its product runs on `x` as it is (`baddbmm`, no gather or scatter). At a decode step on CPU (one token
per row, fp32) madapt's C++ kernel (`madapt.serve.native`'s `lora_products`) runs each class instead: each
row's A and B streamed once in vector loops, its rows picked and updated in place of the gather and
scatter, a row's result the same in any class and any batch. Classes are exact ranks, not
buckets: a class costs a few kernels per module whatever its size, so buckets would only save something
in batches that mix many distinct ranks, which published adapters rarely do (a project trains with one r;
a merge's rank is the sum of its sources'), while padding within a bucket would make rows pay up to twice
their rank again.

Adapters this form cannot apply exactly (DoRA and other LoRA variants, non-LoRA types: see
`served_adapter`) take the per-adapter path (`madapt.serve.tuners`): their slot holds PEFT's own layer per
target module, and in each wrapped module the rows of such an adapter are picked out (`index_select`), run
through that layer (which includes the base) and put back, while the other rows keep to their rank
classes (such rows are in none). That costs in proportion to those rows; a batch without them pays one
empty check per module. Modules such adapters target that are not Linear (norms for LN tuning) are
wrapped for this routing only. What an adapter saves besides its layers (a trained `lm_head` or
`embed_tokens`, retrained token rows: `madapt.serve.saved_modules`) is routed the same way, the slot's
gathered factors kept in their rank classes.

A running batch's rank classes live in its own `RowAdapters` (buffers with spare capacity), not on the
layers: rows join by copying only their own A/B in, and leave by moving the last rows of their class into
their places (`swap_remove`, for the batch's rows and each class's alike), so the cost of a change is
proportional to the rows that changed. A forward names its rows with `MultiLora.forward_rows(...)`, which
is per thread: two batches on two threads cannot see each other's rows, and a second batch begun on a
thread that is already running one is refused. What a forward of rows `start:stop` multiplies (each
class's slice of factors and where its rows are) is worked out once and kept until the rows change, so a
decode step adds no Python work per row.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator
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
    """One adapter as plain matrices per module path: A^T [in, r] and scaled B^T [r, out], each module at
    its own rank."""

    ref: str
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
    return AdapterMatrices(ref=ref, modules=modules)


class AdaptedModule(nn.Module):
    """A frozen base module plus every loaded adapter's change, selected per row: for a `nn.Linear` (or a
    bitsandbytes 4/8-bit one) each gathered LoRA slot's factors at its own rank (`factors`), kept in the
    activations' dtype (a quantized weight's own is an integer); for any module, PEFT's own layer per slot
    of an adapter on the per-adapter path (`peft`)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        # plain dicts: not parameters or submodules, so never in the model's state
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.peft: dict[int, nn.Module] = {}

    def keep(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> None:
        """Give `slot` these factors (A^T [in, r], scaled B^T [r, out]) on the base weight's device."""
        device = self.base.weight.device
        a, b = pair
        self.factors[slot] = (a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous())

    def drop(self, slot: int) -> None:
        self.factors.pop(slot, None)
        self.peft.pop(slot, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        view = _ACTIVE.view
        if view is None:
            return y
        products = view.products.get(self)
        if products:  # none: no row of this forward has a LoRA adapter on this module
            y = _add_products(x, y, products, kernel=view.kernel)
        for slot, rows in view.groups.items():  # rows on the per-adapter path: PEFT's layer, base included
            layer = self.peft.get(slot)
            if layer is not None:
                y = y.index_copy(0, rows, layer(x.index_select(0, rows)).to(y.dtype))
        return y


@dataclass(frozen=True)
class RankProduct:
    """One rank class's part of a forward: its rows' stacked factors, and which rows of the forward they
    are (None: all of them, in order)."""

    a: torch.Tensor
    b: torch.Tensor
    rows: torch.Tensor | None


def _add_products(x: torch.Tensor, y: torch.Tensor, products: list[RankProduct], *, kernel: bool) -> torch.Tensor:
    """y plus each class's (x @ A) @ B on its own rows; at a decode step in madapt's kernel (`kernel`)."""
    shape = y.shape
    x3, y3 = x.reshape(shape[0], -1, x.shape[-1]), y.reshape(shape[0], -1, shape[-1])
    if kernel and x3.shape[1] == 1 and _kernel_applies(x3, y3):  # one token a row: each row's own BGMV
        return kernel_products(x3[:, 0], y3[:, 0], products).reshape(shape)
    for product in products:
        if product.rows is None:
            y3 = torch.baddbmm(y3, torch.bmm(x3, product.a), product.b)
        else:
            change = torch.bmm(torch.bmm(x3.index_select(0, product.rows), product.a), product.b)
            y3 = y3.index_add(0, product.rows, change)
    return y3.reshape(shape)


def kernel_products(x: torch.Tensor, y: torch.Tensor, products: list[RankProduct]) -> torch.Tensor:
    """y `[rows, out]` plus each class's product on its rows of x `[rows, in]`, in madapt's decode-step kernel
    (`native`'s `lora_products`; fp32 on CPU, outside autograd)."""
    for product in products:
        y = torch.ops.madapt_cpu.lora_products(y, x, product.a, product.b, product.rows)
    return y


def _kernel_applies(x: torch.Tensor, y: torch.Tensor) -> bool:
    """What `native`'s `lora_products` is built for: fp32 activations on CPU, outside autograd (the factors are
    checked once per view: `RowView.kernel`)."""
    return (
        x.dtype == y.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
    )


def _kernel_factors(products: dict[AdaptedModule, list[RankProduct]]) -> bool:
    """Every class's factors fp32 and contiguous, as the kernel takes them."""
    return all(
        p.a.dtype == p.b.dtype == torch.float32 and p.a.is_contiguous() and p.b.is_contiguous()
        for classes in products.values()
        for p in classes
    )


class MultiLora:
    """Owns the adapters' factors and PEFT layers on a base model's adapted modules; thread-safe
    load/unload/gather.

    Loads and unloads come from Serve's multiplexing (any thread); a batch pins the slots its rows use
    so an adapter evicted mid-batch is only freed when the batch ends.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: dict[str, AdaptedModule] = {}
        self.by_ref: dict[str, int] = {}
        self.holders: dict[str, int] = {}  # loads minus unloads per ref: a reload racing an eviction keeps it
        self.pins: dict[int, int] = {}
        self.doomed: set[int] = set()
        self.tuned: set[int] = set()  # slots on the per-adapter path (PEFT's own layers)
        self.lock = threading.RLock()
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # the activations'
        self.kernel = False
        """Decode steps' products in madapt's C++ kernel (`madapt.serve.native`); the `Engine` sets it."""

    def load(self, served: Served) -> int:
        """Put an adapter into a free slot and return the slot: its factors kept on their modules at their own
        rank, or (per-adapter path) PEFT's layers built, outside the lock, on the unwrapped base modules;
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
            used = set(self.by_ref.values()) | self.doomed
            slot = next(s for s in itertools.count(BASE_SLOT + 1) if s not in used)
            for path, pair in gathered.items():
                self.layers[path].keep(slot, pair, self.dtype)
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
        adapters = RowAdapters(self)
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
        """A slot nothing uses any more drops its factors and PEFT layers: their memory is freed now."""
        self.tuned.discard(slot)
        for layer in self.layers.values():
            layer.drop(slot)

    def _base_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Every module of the base model by path, the wrapped ones unwrapped (their wrappers' insides and
        PEFT's layers are not modules of the base)."""
        for path, module in self.model.named_modules():
            if any(path.startswith(wrapped + ".") for wrapped in self.layers):
                continue
            yield path, module.base if isinstance(module, AdaptedModule) else module

    def _wrap(self, path: str, *, gathered: bool) -> None:
        """Wrap the module at `path` (once); a LoRA adapter's factors (`gathered`) need a Linear there."""
        wrapped = self.layers.get(path)
        module = wrapped.base if wrapped is not None else self._module(path)
        if gathered and not isinstance(module, nn.Linear):
            raise UnsupportedAdapter(f"module {path!r} is a {type(module).__name__}, not a Linear")
        if wrapped is None:
            parent_path, _, child = path.rpartition(".")
            self.layers[path] = AdaptedModule(module)
            setattr(self.model.get_submodule(parent_path), child, self.layers[path])

    def _module(self, path: str) -> nn.Module:
        parent_path, _, child = path.rpartition(".")
        try:
            module: nn.Module = getattr(self.model.get_submodule(parent_path), child)
        except AttributeError:
            raise UnsupportedAdapter(f"the base model has no module {path!r} to adapt") from None
        return module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class RowView:
    """What a forward of rows `start:stop` of a running batch computes: per module, each rank class's
    product (`RankProduct`, rows counted from `start`), and the rows of each per-adapter slot."""

    products: dict[AdaptedModule, list[RankProduct]]
    groups: dict[int, torch.Tensor]
    kernel: bool = False
    """Decode steps' products in madapt's C++ kernel (`MultiLora.kernel`)."""


class _Active(threading.local):
    """What the forwards running on this thread use, or None."""

    view: RowView | None = None
    batch: RowAdapters | None = None


_ACTIVE = _Active()


def active_view() -> RowView | None:
    """The rows of the batched forward this thread is in (`MultiLora.forward_rows`, `begin_batch`), or None."""
    return _ACTIVE.view


def swap_remove(count: int, holes: list[int]) -> tuple[list[int], list[int], int]:
    """Where rows go when the rows `holes` of `count` leave: the surviving rows among the last ones move
    into the holes below the new end. Returns (to, from, new count); everything else stays put."""
    gone = set(holes)
    live = count - len(gone)
    to = sorted(h for h in gone if h < live)
    moved = [i for i in range(live, count) if i not in gone]
    return to, moved, live


Indexer = Callable[[list[int], torch.device], torch.Tensor]
"""Row numbers as a tensor on a device (one tensor per distinct list within a view)."""


class RankRows:
    """One module's rows of one rank in a running batch: their factors stacked (`a: [capacity, in, r]`,
    `b: [capacity, r, out]`, spare capacity after the first `len(rows)`) and the batch row of each."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int]):
        self.a = torch.stack([a for a, _ in pairs])
        self.b = torch.stack([b for _, b in pairs])
        self.rows = rows

    def append(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int]) -> None:
        held, needed = len(self.rows), len(self.rows) + len(rows)
        if needed > self.a.shape[0]:
            capacity = max(needed, 2 * self.a.shape[0])
            a, b = self.a.new_empty(capacity, *self.a.shape[1:]), self.b.new_empty(capacity, *self.b.shape[1:])
            a[:held], b[:held] = self.a[:held], self.b[:held]
            self.a, self.b = a, b
        self.a[held:needed] = torch.stack([a for a, _ in pairs])
        self.b[held:needed] = torch.stack([b for _, b in pairs])
        self.rows += rows

    def remove(self, left: set[int], moves: dict[int, int]) -> None:
        """Drop the entries of the batch rows in `left` (swap_remove within the class), then renumber the
        batch rows that `moves` moves."""
        holes = [j for j, row in enumerate(self.rows) if row in left]
        to, moved, live = swap_remove(len(self.rows), holes)
        if to:
            dst = torch.tensor(to, device=self.a.device)
            src = torch.tensor(moved, device=self.a.device)
            self.a[dst], self.b[dst] = self.a[src], self.b[src]
            for d, s in zip(to, moved, strict=True):
                self.rows[d] = self.rows[s]
        self.rows = [moves.get(row, row) for row in self.rows[:live]]

    def product(self, start: int, stop: int, index: Indexer) -> RankProduct | None:
        """This class's part of a forward of batch rows `start:stop` (None: it has no row there)."""
        picked = [j for j, row in enumerate(self.rows) if start <= row < stop]
        if not picked:
            return None
        first, last = picked[0], picked[-1] + 1
        if picked == list(range(first, last)):
            a, b = self.a[first:last], self.b[first:last]
        else:
            a, b = self.a[index(picked, self.a.device)], self.b[index(picked, self.a.device)]
        positions = [self.rows[j] - start for j in picked]
        every = positions == list(range(stop - start))
        return RankProduct(a, b, None if every else index(positions, self.a.device))


class RowAdapters:
    """The gathered A/B of one running batch, in rank classes per module (`RankRows`), with spare
    capacity: a joining row copies its own factors into its classes, a leaving row is replaced by the last
    row, so each change costs only its rows. The rows' slots stay pinned (their weights kept even if
    unloaded) until they leave."""

    def __init__(self, lora: MultiLora):
        self.lora = lora
        self.slots: list[int] = []
        self.adapted = 0  # rows not on the base slot: none, and forwards skip the adapter maths
        self.routed = 0  # rows on a per-adapter slot: none, and forwards skip the routing
        self.classes: dict[AdaptedModule, dict[int, RankRows]] = {}  # per module, by rank
        self.views: dict[tuple[int, int], RowView | None] = {}  # until the rows change

    def add(self, slots: list[int]) -> None:
        """Append rows (in order) using these slots."""
        start = len(self.slots)
        with self.lora.lock:
            self.lora.pin(slots)
            for layer in self.lora.layers.values():
                joining: dict[int, list[int]] = {}  # rank -> rows of this module's factors
                for row, slot in enumerate(slots, start):
                    if slot in layer.factors:
                        joining.setdefault(layer.factors[slot][0].shape[1], []).append(row)
                for rank, rows in joining.items():
                    pairs = [layer.factors[slots[row - start]] for row in rows]
                    classes = self.classes.setdefault(layer, {})
                    if rank in classes:
                        classes[rank].append(pairs, rows)
                    else:
                        classes[rank] = RankRows(pairs, rows)
            self.routed += sum(s in self.lora.tuned for s in slots)
        self.slots.extend(slots)
        self.adapted += sum(s != BASE_SLOT for s in slots)
        self.views = {}

    def remove(self, holes: list[int]) -> None:
        """Drop rows `holes` the way `swap_remove` says (the caller moves its own per-row state alike)."""
        to, moved, live = swap_remove(len(self.slots), holes)
        gone = [self.slots[h] for h in holes]
        left, moves = set(holes), dict(zip(moved, to, strict=True))
        for classes in self.classes.values():
            for rank, rank_rows in list(classes.items()):
                rank_rows.remove(left, moves)
                if not rank_rows.rows:
                    del classes[rank]
        self.classes = {layer: classes for layer, classes in self.classes.items() if classes}
        for d, s in zip(to, moved, strict=True):
            self.slots[d] = self.slots[s]
        del self.slots[live:]
        self.adapted -= sum(s != BASE_SLOT for s in gone)
        self.routed -= sum(s in self.lora.tuned for s in gone)  # still pinned: still tuned
        self.views = {}
        self.lora.unpin(gone)

    def close(self) -> None:
        """Every row leaves."""
        self.lora.unpin(self.slots)
        self.slots, self.adapted, self.routed, self.classes, self.views = [], 0, 0, {}, {}

    def view(self, start: int, stop: int) -> RowView | None:
        """What a forward of rows `start:stop` multiplies (None: base rows only, which skip the adapter
        maths entirely); worked out once per rows and kept until rows join or leave."""
        if (start, stop) not in self.views:
            self.views[(start, stop)] = self._view(start, stop)
        return self.views[(start, stop)]

    def _view(self, start: int, stop: int) -> RowView | None:
        rows = self.slots[start:stop]
        if not self.adapted or all(s == BASE_SLOT for s in rows):
            return None
        made: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

        def index(values: list[int], device: torch.device) -> torch.Tensor:  # one tensor per distinct list
            key = (tuple(values), device)
            if key not in made:
                made[key] = torch.tensor(values, device=device)
            return made[key]

        products: dict[AdaptedModule, list[RankProduct]] = {}
        for layer, classes in self.classes.items():
            for rank_rows in classes.values():
                product = rank_rows.product(start, stop, index)
                if product is not None:
                    products.setdefault(layer, []).append(product)
        groups: dict[int, list[int]] = {}
        if self.routed:
            for i, s in enumerate(rows):
                if s in self.lora.tuned:
                    groups.setdefault(s, []).append(i)
        device = self.lora.device
        kernel = self.lora.kernel and _kernel_factors(products)
        return RowView(products, {s: index(g, device) for s, g in groups.items()}, kernel)
