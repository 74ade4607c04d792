"""Attention for a decode step on CPU: one query token per row, in madapt's C++ kernel or as two small matmuls
on the key-value heads, instead of SDPA's flash kernel.

A decode step attends one new token per row to its cached keys and values. transformers folds the query
heads sharing a key-value head into the query's length (`pack_gqa`) and calls SDPA, whose CPU flash kernel
splits that work into blocks built for long queries: on SmolLM2-135M at 32 rows it took ~0.56 ms a layer,
17 ms of a ~120 ms step, for ~5 MFLOP. The same folded query times the keys, a softmax and a product with
the values (`torch.matmul` over the key-value heads: no `repeat_kv`, no copies) takes a third of that.
A row's result does not depend on the other rows of the batch (each row is its own matmul); masked
columns get the dtype's lowest value, as transformers' eager attention does, so they weigh exactly 0.

madapt's kernel (`madapt.serve.native`, `KERNEL_ATTENTION`) does the same in one pass per row and key-value
head: the scores, a softmax and the weighted values in registers, without the matmuls' per-matrix
overhead: half their time again at a decode step (docs/serving.md). Where the kernel cannot be built or
does not cover a shape (head dims other than `native.HEAD_DIMS`, another dtype, an additive mask), the
matmuls run.

Prefill (several query tokens), training, and layers with extras SDPA handles (a softcap, a position bias,
attention sinks) go to transformers' SDPA as before: `ATTENTION` and `KERNEL_ATTENTION` are registered as
transformers attention implementations whose mask is SDPA's.
"""

from __future__ import annotations

import functools
import logging

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from madapt.serve import native

log = logging.getLogger(__name__)

ATTENTION = "madapt_decode"
KERNEL_ATTENTION = "madapt_decode_kernel"
_SDPA_ONLY = ("softcap", "position_bias", "s_aux", "sinks")


def decode_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    kernel: bool = False,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: `query` `[rows, heads, tokens, dim]`, `key`/`value` `[rows,
    kv heads, columns, dim]`; returns `[rows, tokens, heads, dim]`. `kernel`: madapt's C++ kernel where it
    applies."""
    rows, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    if (
        tokens != 1
        or query.device.type != "cpu"
        or torch.is_grad_enabled()
        or heads % kv_heads
        or key.shape[-1] != value.shape[-1]
        or any(kwargs.get(name) is not None for name in _SDPA_ONLY)
        or (attention_mask is not None and attention_mask.shape[1] != 1)
    ):
        output: torch.Tensor = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )[0]
        return output, None
    scale = dim**-0.5 if scaling is None else scaling
    if kernel and _kernel_applies(query, key, value, attention_mask):
        mask = None if attention_mask is None else attention_mask.reshape(rows, -1).contiguous()
        flat = query.reshape(rows, heads, dim).contiguous()
        return torch.ops.madapt_cpu.decode_attention(flat, key, value, mask, scale).view(rows, 1, heads, dim), None
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2))
    scores.mul_(scale)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(attention_mask)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).reshape(rows, 1, heads, dim), None


def _kernel_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
) -> bool:
    """What the kernel is built for: fp32, a head dim it has, keys and values contiguous in their last
    dimension, a boolean mask or none."""
    return (
        query.dtype == key.dtype == value.dtype == torch.float32
        and query.shape[-1] in native.HEAD_DIMS
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and (
            attention_mask is None
            or (attention_mask.dtype == torch.bool and attention_mask.numel() == query.shape[0] * key.shape[2])
        )
    )


for _name, _forward in [
    (ATTENTION, decode_attention_forward),
    (KERNEL_ATTENTION, functools.partial(decode_attention_forward, kernel=True)),
]:
    AttentionInterface.register(_name, _forward)
    AttentionMaskInterface.register(_name, sdpa_mask)


def use_decode_attention(model: PreTrainedModel, on: bool = True, *, kernel: bool = True) -> str:
    """Switch `model` from SDPA to decode attention (`on`; `kernel`: in madapt's C++ kernel where it builds,
    else as two matmuls) or back to SDPA; returns the attention implementation it now runs. A model on
    another implementation (eager, flash, flex) keeps it."""
    current: str = model.config._attn_implementation
    wanted = (KERNEL_ATTENTION if kernel and native.load() else ATTENTION) if on else "sdpa"
    if current not in ("sdpa", ATTENTION, KERNEL_ATTENTION) or current == wanted:
        return current
    try:
        model.set_attn_implementation(wanted)
    except (ValueError, ImportError) as error:  # a model without the functional attention interface
        log.info("decode attention stays %s: %s", current, error)
    now: str = model.config._attn_implementation
    return now
