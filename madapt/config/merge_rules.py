"""The merge rules, stated once for `adapters.merge` and `ensemble:` in a config and for merges built in code
or sent to the merge actor (merge.check_spec), so both refuse the same things with the same words.

They sit below the schema (its validators call them); every other rule is in rules.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import get_args

from madapt import adapter_types
from madapt.config.names import COMBINATION_TYPES, DENSITY_TYPES, MajoritySignMethod

MAJORITY_SIGN_METHODS: tuple[str, ...] = get_args(MajoritySignMethod)
SIGN_TYPES = frozenset({"ties", "ties_svd", "dare_ties", "dare_ties_svd"})
"""Combination types that elect a sign (and so read `majority_sign_method`)."""


def default_density(combination_type: str) -> float:
    """The density a pruning type (one of DENSITY_TYPES) takes when none is given."""
    return 1.0 if combination_type.startswith("magnitude") else 0.7


def merge_problems(
    name: str,
    sources: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    *,
    density: float | None,
    rank: int | None,
    majority_sign_method: str = "total",
) -> list[str]:
    """What is wrong with a merge of `sources` into `name`, as 'message' lines (empty when nothing is)."""
    problems = []
    if combination_type not in COMBINATION_TYPES:
        problems.append(f"unknown combination_type {combination_type!r}; use one of {list(COMBINATION_TYPES)}")
    if not sources:
        problems.append("sources is empty: name at least one adapter")
    if len(set(sources)) != len(sources):
        problems.append("sources lists an adapter twice")
    if name in sources:
        problems.append("the merge cannot be one of its own sources")
    if len(weights) != len(sources):
        problems.append(f"weights has {len(weights)} entries but sources has {len(sources)}: give one per source")
    elif any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        problems.append("weights must be non-negative and finite, with a positive sum")
    if combination_type in DENSITY_TYPES:
        if density is None or not 0 < density <= 1:
            problems.append(f"density must be in (0, 1] for {combination_type}, got {density}")
    elif density is not None:
        problems.append(f"density is only used by {sorted(DENSITY_TYPES)}, not {combination_type!r}")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        methods = list(MAJORITY_SIGN_METHODS)
        problems.append(f"majority_sign_method must be one of {methods}, got {majority_sign_method!r}")
    elif majority_sign_method != "total" and combination_type not in SIGN_TYPES:
        problems.append(f"majority_sign_method is only used by {sorted(SIGN_TYPES)}, not {combination_type!r}")
    if rank is not None and (rank < 1 or not combination_type.endswith(("svd", "exact_linear"))):
        problems.append(f"rank must be >= 1 and only applies to svd types and exact_linear, not {combination_type!r}")
    return problems


def merge_type_problems(kinds: Sequence[str], combination_type: str) -> list[str]:
    """Sources of one merge must share a type that PEFT's add_weighted_adapter merges that way."""
    found = sorted(set(kinds))
    if len(found) > 1:
        return [f"sources mix adapter types {found}: only adapters of one type merge"]
    kind = found[0] if found else "lora"
    if kind == "lora":
        return []
    ways = adapter_types.MERGEABLE.get(kind)
    if ways is None:
        return [f"{kind} adapters cannot be merged (PEFT merges lora and {sorted(adapter_types.MERGEABLE)} only)"]
    if combination_type not in ways:
        return [f"{kind} adapters merge by {list(ways)} only, not {combination_type!r}"]
    return []
