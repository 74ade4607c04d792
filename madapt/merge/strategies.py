"""Combine published adapters into a new one: every PEFT combination type, plus exact and fast variants.

madapt adds what PEFT leaves to the caller: ranks are harmonised by zero-padding (so the Ludwig
example that merges r=16 with r=8 by `ties` works), DARE's random drop is seeded, every source must
come from the same base model, and an existing target name is refused instead of PEFT's silent no-op.

Two strategies are madapt's own (see lowrank.py): `exact_linear` keeps delta W = sum_i w_i delta W_i exactly,
where PEFT's `linear` adds cross terms; `svd` truncates that exact sum in O(d r^2) per module instead of
PEFT's dense O(d^3) SVD (`engine="peft"` keeps PEFT's path for comparison). Every other type runs PEFT's
`add_weighted_adapter` on a skeleton that has the adapted modules' shapes but no base weights, so a merge
needs the adapter tensors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from peft import PeftModel

from madapt.config import (
    COMBINATION_TYPES,
    CombinationType,
    MajoritySignMethod,
    MergeConfig,
    check_adapter_name,
    merge_problems,
    merge_type_problems,
)
from madapt.errors import UserError
from madapt.lora import LORA_A, LORA_B, PEFT_PREFIX, adapter_kind, attach, extract, pad_rank
from madapt.lowrank import LowRankError, exact_merge, svd_merge
from madapt.store import StoredAdapter

EQUAL_RANK_TYPES = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
"""PEFT combines A and B factor-wise for these, so every source must have the same rank."""

Engine = Literal["madapt", "peft"]


class MergeError(UserError, ValueError):
    """A merge that cannot run; raised before anything is written."""


@dataclass(frozen=True)
class MergeSpec:
    """What to merge. `rank`: output rank of svd types (default: the largest source rank); for
    `exact_linear`, compress the exact sum to this rank with the fast SVD (lossless while rank >= the
    sum's true rank). `engine="peft"` runs `svd` through PEFT's dense SVD instead of madapt's."""

    name: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    combination_type: CombinationType = "linear"
    density: float | None = None
    seed: int = 0
    rank: int | None = None
    engine: Engine = "madapt"
    majority_sign_method: MajoritySignMethod = "total"

    @classmethod
    def from_config(cls, merge: MergeConfig) -> MergeSpec:
        return cls(
            name=merge.name,
            sources=tuple(merge.sources),
            weights=tuple(merge.weights),
            combination_type=merge.combination_type,
            density=merge.density,
            seed=merge.seed,
            rank=merge.rank,
            majority_sign_method=merge.majority_sign_method,
        )


def check_spec(spec: MergeSpec) -> None:
    """Refuse a spec built in code or sent to the actor by the config's own merge rules, before any
    adapter is read."""
    problems = []
    try:
        check_adapter_name(spec.name, "merge name")
    except ValueError as error:
        problems.append(str(error))
    problems += merge_problems(
        spec.name,
        spec.sources,
        spec.weights,
        spec.combination_type,
        density=spec.density,
        rank=spec.rank,
        majority_sign_method=spec.majority_sign_method,
    )
    if spec.engine not in ("madapt", "peft"):
        problems.append(f"engine must be 'madapt' or 'peft', got {spec.engine!r}")
    if problems:
        raise MergeError(f"merge {spec.name!r}: " + "; ".join(problems))


# -- strategies: sources in, (adapter_config, tensors) out ---------------------------------------------


IA3_VECTOR = "ia3_l"
"""The last part of an IA3 vector's name in PEFT's state dict (IA3 merges as PEFT's weighted sum of them)."""


def harmonise_ranks(adapters: Sequence[StoredAdapter], combination_type: str) -> list[StoredAdapter]:
    """Pad every LoRA source to the largest rank where PEFT needs equal ranks; identity otherwise."""
    if combination_type not in EQUAL_RANK_TYPES or adapter_kind(adapters[0].config) != "lora":
        return list(adapters)
    rank = max(int(a.config["r"]) for a in adapters)
    padded = []
    for adapter in adapters:
        config, tensors = pad_rank(adapter.config, adapter.tensors, rank)
        padded.append(StoredAdapter(manifest=adapter.manifest, config=config, tensors=tensors))
    return padded


def adapted_shapes(adapter: StoredAdapter) -> dict[str, tuple[int, int]]:
    """Module path -> (d_out, d_in) of every Linear the adapter adapts, as far as its tensors tell: LoRA's
    factors give both; an IA3 vector is (d_out, 1), or (1, d_in) on a feedforward module, which is all PEFT
    reads of such a module. Sorted: safetensors returns keys in no fixed order, and PEFT draws DARE's masks
    module by module."""
    shapes = {}
    for key, tensor in sorted(adapter.tensors.items()):
        if key.endswith("." + LORA_A):
            d_out = adapter.tensors[key.removesuffix(LORA_A) + LORA_B].shape[0]
            shapes[key.removeprefix(PEFT_PREFIX).removesuffix("." + LORA_A)] = (d_out, tensor.shape[1])
        elif key.endswith("." + IA3_VECTOR):
            shapes[key.removeprefix(PEFT_PREFIX).removesuffix("." + IA3_VECTOR)] = (tensor.shape[0], tensor.shape[1])
    return shapes


def skeleton(adapters: Sequence[StoredAdapter]) -> torch.nn.Module:
    """A module tree with a Linear at every adapted path, shaped from the adapter tensors, holding no weights.

    Each base weight is a zero broadcast to (d_out, d_in): a real CPU tensor of one element, so PEFT
    places the adapters on the CPU while an 8B-shaped skeleton costs no memory.
    """
    root = torch.nn.Module()
    root.name_or_path = adapters[0].config.get("base_model_name_or_path")  # PEFT copies it into the config
    for adapter in adapters:
        zero = next(iter(adapter.tensors.values())).new_zeros(())
        for path, (d_out, d_in) in adapted_shapes(adapter).items():
            parent = root
            *parents, leaf = path.split(".")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            if not hasattr(parent, leaf):
                linear = torch.nn.Linear(1, 1, bias=False)
                linear.weight = torch.nn.Parameter(zero.expand(d_out, d_in), requires_grad=False)
                linear.in_features, linear.out_features = d_in, d_out
                parent.add_module(leaf, linear)
    return root


def merge_into(model: torch.nn.Module, adapters: Sequence[StoredAdapter], spec: MergeSpec) -> PeftModel:
    """Attach the sources to `model` and add the merged adapter `spec.name` beside them with PEFT."""
    if len(adapters) != len(spec.sources):
        raise MergeError(f"merge {spec.name!r}: got {len(adapters)} adapters for {len(spec.sources)} sources")
    peft_model = model
    slot_names = [f"src{i}_{s}" for i, s in enumerate(spec.sources)]
    for adapter, slot in zip(harmonise_ranks(adapters, spec.combination_type), slot_names, strict=True):
        peft_model = attach(peft_model, adapter, slot)
    if spec.name in peft_model.peft_config:
        raise MergeError(f"merge {spec.name!r}: an adapter with that name is already loaded")
    torch.manual_seed(spec.seed)
    if adapter_kind(adapters[0].config) == "ia3":  # a weighted sum of the vectors: PEFT's IA3 takes no options
        peft_model.add_weighted_adapter(adapters=slot_names, weights=list(spec.weights), adapter_name=spec.name)
    else:
        peft_model.add_weighted_adapter(
            adapters=slot_names,
            weights=list(spec.weights),
            adapter_name=spec.name,
            combination_type=spec.combination_type,
            density=spec.density,
            majority_sign_method=spec.majority_sign_method,
            svd_rank=spec.rank,
            # The reduced SVD gives the same truncated factors; PEFT's default (full) is kept for comparisons.
            svd_full_matrices=spec.engine == "peft",
        )
    if spec.name not in peft_model.peft_config:  # PEFT returns silently in some cases
        raise MergeError(f"merge {spec.name!r}: PEFT did not create the merged adapter")
    peft_model.set_adapter(spec.name)
    for slot in slot_names:
        peft_model.delete_adapter(slot)
    return peft_model


def peft_merge(adapters: Sequence[StoredAdapter], spec: MergeSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's add_weighted_adapter on a weightless skeleton; the result keeps the sources' task_type."""
    headless = [StoredAdapter(a.manifest, {**a.config, "task_type": None}, a.tensors) for a in adapters]
    config, tensors = extract(merge_into(skeleton(headless), headless, spec), spec.name)
    return {**config, "task_type": adapters[0].config.get("task_type")}, tensors


def exact_linear(adapters: Sequence[StoredAdapter], spec: MergeSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    sources = [(a.config, a.tensors) for a in adapters]
    if spec.rank is not None:
        return svd_merge(sources, spec.weights, spec.rank)[0]
    return exact_merge(sources, spec.weights)


def lowrank_svd(adapters: Sequence[StoredAdapter], spec: MergeSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    if spec.engine == "peft":
        return peft_merge(adapters, spec)
    rank = spec.rank or max(int(a.config["r"]) for a in adapters)
    return svd_merge([(a.config, a.tensors) for a in adapters], spec.weights, rank)[0]


STRATEGIES: dict[str, Callable[[Sequence[StoredAdapter], MergeSpec], tuple[dict, dict[str, torch.Tensor]]]] = {
    name: peft_merge for name in COMBINATION_TYPES
} | {"exact_linear": exact_linear, "svd": lowrank_svd}
"""combination_type -> strategy. The pruning svd types (ties_svd, dare_*_svd, magnitude_prune_svd) stay
with PEFT: pruning single entries makes the delta full rank, so there is no low-rank shortcut."""


def merge_adapters(
    adapters: Sequence[StoredAdapter], spec: MergeSpec
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The merged adapter as (adapter_config, tensors), from opened sources in `spec.sources` order."""
    check_spec(spec)
    problems = merge_type_problems([adapter_kind(a.config) for a in adapters], spec.combination_type)
    if problems:
        kinds = ", ".join(f"{a.ref} is {adapter_kind(a.config)}" for a in adapters)
        raise MergeError(f"merge {spec.name!r}: {'; '.join(problems)} ({kinds})")
    try:
        return STRATEGIES[spec.combination_type](adapters, spec)
    except LowRankError as error:
        raise MergeError(f"merge {spec.name!r}: {error}") from None
