"""Building a replica's engine from its `ServeArgs`: the base (plain or bitsandbytes-quantized), the
per-row LoRA layer over it and the decode engine. One path for the replica, the benchmarks and the tests.

On a quantized base (`quantization: {bits: 4|8}`) the base layers are bitsandbytes `Linear4bit` /
`Linear8bitLt`; the adapters stay unquantized beside them, in the activations' dtype, as QLoRA trains
them, so each row's update is the same `x @ A @ B` as on a full-precision base.
"""

from __future__ import annotations

import torch

from madapt.models import LoadedBase, load_base
from madapt.serve.args import ServeArgs
from madapt.serve.engine import Engine
from madapt.serve.multilora import MultiLora


def load_engine(settings: ServeArgs) -> tuple[LoadedBase, Engine]:
    """The base model (loaded once, eval mode) and an `Engine` whose `MultiLora` has room for the LRU."""
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
    lora = MultiLora(base.model, slots=settings.max_adapters_per_replica + 1)
    context = getattr(base.model.config, "max_position_embeddings", 2048)
    return base, Engine(lora, base.tokenizer, context_length=context)
