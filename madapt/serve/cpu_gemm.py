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

Only what oneDNN computes exactly as `F.linear` would (same maths, different rounding) is routed: a plain
`nn.Linear` (not a quantized subclass) with an fp32 weight on CPU, in a forward without autograd; anything
else (training, another dtype or device) takes `F.linear` as before.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

PACKED_FOR_ROWS = 32
"""The batch size the packed layout is chosen for (vLLM's choice); any other runs on it, as fast or nearly."""


class OneDnnLinear(nn.Linear):
    """An `nn.Linear` whose forward runs on oneDNN; a base Linear becomes one by a class swap, so its
    weight, state dict and copies (PEFT's `detached_copy` twins keep their own weight) stay as they were."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autograd = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        if autograd or x.dtype != torch.float32 or x.device.type != "cpu":
            return functional.linear(x, self.weight, self.bias)
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
            held = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS))
            self.__dict__["_packed"] = held
        return held[1]


def use_onednn(model: nn.Module, on: bool = True, *, prepack: bool = True) -> int:
    """Route `model`'s plain fp32 CPU Linears through oneDNN (`on`; `prepack`: on copies of their weights
    packed here) or back to `F.linear`; returns how many Linears that is. Wrapped ones (`AdaptedModule.base`,
    PEFT's `base_layer`) are children too."""
    if on and not torch.backends.mkldnn.is_available():
        return 0
    routed = (nn.Linear, OneDnnLinear, PackedOneDnnLinear)
    linears = [m for m in model.modules() if type(m) in routed and _fp32_cpu(m)]
    for linear in linears:
        linear.__class__ = (PackedOneDnnLinear if prepack else OneDnnLinear) if on else nn.Linear
        if on and prepack:
            linear.kernel_weight()  # now, not at the first request: its memory is there before budgets count
        else:
            linear.__dict__.pop("_packed", None)
    return len(linears)


def _fp32_cpu(linear: nn.Module) -> bool:
    weight = linear.weight
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.device.type == "cpu"


def _version(weight: torch.Tensor) -> int:
    """The weight's in-place change counter (an inference tensor has none: -1, it is not changed in place
    outside inference mode)."""
    return -1 if weight.is_inference() else weight._version
