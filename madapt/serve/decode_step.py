"""A Llama model's decode step as one loop over its layers that calls madapt's kernels directly.

With the kernels in place (`madapt.serve.native_layers`, `cpu_gemm`, `decode_attention`, `multilora`), a
batch-32 decode step of SmolLM2-135M on the project's 2-core CPU still spent ~7 ms of ~79 in Python around
its ops: ~430 module calls, transformers' keyword plumbing and output objects per layer, the attention mask
built again every step, each adapted Linear's wrapper. `decode_logits` runs the same ops in the same order
on the same tensors from one loop: the logits and the KV cache are the model forward's to the bit, the step
~9% faster (docs/serving.md).

It covers what it checks before it writes anything (else it returns None and the caller runs the model's
forward, which handles everything):
* the model is transformers' Llama, bytecode for bytecode (`LlamaForCausalLM`, `LlamaModel`,
  `LlamaDecoderLayer`: SmolLM2, Llama 2/3, TinyLlama), its norms, MLPs and attentions switched to the
  kernels, madapt's decode attention kernel its attention implementation, every Linear on oneDNN;
* fp32 on CPU in eval mode outside autograd, one new token per row, the KV cache madapt's `GrowingLayer`s
  as wide as the mask says;
* the rows' adapters all gathered LoRA (`multilora.RowView` on the kernel, no rows on the per-adapter path)
  on Linears the loop visits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from madapt.serve import native
from madapt.serve.cpu_gemm import OneDnnLinear, fp32_on_cpu, whole_group
from madapt.serve.decode_attention import KERNEL_ATTENTION
from madapt.serve.kv_cache import GrowingLayer
from madapt.serve.multilora import AdaptedModule, RankProduct, RowView, kernel_products
from madapt.serve.native_layers import NativeAttention, NativeGatedMlp, NativeRMSNorm, same_code

Products = dict[AdaptedModule, list[RankProduct]]

_LLAMA: dict[type, bool] = {}  # per class: is its forward Llama's


class _Layer(NamedTuple):
    """A decoder layer's parts as the loop uses them, looked up and checked once a step."""

    input_norm: nn.Module
    qkv: tuple[nn.Module, ...]
    attention: nn.Module
    o_proj: nn.Module
    post_norm: nn.Module
    gate_up: tuple[nn.Module, ...]
    down_proj: nn.Module
    cached: GrowingLayer


