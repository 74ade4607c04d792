"""The base's RMSNorm and gated-MLP layers on madapt's C++ kernels (`madapt.serve.native`) in inference on CPU.

Llama's RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`, in fp32) is six tensor ops in transformers, and
its gated MLP's activation (`silu(gate) * up`) two; a decode step runs the norm twice a layer plus once at
the end and the activation once a layer, on a few rows, where the ops' dispatch and memory round trips are
most of the cost. The kernels (`rms_norm`, `silu_mul`) do each in one pass; only rounding differs.

Only layers whose forward is Llama's, bytecode for bytecode (`LlamaRMSNorm`, `LlamaMLP` and the models that
copy them: Mistral, Qwen2, Qwen3, ...), switch, an MLP only when its activation is SiLU: another formula
(Gemma's `1 + weight`, a GELU MLP) keeps its own. A switched layer keeps its class's name and isinstance (a
subclass made per class) and runs its own forward whenever a kernel does not apply (autograd, another
dtype or device).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

_SWITCHED: dict[type, type] = {}


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    autograd = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not autograd and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"


class NativeRMSNorm(nn.Module):
    """Mixed into a switched RMSNorm's class: its forward on `rms_norm`."""

    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _kernel_applies(x, self.weight):
            return super().forward(x)
        return torch.ops.madapt_cpu.rms_norm(x.contiguous(), self.weight, self.variance_epsilon)


class NativeGatedMlp(nn.Module):
    """Mixed into a switched gated MLP's class: its activation on `silu_mul`."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _kernel_applies(x, self.gate_proj.weight):
            return super().forward(x)
        gate, up = self.gate_proj(x), self.up_proj(x)
        width = gate.shape[-1]
        hidden = torch.ops.madapt_cpu.silu_mul(gate.reshape(-1, width), up.reshape(-1, width))
        return self.down_proj(hidden.view(gate.shape))


def use_native_layers(model: nn.Module, on: bool = True) -> int:
    """Switch `model`'s Llama-form RMSNorm and SiLU gated-MLP layers to the kernels (`on`; the caller has
    loaded them) or back; returns how many layers that is."""
    switched = 0
    for module in model.modules():
        cls = type(module)
        native = isinstance(module, NativeRMSNorm | NativeGatedMlp)
        if native and not on:
            module.__class__ = cls.__bases__[1]
            switched += 1
        elif on and native:
            switched += 1
        elif on and (mixin := _mixin(module)) is not None:
            module.__class__ = _switched(cls, mixin)
            switched += 1
    return switched


def _mixin(module: nn.Module) -> type | None:
    """The kernel forward for `module`, or None where its forward is not Llama's."""
    if _same_code(type(module), LlamaRMSNorm):
        return NativeRMSNorm
    silu = isinstance(getattr(module, "act_fn", None), SiLUActivation | nn.SiLU)
    return NativeGatedMlp if silu and _same_code(type(module), LlamaMLP) else None


def _same_code(cls: type, llama: type) -> bool:
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    expected = llama.forward.__code__  # type: ignore[attr-defined]
    fields = ("co_code", "co_consts", "co_names")
    return code is not None and all(getattr(code, f) == getattr(expected, f) for f in fields)


def _switched(cls: type, mixin: type) -> type:
    if cls not in _SWITCHED:
        _SWITCHED[cls] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
    return _SWITCHED[cls]
