"""The base model's fp32 `nn.Linear`s on CPU through oneDNN's matmul instead of MKL's.

torch runs an fp32 `F.linear` on CPU through MKL's sgemm. On the project's AMD EPYC (AVX-512) that reaches
~120 GFLOP/s at a decode step's shapes (32 rows x SmolLM2's 576-1536 features) and 70 GFLOP/s on its
49k-token output head, where oneDNN's kernel (`torch.ops.mkldnn._linear_pointwise`, the one inductor and
vLLM's CPU backend call) reaches 150-200 on the same plain weight: no packed copy, no extra memory, the
weight still the module's own tensor (tied embeddings, merges and PEFT layers over it see no change).
oneDNN also gives a row the same result alone as in any batch, where MKL's differs in the last bits by
batch size, so a row's greedy tokens no longer depend on who shares its batch through the base layers.

Only what oneDNN computes exactly as `F.linear` would (same maths, different rounding) is routed: a plain
`nn.Linear` (not a quantized subclass) with an fp32 weight on CPU, in a forward without autograd; anything
else (training, another dtype or device) takes `F.linear` as before.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class OneDnnLinear(nn.Linear):
    """An `nn.Linear` whose forward runs on oneDNN; a base Linear becomes one by a class swap, so its
    weight, state dict and copies (PEFT's `detached_copy` twins keep their own weight) stay as they were."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autograd = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        if autograd or x.dtype != torch.float32 or x.device.type != "cpu":
            return functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn(model: nn.Module, on: bool = True) -> int:
    """Route `model`'s plain fp32 CPU Linears through oneDNN (`on`) or back to `F.linear`; returns how many
    Linears that is. Wrapped ones (`AdaptedModule.base`, PEFT's `base_layer`) are children too."""
    if on and not torch.backends.mkldnn.is_available():
        return 0
    linears = [m for m in model.modules() if type(m) in (nn.Linear, OneDnnLinear) and _fp32_cpu(m)]
    for linear in linears:
        linear.__class__ = OneDnnLinear if on else nn.Linear
    return len(linears)


def _fp32_cpu(linear: nn.Module) -> bool:
    weight = linear.weight
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.device.type == "cpu"
