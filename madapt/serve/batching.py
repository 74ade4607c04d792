"""Mixed-adapter LoRA forward: every row of a batch runs with its own adapter in one pass.

PEFT's mixed batch (`adapter_names=[...]`) loops over the distinct adapters inside every LoRA layer, so
its cost grows with how many adapters a batch mixes. Here each adapted `nn.Linear` keeps every loaded
adapter's A and B stacked in slots (`A: [slots, in, r]`, `B: [slots, r, out]`, B pre-scaled by alpha/r,
ranks zero-padded to the largest, which changes no product). A batch gathers each row's A and B once
(`begin_batch`), and every forward of that batch, prefill and each decoded token alike, is
`y = base(x) + (x @ A_row) @ B_row` as one `bmm` and one `baddbmm`, whatever the number of adapters:
the plain-torch form of Punica's BGMV. Slot 0 is all zeros: the base model.
"""

from __future__ import annotations

import threading
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
    """A frozen `nn.Linear` plus every loaded adapter's update, selected per row."""

    def __init__(self, base: nn.Linear, slots: int, rank: int):
        super().__init__()
        self.base = base
        weight = base.weight
        self.a = weight.new_zeros(slots, base.in_features, rank)
        self.b = weight.new_zeros(slots, rank, base.out_features)
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None

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
        if self.rows is None:
            return y
        a, b = self.rows
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
        """Gather each row's A/B once for the whole batch (prefill and every decode step)."""
        with self.lock:
            self.pin(slots)
            if all(s == BASE_SLOT for s in slots):
                return  # a base-only batch skips the adapter maths entirely
            index = torch.tensor(slots, device=self._device())
            for layer in self.layers.values():
                layer.rows = (layer.a[index], layer.b[index])

    def end_batch(self, slots: list[int]) -> None:
        with self.lock:
            for layer in self.layers.values():
                layer.rows = None
            self.unpin(slots)

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
        layer = MultiLoraLinear(linear, self.slots, self.rank)  # zeros: adapters loaded so far skip it
        setattr(parent, child, layer)
        self.layers[path] = layer

    def _resize(self, slots: int, rank: int) -> None:
        for layer in self.layers.values():
            layer.resize(slots, rank)
        self.slots, self.rank = slots, rank

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
