"""Adapter names and the closed sets of words a config chooses from (merge combination types, strategies).

Store, LoRA and release code import this module alone when all they need is `check_adapter_name`.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from madapt.errors import UserError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""Safe adapter names: they become store paths and HTTP model ids, so no separators and no dots."""

SINGLE_ADAPTER_NAME = "default"
"""The name a singular `adapter:` section is trained and published under."""

CombinationType = Literal[
    "linear",
    "svd",
    "cat",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
    "exact_linear",
]
MajoritySignMethod = Literal["total", "frequency"]
"""How TIES elects each entry's sign: by the summed magnitudes (`total`, PEFT's default) or by the count of
sources (`frequency`)."""
Strategy = Literal["fsdp", "ddp", "deepspeed"]
"""How Ray Train spreads one adapter's training over its workers."""
COMBINATION_TYPES: tuple[str, ...] = get_args(CombinationType)
DENSITY_TYPES = frozenset(COMBINATION_TYPES) - {"linear", "svd", "cat", "exact_linear"}
"""Combination types that prune deltas and so take a `density`."""


class InvalidName(UserError, ValueError):
    """An adapter id that is not a safe identifier."""


def check_adapter_name(name: str, what: str = "adapter name") -> str:
    """Refuse names that could escape a directory or break an HTTP model id."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


MAX_ENSEMBLE_MEMBERS = 16
"""The most members an `ensemble:` trains (each is published as `<adapter>-m<i>`)."""


def member_name(adapter: str, index: int) -> str:
    """The published name of ensemble member `index` (1-based) of `adapter`."""
    return f"{adapter}-m{index}"
