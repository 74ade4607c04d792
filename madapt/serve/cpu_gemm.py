"""The base model's fp32 `nn.Linear`s on CPU through oneDNN's matmul instead of MKL's, on weights prepacked
into oneDNN's blocked layout.

torch runs an fp32 `F.linear` on CPU through MKL's sgemm. On the project's AMD EPYC (AVX-512) that reaches
~120 GFLOP/s at a decode step's shapes (32 rows x SmolLM2's 576-1536 features) and 70 GFLOP/s on its
49k-token output head, where oneDNN's kernel (`torch.ops.mkldnn._linear_pointwise`, the one inductor and
vLLM's CPU backend call) reaches 150-200 on the same plain weight. Handed a copy of the weight reordered
once into oneDNN's blocked layout for the decode batch (`torch.ops.mkldnn._reorder_linear_weight`, what
vLLM's `create_onednn_mm` does), the kernel skips that reorder at every call: another 12-23% one kernel
at a time, 4-12% end to end on a batch of 32 rows (docs/serving.md), whose weights stream from memory.
The copy costs a second copy of the base's Linears in memory (`prepack=False`: none); the weight stays the
module's own tensor (tied embeddings, merges and PEFT layers over it see no change), and a weight changed
in place or replaced is packed again. oneDNN also gives a row the same result alone as in any batch,
packed or not, where MKL's differs in the last bits by batch size, so a row's greedy tokens do not depend
on who shares its batch through the base.

Linears of one module that read the same input (attention's `q_proj`, `k_proj`, `v_proj`; a gated MLP's
`gate_proj`, `up_proj`) run as one GEMM on their weights packed side by side, as vLLM's fused `qkv_proj`
and `gate_up_proj` do: a few larger GEMMs instead of many small ones, ~10% of the base's GEMM time at a
decode step on the project's machine, whose output columns oneDNN computes bit for bit as the separate
GEMMs do (the reduction runs over the same inputs in the same order). The first of them called on an input
computes every member's output; the others, called on the same tensor (as every transformers model calls
them), take theirs; called on another input, a member computes again. Models that fuse these themselves
(Phi-3's `qkv_proj`) have nothing to group.

Only what oneDNN computes exactly as `F.linear` would (same maths, different rounding) is routed: a plain
`nn.Linear` (not a quantized subclass) with an fp32 weight on CPU, in a forward without autograd; anything
else (training, another dtype or device) takes `F.linear` as before.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.nn import functional

PACKED_FOR_ROWS = 32
"""The batch size the packed layout is chosen for (vLLM's choice); any other runs on it, as fast or nearly."""
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Children of one module that read the same input, by name."""


class OneDnnLinear(nn.Linear):
    """An `nn.Linear` whose forward runs on oneDNN; a base Linear becomes one by a class swap, so its
    weight, state dict and copies (PEFT's `detached_copy` twins keep their own weight) stay as they were."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autograd = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        if autograd or x.dtype != torch.float32 or x.device.type != "cpu":
            return functional.linear(x, self.weight, self.bias)
        return self.onednn(x)

    def onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.kernel_weight(), self.bias, "none", [], "")

    def kernel_weight(self) -> torch.Tensor:
        return self.weight


class PackedOneDnnLinear(OneDnnLinear):
    """A `OneDnnLinear` that hands oneDNN its weight reordered once (kept beside the module's own weight, not
    in its state dict), packed again when the weight is replaced or changed in place."""

    def kernel_weight(self) -> torch.Tensor:
        weight = self.weight
        key = (weight.data_ptr(), _version(weight))
        held = self.__dict__.get("_packed")
        if held is None or held[0] != key:
            held = (key, _pack(weight))
            self.__dict__["_packed"] = held
        return held[1]


class FusedOneDnnLinear(OneDnnLinear):
    """A member of a `SiblingGroup`: its output is its columns of the group's GEMM. A copy of a member (PEFT's
    `detached_copy` twin of a base layer) on the same weight takes the same columns; one whose weight or bias
    is its own runs oneDNN on them."""

    def onednn(self, x: torch.Tensor) -> torch.Tensor:
        group, position = self.__dict__["_group"]
        member = group.members[position]
        if member is not self and not (_same(member.weight, self.weight) and _same(member.bias, self.bias)):
            return super().onednn(x)
        return group.output(position, x)


class SiblingGroup:
    """Linears of one module that read the same input, run as one GEMM on their weights packed side by side
    (packed again when any of their weights or biases is replaced or changed in place). What the first
    member called on an input computed for the others waits for them per thread, beside that input."""

    def __init__(self, members: list[nn.Linear]):
        self.members = members
        self.sizes = [member.out_features for member in members]
        self.waiting = threading.local()
        self.packed: tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None] | None = None

    def output(self, position: int, x: torch.Tensor) -> torch.Tensor:
        """Member `position`'s output for `x`: waiting since another member computed them all on `x`, or
        computed now (the others' then wait)."""
        held: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = getattr(self.waiting, "outputs", None)
        if held is not None and held[0] is x and position in held[1]:
            mine = held[1].pop(position)
            if not held[1]:
                self.waiting.outputs = None
            return mine
        others = dict(enumerate(self.outputs(x)))
        mine = others.pop(position)
        self.waiting.outputs = (x, others)
        return mine

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's output for `x`, in order, from one GEMM (views of its output's columns)."""
        weight, bias = self.kernel_weights()
        outputs: tuple[torch.Tensor, ...] = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "").split(
            self.sizes, dim=-1
        )
        return outputs

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        tensors = [t for m in self.members for t in (m.weight, m.bias) if t is not None]
        key = tuple(part for t in tensors for part in (t.data_ptr(), _version(t)))
        if self.packed is None or self.packed[0] != key:
            weight = _pack(torch.cat([m.weight.detach() for m in self.members]))
            biases = [m.bias.detach() for m in self.members if m.bias is not None]
            self.packed = (key, weight, torch.cat(biases) if biases else None)
        return self.packed[1], self.packed[2]


def whole_group(linears: list[nn.Module]) -> SiblingGroup | None:
    """The `SiblingGroup` that is exactly these Linears, in order, or None (not fused, or fused otherwise)."""
    held = linears[0].__dict__.get("_group") if type(linears[0]) is FusedOneDnnLinear else None
    if held is None or len(held[0].members) != len(linears):
        return None
    group: SiblingGroup = held[0]
    return group if all(m is linear for m, linear in zip(group.members, linears, strict=True)) else None


def use_onednn(model: nn.Module, on: bool = True, *, prepack: bool = True) -> int:
    """Route `model`'s plain fp32 CPU Linears through oneDNN (`on`; `prepack`: on copies of their weights
    packed here, siblings fused) or back to `F.linear`; returns how many Linears that is. Wrapped ones
    (`AdaptedModule.base`, PEFT's `base_layer`) are children too."""
    if on and not torch.backends.mkldnn.is_available():
        return 0
    routed = (nn.Linear, OneDnnLinear, PackedOneDnnLinear, FusedOneDnnLinear)
    linears = [m for m in model.modules() if type(m) in routed and fp32_on_cpu(m.weight)]
    for linear in linears:
        linear.__class__ = (PackedOneDnnLinear if prepack else OneDnnLinear) if on else nn.Linear
        linear.__dict__.pop("_packed", None)
        linear.__dict__.pop("_group", None)
    if on and prepack:
        for group in sibling_groups(model):
            for position, member in enumerate(group.members):
                member.__class__ = FusedOneDnnLinear
                member.__dict__["_group"] = (group, position)
            group.kernel_weights()  # now, not at the first request: its memory is there before budgets count
        for linear in linears:
            if type(linear) is PackedOneDnnLinear:
                linear.kernel_weight()
    return len(linears)


def sibling_groups(model: nn.Module) -> list[SiblingGroup]:
    """Each module's `SIBLINGS` that are all packed oneDNN Linears (wrapped or not) on one input size, with
    a bias each or none."""
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [_linear(getattr(parent, name, None)) for name in names]
            linears = [m for m in members if isinstance(m, nn.Linear) and type(m) is PackedOneDnnLinear]
            one_input = len({m.in_features for m in linears}) == 1 and len({m.bias is None for m in linears}) == 1
            if len(linears) == len(names) and one_input:
                groups.append(SiblingGroup(linears))
    return groups


def _linear(child: object) -> object:
    """A child Linear, or the Linear a wrapper (`AdaptedModule.base`, PEFT's `base_layer`) calls on its input."""
    for wrapped in ("base", "base_layer"):
        inner = getattr(child, wrapped, None)
        if isinstance(inner, nn.Linear):
            return inner
    return child


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same tensor data (a copy's new Parameter over the same storage counts)."""
    if a is None or b is None:
        return a is b
    return bool(a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS)


def fp32_on_cpu(weight: object) -> bool:
    """Whether `weight` is an fp32 tensor on CPU: what oneDNN's Linears and madapt's kernels take."""
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.is_cpu


def _version(weight: torch.Tensor) -> int:
    """The weight's in-place change counter (an inference tensor has none: -1, it is not changed in place
    outside inference mode)."""
    return -1 if weight.is_inference() else weight._version
