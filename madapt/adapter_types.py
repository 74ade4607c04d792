"""Adapter types besides LoRA: how a Ludwig adapter entry of each type becomes PEFT's config class, and what
madapt refuses per type (training strategies, merges), stated once for config validation, training and merging.

LoRA keeps its own path (config.LoraAdapterConfig -> lora.peft_lora_config). Every other type is PEFT's own
config class, built from the Ludwig keys the user set (PEFT's defaults for the rest); PEFT is imported lazily
so that reading a config stays cheap.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from typing import Any

from madapt.compat import peft as peft_internals

PEFT_PREFIX = "base_model.model."
"""How PEFT's state dict names a module: this prefix, then the module's path in the base model."""

TRAINED_TYPES = (
    "adalora",
    "boft",
    "c3a",
    "fourierft",
    "hra",
    "ia3",
    "ln_tuning",
    "loha",
    "lokr",
    "oft",
    "tinylora",
    "vblora",
    "vera",
    "waveft",
)
"""Ludwig's adapter types besides lora that madapt trains, publishes, imports and evaluates."""

PEFT_NAMES: dict[str, dict[str, str]] = {
    "adalora": {"alpha": "lora_alpha", "dropout": "lora_dropout", "delta_t": "deltaT"},
}
"""Ludwig key -> PEFT field where the names differ (per type; every other key keeps its name)."""

LORA_ENTRY_KEYS = ("r", "alpha", "dropout")
"""Keys of madapt's adapter entry that a type passes to PEFT when they are among its Ludwig keys."""

REFUSED_OPTIONS: dict[str, str] = {
    "modules_to_save": "madapt does not train whole copies of base modules; an adapter trained with them elsewhere "
    "is served (madapt adapters import)",
}
"""PEFT options of any type that madapt refuses, with why."""

STRATEGY_REFUSALS: dict[str, dict[str, str]] = {
    "adalora": {
        "fsdp": "AdaLoRA's rank allocation reads every full gradient after each optimizer step, which FSDP shards",
        "deepspeed": "AdaLoRA's rank allocation must run between the optimizer step and zeroing the gradients, "
        "which DeepSpeed's engine does in one call",
    },
    "vblora": {
        "fsdp": "VB-LoRA's vector bank is one parameter shared by every adapted layer, and FSDP's per-layer "
        "sharding cannot shard it twice (fully_shard fails); use ddp or deepspeed",
    },
    "tinylora": {
        "fsdp": "TinyLoRA's trainable vectors live in one table shared by every adapted layer, and FSDP's "
        "per-layer sharding cannot shard it twice (fully_shard fails); use ddp or deepspeed",
    },
}
"""Type -> Ray Train strategy -> why that combination cannot work (each seen failing on the tiny model). Seen
working there with 2 workers, the published adapter reloading to the trained logits: oft and vera on fsdp;
oft, vera, boft, fourierft, hra, loha, lokr, waveft and ln_tuning on fsdp and deepspeed stage 3; ia3 and
vblora on stage 2; adalora on ddp. Trained and published but not reload-checked (their loss hardly moves in
6 steps): c3a on fsdp and stage 3, ia3 on fsdp, tinylora on stage 3."""

MERGEABLE: dict[str, tuple[str, ...]] = {"ia3": ("linear",)}
"""Types besides lora that PEFT's add_weighted_adapter merges, with the combination types it offers them."""


class AdapterTypeError(ValueError):
    """An adapter type's options that PEFT's config class refuses."""


def peft_type(kind: str) -> Any:
    from peft import PeftType

    return PeftType(kind.upper())


def is_layer_tuner(kind: str) -> bool:
    """Whether `kind` names one of PEFT's layer tuners (not prompt learning, not a name PEFT lacks)."""
    from peft import PeftType, PromptLearningConfig

    if kind.upper() not in {str(t.value) for t in PeftType}:
        return False
    return peft_internals.is_layer_tuner(peft_type(kind)) and not issubclass(config_class(kind), PromptLearningConfig)


@functools.cache
def config_class(kind: str) -> type:
    return peft_internals.config_class(peft_type(kind))


def peft_field(kind: str, key: str) -> str:
    return PEFT_NAMES.get(kind, {}).get(key, key)


def option_problems(kind: str, options: Mapping[str, Any]) -> list[str]:
    """Each Ludwig option of `kind` that PEFT's config class does not have, or whose value is of the wrong
    type, as 'key: reason' (the field annotations of PEFT's dataclass decide)."""
    from pydantic import TypeAdapter, ValidationError

    hints = typing.get_type_hints(config_class(kind))
    problems = []
    for key, value in options.items():
        field = peft_field(kind, key)
        if key in REFUSED_OPTIONS:
            problems.append(f"{key}: {REFUSED_OPTIONS[key]}")
        elif field not in hints:
            problems.append(f"{key}: not an option of PEFT's {config_class(kind).__name__}")
        else:
            try:
                TypeAdapter(hints[field]).validate_python(value)
            except ValidationError as error:
                problems.append(f"{key}: {error.errors()[0]['msg']} (PEFT's {field}: {hints[field]})")
    return problems


def build_config(kind: str, options: Mapping[str, Any], target_modules: list[str] | None, **extra: Any) -> Any:
    """PEFT's config for a `kind` adapter from its Ludwig options; AdapterTypeError names what PEFT refused."""
    fields = {peft_field(kind, key): value for key, value in options.items()}
    try:
        return config_class(kind)(task_type="CAUSAL_LM", target_modules=target_modules, **fields, **extra)
    except (TypeError, ValueError) as error:
        raise AdapterTypeError(f"PEFT refuses these {kind} options: {error}") from None


def norm_modules(model: Any) -> list[str]:
    """The base model's normalisation layers by their last name (what ln_tuning adapts by default)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if type(module).__name__.endswith("Norm")}
        - {""}
    )


def tensor_marker(kind: str) -> str:
    """A substring of every tensor name of a `kind` adapter in PEFT's state dict: the tuner's prefix
    (VeRA's shared projections are `vera_A`/`vera_B`, beside its `vera_lambda_*`)."""
    return "vera_" if kind == "vera" else peft_internals.tensor_prefix(peft_type(kind))
