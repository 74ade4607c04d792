"""The base's RMSNorm, gated-MLP and attention layers on madapt's C++ kernels (`madapt.serve.native`) in
inference on CPU.

Llama's RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`, in fp32) is six tensor ops in transformers, and
its gated MLP's activation (`silu(gate) * up`) two; a decode step runs the norm twice a layer plus once at
the end and the activation once a layer, on a few rows, where the ops' dispatch and memory round trips are
most of the cost. The kernels (`rms_norm`, `silu_mul`) do each in one pass; only rounding differs. The
attention's rotary embedding and its KV cache write (~15 ops a layer) are one `rotary_cache` pass, exact to
the bit, when the cache is the engine's `GrowingLayer`; the attention proper stays the model's
implementation (`madapt.serve.decode_attention` at a decode step).

Only layers whose forward is Llama's, bytecode for bytecode (`LlamaRMSNorm`, `LlamaMLP`, `LlamaAttention`
and the models that copy them: Mistral's and Qwen's norms and MLPs, ...), switch, an MLP only when its
activation is SiLU: another formula (Gemma's `1 + weight`, a GELU MLP) keeps its own. A switched layer
keeps its class's name and isinstance (a subclass made per class) and runs its own forward whenever a
kernel does not apply (autograd, another dtype or device, another cache).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.activations import SiLUActivation
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, eager_attention_forward

from madapt.serve.kv_cache import GrowingLayer

_SWITCHED: dict[type, type] = {}


def _kernel_applies(x: torch.Tensor, other: torch.Tensor) -> bool:
    """Both fp32 on CPU, outside autograd."""
    autograd = torch.is_grad_enabled() and (x.requires_grad or other.requires_grad)
    return not autograd and x.dtype == other.dtype == torch.float32 and x.device.type == other.device.type == "cpu"


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
    act_fn: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # either may be wrapped for adapters: no `.weight`
        if not (_kernel_applies(gate, up) and gate.shape == up.shape):
            return self.down_proj(self.act_fn(gate) * up)  # Llama's forward, as it is
        width = gate.shape[-1]
        hidden = torch.ops.madapt_cpu.silu_mul(gate.reshape(-1, width), up.reshape(-1, width))
        return self.down_proj(hidden.view(gate.shape))


class NativeAttention(nn.Module):
    """Mixed into a switched Llama attention's class: the rotary embedding and the KV cache's write on
    `rotary_cache`, where the cache is madapt's `GrowingLayer` (the engine's); the attention itself is the
    model's attention implementation, as before."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    config: PreTrainedConfig
    head_dim: int
    layer_idx: int
    scaling: float
    attention_dropout: float

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = _growing_layer(cache, self.layer_idx)
        if layer is None or not _rotary_applies(hidden_states, position_embeddings):
            return self._transformers_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        rows, tokens = hidden_states.shape[:2]
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if not query.dtype == key.dtype == value.dtype == torch.float32:  # a base whose projections give another
            return self._transformers_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        assert position_embeddings is not None  # checked by `_rotary_applies`
        cos, sin = position_embeddings
        keys, values, start = layer.room(key, (rows, key.shape[-1] // self.head_dim, tokens, self.head_dim))
        query = torch.ops.madapt_cpu.rotary_cache(
            query, key, value, cos.contiguous(), sin.contiguous(), keys, values, start
        )
        keys, values = layer.grown(rows, start + tokens)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = attend(
            self, query, keys, values, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )
        return self.o_proj(out.reshape(rows, tokens, -1).contiguous()), weights

    def _transformers_forward(self, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        result: tuple[torch.Tensor, torch.Tensor | None] = super().forward(*args, **kwargs)
        return result


def _growing_layer(cache: Cache | None, index: int) -> GrowingLayer | None:
    """Layer `index` of `cache` where it is madapt's `GrowingLayer` on the device (not offloaded), else None."""
    if not isinstance(cache, Cache) or cache.offloading or index >= len(cache.layers):
        return None
    layer = cache.layers[index]
    return layer if type(layer) is GrowingLayer else None


def _rotary_applies(hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, ...] | None) -> bool:
    """What `rotary_cache` is built for: fp32 on CPU, outside autograd."""
    return (
        position_embeddings is not None
        and position_embeddings[0].dtype == position_embeddings[1].dtype == torch.float32
        and hidden_states.dtype == torch.float32
        and hidden_states.device.type == "cpu"
        and not torch.is_grad_enabled()
    )


def use_native_layers(model: nn.Module, on: bool = True) -> int:
    """Switch `model`'s Llama-form RMSNorm, SiLU gated-MLP and attention layers to the kernels (`on`; the
    caller has loaded them) or back; returns how many layers that is."""
    switched = 0
    for module in model.modules():
        cls = type(module)
        native = isinstance(module, NativeRMSNorm | NativeGatedMlp | NativeAttention)
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
    if same_code(type(module), LlamaRMSNorm):
        return NativeRMSNorm
    if same_code(type(module), LlamaAttention):
        return NativeAttention
    silu = isinstance(getattr(module, "act_fn", None), SiLUActivation | nn.SiLU)
    return NativeGatedMlp if silu and same_code(type(module), LlamaMLP) else None


def same_code(cls: type, llama: type) -> bool:
    """Whether `cls`'s forward is `llama`'s, bytecode for bytecode (under transformers' decorators)."""
    forward = getattr(cls, "forward", None)
    code = getattr(inspect.unwrap(forward), "__code__", None) if callable(forward) else None
    expected = inspect.unwrap(llama.forward).__code__  # type: ignore[attr-defined]
    fields = ("co_code", "co_consts", "co_names")
    return code is not None and all(getattr(code, f) == getattr(expected, f) for f in fields)


def _switched(cls: type, mixin: type) -> type:
    if cls not in _SWITCHED:
        _SWITCHED[cls] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
    return _SWITCHED[cls]
