"""Attention for a decode step on CPU: one query token per row, as two small matmuls on the key-value
heads instead of SDPA's flash kernel.

A decode step attends one new token per row to its cached keys and values. transformers folds the query
heads sharing a key-value head into the query's length (`pack_gqa`) and calls SDPA, whose CPU flash kernel
splits that work into blocks built for long queries: on SmolLM2-135M at 32 rows it took ~0.56 ms a layer,
17 ms of a ~120 ms step, for ~5 MFLOP. The same folded query times the keys, a softmax and a product with
the values (`torch.matmul` over the key-value heads: no `repeat_kv`, no copies) takes a third of that.
A row's result does not depend on the other rows of the batch (each row is its own matmul); masked
columns get the dtype's lowest value, as transformers' eager attention does, so they weigh exactly 0.

Prefill (several query tokens), training, and layers with extras SDPA handles (a softcap, a position bias,
attention sinks) go to transformers' SDPA as before: `ATTENTION` is registered as a transformers
attention implementation whose mask is SDPA's.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

ATTENTION = "madapt_decode"
_SDPA_ONLY = ("softcap", "position_bias", "s_aux", "sinks")


def decode_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: `query` `[rows, heads, tokens, dim]`, `key`/`value` `[rows,
    kv heads, columns, dim]`; returns `[rows, tokens, heads, dim]`."""
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
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2))
    scores.mul_(dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(attention_mask)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).reshape(rows, 1, heads, dim), None


AttentionInterface.register(ATTENTION, decode_attention_forward)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_decode_attention(model: PreTrainedModel, on: bool = True) -> bool:
    """Switch `model` from SDPA to `ATTENTION` (`on`) or back; whether it now runs `ATTENTION`. A model
    on another attention implementation (eager, flash, flex) keeps it."""
    current: str = model.config._attn_implementation
    wanted = ATTENTION if on else "sdpa"
    if current not in ("sdpa", ATTENTION) or current == wanted:
        return current == ATTENTION
    try:
        model.set_attn_implementation(wanted)
    except (ValueError, ImportError) as error:  # a model without the functional attention interface
        log.info("decode attention stays %s: %s", current, error)
    now: str = model.config._attn_implementation
    return now == ATTENTION
