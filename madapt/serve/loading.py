"""Building a replica's engine from its `ServeArgs`: the base (plain or bitsandbytes-quantized), the
per-row LoRA layer over it and the decode engine. One path for the replica, the benchmarks and the tests.

On a quantized base (`quantization: {bits: 4|8}`) the base layers are bitsandbytes `Linear4bit` /
`Linear8bitLt`; the adapters stay unquantized beside them, in the activations' dtype, as QLoRA trains
them, so each row's update is the same `x @ A @ B` as on a full-precision base.

The adapter memory budgets (`max_adapter_memory`, `host_adapter_memory`) are resolved here too, once, at
start-up: a fraction is of the free memory then (the device's after the base is loaded; host RAM for the
host tier), and a budget below the smallest adapter the base could take (rank 1 on its smallest Linear, in
float32 as served) is refused with an error naming the field, rather than a replica that can serve nothing.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from madapt.models import LoadedBase, load_base
from madapt.serve.args import ServeArgs
from madapt.serve.engine import Engine, StepOptions
from madapt.serve.multilora import MultiLora


def load_engine(settings: ServeArgs) -> tuple[LoadedBase, Engine]:
    """The base model (loaded once, eval mode) and an `Engine` over its `MultiLora`."""
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantization = settings.quantization
    base = load_base(
        settings.base_model,
        dtype=getattr(torch, settings.dtype),
        device=device,
        quantization_bits=quantization.bits if quantization else None,
        quantization_options=quantization.bnb_options() if quantization else None,
    )
    base.model.eval()
    lora = MultiLora(base.model)
    context = getattr(base.model.config, "max_position_embeddings", 2048)
    step = StepOptions(
        settings.onednn_linears,
        settings.onednn_prepack,
        settings.decode_attention,
        settings.native_kernels,
        settings.flat_decode,
    )
    return base, Engine(lora, base.tokenizer, context_length=context, step=step)


def free_memory(device: torch.device | str) -> int:
    """Free bytes on `device` now: CUDA's free memory, else available host RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def smallest_adapter_bytes(model: nn.Module) -> int:
    """The bytes of the smallest adapter `model` could serve: rank 1 on its smallest Linear, float32."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return min((m.in_features + m.out_features) * 4 for m in linears) if linears else 1


def memory_budget(field: str, value: int | float, device: torch.device | str, floor: int) -> int:
    """`value` in bytes (a fraction is of `device`'s free memory now); a ValueError naming `field` when it
    would not hold even the smallest adapter (`floor` bytes)."""
    budget = int(value * free_memory(device)) if isinstance(value, float) else value
    if budget < floor:
        given = f"{value} of free memory = {budget:,} bytes" if isinstance(value, float) else f"{budget:,} bytes"
        raise ValueError(
            f"{field}: {given} cannot hold even the smallest adapter of this base model ({floor:,} bytes: "
            "rank 1 on its smallest Linear, float32); raise it"
        )
    return budget