def decode_logits(
    model: nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache: Cache | None,
    view: RowView | None,
) -> torch.Tensor | None:
    """The next-token logits `[rows, vocab]` of `tokens` (`[rows]`, at `positions`) given `mask` (`[rows,
    columns]`: the cached columns and the new one, 0 for padding) and the rows' adapters (`view`), the new
    keys and values appended to `cache`; None, with nothing written, where the loop does not cover the step."""
    layers = _plan(model, tokens, mask, cache, view)
    if layers is None:
        return None
    products = view.products if view is not None else {}
    decoder = model.model
    rows = len(tokens)
    hidden = decoder.embed_tokens(tokens)
    cos, sin = (t.contiguous() for t in decoder.rotary_emb(hidden[:, None], positions[:, None]))
    allowed = mask.bool()
    normed = _norm(layers[0].input_norm, hidden)
    for layer, following in zip(layers, [*layers[1:], None], strict=True):
        query, key, value = _projections(layer.qkv, normed, products)
        dim = layer.attention.head_dim
        keys, values, start = layer.cached.room(key, (rows, key.shape[-1] // dim, 1, dim))
        query = torch.ops.madapt_cpu.rotary_cache(
            query[:, None], key[:, None], value[:, None], cos, sin, keys, values, start
        )
        keys, values = layer.cached.grown(rows, start + 1)
        attended = torch.ops.madapt_cpu.decode_attention(
            query.view(rows, -1, dim), keys, values, allowed, layer.attention.scaling
        )
        hidden, normed = _add_norm(hidden, _linear(layer.o_proj, attended.view(rows, -1), products), layer.post_norm)
        gate, up = _projections(layer.gate_up, normed, products)
        mlp = _linear(layer.down_proj, torch.ops.madapt_cpu.silu_mul(gate, up), products)
        hidden, normed = _add_norm(hidden, mlp, following.input_norm if following is not None else decoder.norm)
    return _linear(model.lm_head, normed, products)


def _plan(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, cache: Cache | None, view: RowView | None
) -> list[_Layer] | None:
    """The decoder layers' parts, where the loop covers this step (the module's docstring), else None."""
    decoder = getattr(model, "model", None)
    if decoder is None or not (_is_llama(model, LlamaForCausalLM) and _is_llama(decoder, LlamaModel)):
        return None
    if (
        model.config._attn_implementation != KERNEL_ATTENTION
        or not _fp32_cpu(decoder.embed_tokens)
        or model.training
        or torch.is_grad_enabled()
        or not tokens.is_cpu
        or not isinstance(cache, Cache)
        or cache.offloading
        or mask.dim() != 2
        or mask.shape[0] != len(tokens)
    ):
        return None
    shape = (len(tokens), mask.shape[1] - 1)  # the cache's rows and columns, before this step's
    decoder_layers = list(decoder.layers)[: decoder.config.num_hidden_layers]
    if len(cache.layers) < len(decoder_layers):
        return None
    visited: set[nn.Module] = set()
    layers = []
    for layer, cached in zip(decoder_layers, cache.layers, strict=False):
        parts = _layer_parts(layer, cached, shape, visited)
        if parts is None:
            return None
        layers.append(parts)
    if not (_linears_covered([model.lm_head], visited) and _norm_covered(decoder.norm)):
        return None
    if view is not None and (view.groups or (view.products and not view.kernel) or not view.products.keys() <= visited):
        return None
    return layers


def _layer_parts(layer: nn.Module, cached: object, shape: tuple[int, int], visited: set[nn.Module]) -> _Layer | None:
    """`layer`'s parts where the loop covers it: Llama's, on the kernels, its cache `shape` (rows, columns)."""
    children = layer._modules
    attention, mlp = children.get("self_attn"), children.get("mlp")
    if not (
        _is_llama(layer, LlamaDecoderLayer)
        and isinstance(attention, NativeAttention)
        and isinstance(mlp, NativeGatedMlp)
        and attention.head_dim in native.HEAD_DIMS
        and type(cached) is GrowingLayer
        and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (cached.keys, cached.values))
        and cached.keys.shape[::2] == cached.values.shape[::2] == shape
    ):
        return None
    projections, mlp_linears = attention._modules, mlp._modules
    parts = _Layer(
        input_norm=children["input_layernorm"],
        qkv=(projections["q_proj"], projections["k_proj"], projections["v_proj"]),
        attention=attention,
        o_proj=projections["o_proj"],
        post_norm=children["post_attention_layernorm"],
        gate_up=(mlp_linears["gate_proj"], mlp_linears["up_proj"]),
        down_proj=mlp_linears["down_proj"],
        cached=cached,
    )
    linears = [*parts.qkv, parts.o_proj, *parts.gate_up, parts.down_proj]
    covered = _norm_covered(parts.input_norm) and _norm_covered(parts.post_norm)
    return parts if covered and _linears_covered(linears, visited) else None


def _linears_covered(linears: list[nn.Module | None], visited: set[nn.Module]) -> bool:
    """Each a oneDNN Linear with an fp32 CPU weight, or one wrapped for adapters (then noted in `visited`)."""
    for linear in linears:
        base = _base(linear)
        if not (isinstance(base, OneDnnLinear) and _fp32_cpu(base)):
            return False
        if base is not linear:
            visited.add(linear)
    return True


def _norm_covered(norm: nn.Module | None) -> bool:
    return isinstance(norm, NativeRMSNorm) and _fp32_cpu(norm)


def _fp32_cpu(module: nn.Module) -> bool:
    """Whether `module`'s weight (its base's, if wrapped for adapters) is fp32 on CPU (read from the module's
    parameters: `nn.Module.__getattr__` costs more than the rest of the check)."""
    return fp32_on_cpu(_base(module)._parameters.get("weight"))


def _base(module: nn.Module) -> nn.Module:
    """The module itself, or the base module it wraps for adapters."""
    return module.base if type(module) is AdaptedModule else module


def _is_llama(module: object, llama: type) -> bool:
    cls = type(module)
    if cls not in _LLAMA:
        _LLAMA[cls] = isinstance(module, llama) and same_code(cls, llama)
    return _LLAMA[cls]


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.madapt_cpu.rms_norm(x, norm.weight, norm.variance_epsilon)


def _add_norm(hidden: torch.Tensor, delta: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after `delta` is added, and its norm by `norm` (the layer's or the final one)."""
    result: tuple[torch.Tensor, torch.Tensor] = torch.ops.madapt_cpu.add_rms_norm(
        hidden, delta.contiguous(), norm.weight, norm.variance_epsilon
    )
    return result


def _projections(linears: tuple[nn.Module, ...], x: torch.Tensor, products: Products) -> list[torch.Tensor]:
    """Linears reading the same `x`: one GEMM where they are one `SiblingGroup`, each plus its rows' adapters."""
    bases = [_base(linear) for linear in linears]
    group = whole_group(bases)
    outputs = group.outputs(x) if group is not None else [base.onednn(x) for base in bases]
    return [_adapted(linear, x, y, products) for linear, y in zip(linears, outputs, strict=True)]


def _linear(linear: nn.Module, x: torch.Tensor, products: Products) -> torch.Tensor:
    return _adapted(linear, x, _base(linear).onednn(x), products)


def _adapted(linear: nn.Module, x: torch.Tensor, y: torch.Tensor, products: Products) -> torch.Tensor:
    """`y` plus the LoRA products of `linear`'s rank classes, where it is adapted."""
    classes = products.get(linear)
    return kernel_products(x, y, classes) if classes else y
