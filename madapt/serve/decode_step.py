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
* fp32 on CPU outside autograd, one new token per row, the KV cache madapt's `GrowingLayer`s as wide as the
  mask says;
* the rows' adapters all gathered LoRA (`multilora.RowView` on the kernel, no rows on the per-adapter path)
  on Linears the loop visits.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from madapt.serve import native
from madapt.serve.cpu_gemm import OneDnnLinear, whole_group
from madapt.serve.decode_attention import KERNEL_ATTENTION
from madapt.serve.kv_cache import GrowingLayer
from madapt.serve.multilora import AdaptedModule, RankProduct, RowView
from madapt.serve.native_layers import NativeAttention, NativeGatedMlp, NativeRMSNorm, same_code

Products = dict[AdaptedModule, list[RankProduct]]

_LLAMA: dict[type, bool] = {}  # per class: is its forward Llama's


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
    layers = _layers(model, tokens, mask, cache, view)
    if layers is None:
        return None
    assert cache is not None  # checked by `_layers`
    products = view.products if view is not None else {}
    decoder = model.model
    rows = len(tokens)
    hidden = decoder.embed_tokens(tokens)
    cos, sin = (t.contiguous() for t in decoder.rotary_emb(hidden[:, None], positions[:, None]))
    allowed = mask.bool()
    for layer, cached in zip(layers, cache.layers, strict=False):
        attention, mlp = layer.self_attn, layer.mlp
        normed = _norm(layer.input_layernorm, hidden)
        query, key, value = _projections((attention.q_proj, attention.k_proj, attention.v_proj), normed, products)
        dim = attention.head_dim
        keys, values, start = cached.room(key, (rows, key.shape[-1] // dim, 1, dim))
        query = torch.ops.madapt_cpu.rotary_cache(
            query[:, None], key[:, None], value[:, None], cos, sin, keys, values, start
        )
        keys, values = cached.grown(rows, start + 1)
        attended = torch.ops.madapt_cpu.decode_attention(
            query.view(rows, -1, dim), keys, values, allowed, attention.scaling
        )
        hidden = hidden + _linear(attention.o_proj, attended.view(rows, -1), products)
        normed = _norm(layer.post_attention_layernorm, hidden)
        gate, up = _projections((mlp.gate_proj, mlp.up_proj), normed, products)
        hidden = hidden + _linear(mlp.down_proj, torch.ops.madapt_cpu.silu_mul(gate, up), products)
    return _linear(model.lm_head, _norm(decoder.norm, hidden), products)


def _layers(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, cache: Cache | None, view: RowView | None
) -> list[LlamaDecoderLayer] | None:
    """The decoder layers the step runs through, where the loop covers this step (the module's docstring)."""
    decoder = getattr(model, "model", None)
    if decoder is None or not (_is_llama(model, LlamaForCausalLM) and _is_llama(decoder, LlamaModel)):
        return None
    layers = list(decoder.layers[: decoder.config.num_hidden_layers])
    if (
        model.config._attn_implementation != KERNEL_ATTENTION
        or not _fp32_cpu(decoder.embed_tokens)
        or torch.is_grad_enabled()
        or tokens.device.type != "cpu"
        or not isinstance(cache, Cache)
        or cache.offloading
        or len(cache.layers) < len(layers)
        or mask.shape != (len(tokens), _width(cache) + 1)
    ):
        return None
    visited: set[nn.Module] = set()
    for layer, cached in zip(layers, cache.layers, strict=False):
        if not _layer_covered(layer, cached, (len(tokens), mask.shape[1] - 1), visited):
            return None
    if not (_linears_covered([model.lm_head], visited) and _norm_covered(decoder.norm)):
        return None
    if view is not None and (view.groups or (view.products and not view.kernel) or not view.products.keys() <= visited):
        return None
    return layers


def _layer_covered(layer: nn.Module, cached: object, shape: tuple[int, int], visited: set[nn.Module]) -> bool:
    """Whether the loop covers `layer`: Llama's, on the kernels, its cache `shape` (rows, columns) wide."""
    rows, width = shape
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (
        _is_llama(layer, LlamaDecoderLayer)
        and isinstance(attention, NativeAttention)
        and isinstance(mlp, NativeGatedMlp)
        and _norm_covered(layer.input_layernorm)
        and _norm_covered(layer.post_attention_layernorm)
        and attention.head_dim in native.HEAD_DIMS
        and type(cached) is GrowingLayer
        and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (cached.keys, cached.values))
        and cached.keys.shape[::2] == cached.values.shape[::2] == (rows, width)
        and _linears_covered(
            [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, *_mlp_linears(mlp)], visited
        )
    )


def _mlp_linears(mlp: nn.Module) -> list[nn.Module]:
    return [mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def _linears_covered(linears: list[nn.Module], visited: set[nn.Module]) -> bool:
    """Each a oneDNN Linear with an fp32 CPU weight, or one wrapped for adapters (then noted in `visited`)."""
    for linear in linears:
        base = linear.base if type(linear) is AdaptedModule else linear
        if not (isinstance(base, OneDnnLinear) and _fp32_cpu(base)):
            return False
        if base is not linear:
            visited.add(linear)
    return True


def _norm_covered(norm: nn.Module) -> bool:
    return isinstance(norm, NativeRMSNorm) and _fp32_cpu(norm)


def _fp32_cpu(module: nn.Module) -> bool:
    """Whether `module`'s weight (its base's, if wrapped for adapters) is fp32 on CPU."""
    weight = getattr(module.base if type(module) is AdaptedModule else module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.device.type == "cpu"


def _width(cache: Cache) -> int:
    keys = getattr(cache.layers[0], "keys", None) if cache.layers else None
    return keys.shape[2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else -1


def _is_llama(module: object, llama: type) -> bool:
    cls = type(module)
    if cls not in _LLAMA:
        _LLAMA[cls] = isinstance(module, llama) and same_code(cls, llama)
    return _LLAMA[cls]


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.madapt_cpu.rms_norm(x, norm.weight, norm.variance_epsilon)


def _projections(linears: tuple[nn.Module, ...], x: torch.Tensor, products: Products) -> list[torch.Tensor]:
    """Linears reading the same `x`: one GEMM where they are one `SiblingGroup`, each plus its rows' adapters."""
    bases = [linear.base if type(linear) is AdaptedModule else linear for linear in linears]
    group = whole_group(bases)
    outputs = group.outputs(x) if group is not None else [base.onednn(x) for base in bases]
    return [_adapted(linear, x, y, products) for linear, y in zip(linears, outputs, strict=True)]


def _linear(linear: nn.Module, x: torch.Tensor, products: Products) -> torch.Tensor:
    base = linear.base if type(linear) is AdaptedModule else linear
    return _adapted(linear, x, base.onednn(x), products)


def _adapted(linear: nn.Module, x: torch.Tensor, y: torch.Tensor, products: Products) -> torch.Tensor:
    """`y` plus each rank class's LoRA product on its rows (`multilora`'s decode-step kernel)."""
    for product in products.get(linear, ()):
        y = torch.ops.madapt_cpu.lora_products(y, x, product.a, product.b, product.rows)
    return y
