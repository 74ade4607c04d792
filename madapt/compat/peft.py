"""PEFT internals madapt reaches: names below PEFT's public API (its tuner registry, per-type config and
prefix tables, the tuner-layer base class, rank-pattern lookup, CorDA's config and calibration pass) and one
private method (a tuner's target matching). Checked against peft 0.21.2.

PEFT is imported inside each function: reading a config (`madapt validate`) must not load torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def config_class(peft_type: Any) -> Any:
    """PEFT's config class for a PeftType."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]


def tensor_prefix(peft_type: Any) -> str:
    """The prefix of a type's parameter names (`lora_`, `oft_`, ...)."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    return str(PEFT_TYPE_TO_PREFIX_MAPPING[peft_type])


def is_layer_tuner(peft_type: Any) -> bool:
    """Whether a type adapts layers (a tuner PEFT injects), as opposed to prompt learning."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return peft_type in PEFT_TYPE_TO_TUNER_MAPPING


def targeted(config: Any, paths: Iterable[str]) -> list[str]:
    """The module paths a config's tuner would adapt, by PEFT's own matching (a private method of the
    tuner class: target_modules, layers_to_transform, exclude_modules and regexes, as injection decides)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    return [path for path in paths if path and tuner._check_target_module_exists(config, path)]


def is_tuner_layer(module: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def pattern_key(patterns: Iterable[str], module: str) -> str:
    """The key of a rank_pattern/alpha_pattern that applies to `module`, as PEFT picks it."""
    from peft.utils.other import get_pattern_key

    return str(get_pattern_key(patterns, module))


def corda_config() -> Any:
    from peft.tuners.lora.config import CordaConfig

    return CordaConfig()


def corda_preprocess(model: Any, config: Any, run_model: Any) -> None:
    """CorDA's calibration pass over the base, before get_peft_model decomposes it."""
    from peft.tuners.lora.corda import preprocess_corda

    preprocess_corda(model, config, run_model=run_model)
