"""The base's RMSNorm layers on madapt's C++ kernel (`madapt.serve.native`'s `rms_norm`) in inference on CPU.

Llama's RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`, in fp32) is six tensor ops in transformers; a
decode step runs it twice a layer plus once at the end (61 times for SmolLM2-135M) on a few rows, where the
ops' dispatch and memory round trips are most of its ~50 us; the kernel takes a few. Only layers whose
forward is Llama's, bytecode for bytecode (`LlamaRMSNorm` and the models that copy it: Mistral, Qwen2,
Qwen3, Phi-3, ...), switch: another formula (Gemma's `1 + weight`, a norm with a bias) keeps its own. A
switched layer keeps its class's name and isinstance (a subclass made per class), and takes its own forward
whenever the kernel does not apply (autograd, another dtype or device).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

_SWITCHED: dict[type, type] = {}


class NativeRMSNorm(nn.Module):
    """Mixed into a switched layer's class: its forward on the kernel."""

    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autograd = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if autograd or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return torch.ops.madapt_cpu.rms_norm(x.contiguous(), self.weight, self.variance_epsilon)


def use_native_rms_norm(model: nn.Module, on: bool = True) -> int:
    """Switch `model`'s Llama-form RMSNorm layers to the kernel (`on`; the caller has loaded it) or back;
    returns how many layers that is."""
    switched = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, NativeRMSNorm) and not on:
            module.__class__ = cls.__bases__[1]
            switched += 1
        elif on and (isinstance(module, NativeRMSNorm) or _llama_form(cls)):
            module.__class__ = cls if isinstance(module, NativeRMSNorm) else _switched(cls)
            switched += 1
    return switched


def _llama_form(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    code, llama = getattr(forward, "__code__", None), LlamaRMSNorm.forward.__code__
    return code is not None and (code.co_code, code.co_consts, code.co_names) == (
        llama.co_code,
        llama.co_consts,
        llama.co_names,
    )


def _switched(cls: type) -> type:
    if cls not in _SWITCHED:
        _SWITCHED[cls] = type(cls.__name__, (NativeRMSNorm, cls), {"__module__": cls.__module__})
    return _SWITCHED[cls]
