"""Exact LoRA merge maths on the factors alone: a weighted sum of LoRA deltas, and its truncated SVD.

A weighted sum of adapters, delta W = sum_i w_i s_i B_i A_i, is itself a product of two thin matrices:
B = [B_1 .. B_n] (d_out x R) and A = [w_1 s_1 A_1; ..; w_n s_n A_n] (R x d_in), R = sum of the ranks.
Keeping those factors is exact (PEFT's `cat`); PEFT's `linear` instead sums A's and B's separately,
which adds cross terms B_i A_j (peft issue #3004).

Its best rank-k approximation needs no dense d_out x d_in matrix either: with B = Q_b R_b and A^T = Q_a R_a,
delta W = Q_b (R_b R_a^T) Q_a^T, so the SVD of the R x R core gives the singular values and, rotated by Q_b and
Q_a, the singular vectors. That is O(d R^2) per module where PEFT's dense SVD is O(d^3).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from madapt.adapter_types import PEFT_PREFIX
from madapt.lora import LORA_A, LORA_B, lora_scale

LoraSource = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""An adapter as (PEFT adapter_config dict, tensors keyed like `<module>.lora_A.weight`)."""


class LowRankError(ValueError):
    """Adapters whose tensors the factor maths cannot combine exactly."""


def lora_factors(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(B, A) per adapted module path; refuses tensors that are not plain LoRA factors."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LowRankError("adapters with per-module rank_pattern/alpha_pattern are not supported here")
    modules = {}
    for key in tensors:
        if key.endswith("." + LORA_A):
            module = key.removesuffix("." + LORA_A)
            if f"{module}.{LORA_B}" not in tensors:
                raise LowRankError(f"tensor {key!r} has no matching {LORA_B}")
            modules[module] = (tensors[f"{module}.{LORA_B}"], tensors[key])
        elif not key.endswith("." + LORA_B):
            raise LowRankError(f"tensor {key!r} is not a LoRA factor (bias or modules_to_save cannot be merged)")
    return modules


def stacked_factors(
    sources: Sequence[LoraSource], weights: Sequence[float], dtype: torch.dtype = torch.float64
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, (B, A) in `dtype` with B @ A == sum_i w_i * delta W_i exactly.

    A module missing from some sources gets only the others' contributions, as in PEFT.
    """
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for (config, tensors), weight in zip(sources, weights, strict=True):
        scale = weight * lora_scale(config)
        for module, (b, a) in lora_factors(config, tensors).items():
            parts.setdefault(module, []).append((b.to(dtype), scale * a.to(dtype)))
    return {m: (torch.cat([b for b, _ in p], dim=1), torch.cat([a for _, a in p], dim=0)) for m, p in parts.items()}


def truncated_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` SVD of b @ a without forming it: (U * S, Vh, all singular values of b @ a).

    Returned as LoRA factors (B' = U S, A' = Vh, PEFT's convention), zero-padded when b @ a has lower rank.
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.numel())
    new_b = b.new_zeros(b.shape[0], rank)
    new_a = a.new_zeros(rank, a.shape[1])
    new_b[:, :k] = (q_b @ u[:, :k]) * s[:k]
    new_a[:k] = vh[:k] @ q_a.T
    return new_b, new_a, s


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded for a while. The factor maths are many small ops, for which torch's thread
    pool costs more than it saves: 45x slower with 2 threads than 1 on a busy 2-core machine (32 q,v layers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


NARROWING = ("layers_to_transform", "layers_pattern", "exclude_modules")
"""LoRA config keys that narrow which modules target_modules picks."""


def merged_config(sources: Sequence[LoraSource], rank: int, modules: Iterable[str]) -> dict[str, Any]:
    """The first source's config with rank `rank` and scale 1 (the factors carry the scale), as PEFT does,
    targeting the sources' modules: their names; or, where a source targets by a regular expression (PEFT's
    string form) or narrows its targets (layers, exclusions) and one source's rule cannot speak for all, the
    merged `modules`' own paths, which PEFT matches exactly."""
    first = sources[0][0]
    narrowed = {}
    if any(isinstance(c.get("target_modules"), str) or any(c.get(k) for k in NARROWING) for c, _ in sources):
        targets = sorted(module.removeprefix(PEFT_PREFIX) for module in modules)
        narrowed = dict.fromkeys(NARROWING)
    else:
        targets = sorted({m for config, _ in sources for m in (config.get("target_modules") or [])})
    return {
        **first,
        **narrowed,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "target_modules": targets,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _as_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, (b, a) in factors.items():
        tensors[f"{module}.{LORA_A}"] = a.to(dtype).contiguous()
        tensors[f"{module}.{LORA_B}"] = b.to(dtype).contiguous()
    return tensors


def exact_merge(sources: Sequence[LoraSource], weights: Sequence[float]) -> LoraSource:
    """An adapter whose delta W is exactly sum_i w_i * delta W_i; its rank is the sum of the source ranks."""
    dtype = next(iter(sources[0][1].values())).dtype
    rank = sum(int(config["r"]) for config, _ in sources)
    factors = {}
    with one_thread():
        for module, (b, a) in stacked_factors(sources, weights, dtype).items():  # only A is scaled: no float64
            pad = rank - b.shape[1]  # modules some sources do not adapt
            factors[module] = (
                torch.cat([b, b.new_zeros(b.shape[0], pad)], 1),
                torch.cat([a, a.new_zeros(pad, a.shape[1])]),
            )
        return merged_config(sources, rank, factors), _as_tensors(factors, dtype)


def svd_merge(
    sources: Sequence[LoraSource], weights: Sequence[float], rank: int
) -> tuple[LoraSource, dict[str, torch.Tensor]]:
    """The best rank-`rank` adapter for sum_i w_i * delta W_i (PEFT's `svd`, in O(d r^2) per module).

    Also returns every module's singular values, so callers can report what the truncation dropped.
    """
    dtype = next(iter(sources[0][1].values())).dtype
    factors, spectra = {}, {}
    with one_thread():
        for module, (b, a) in stacked_factors(sources, weights).items():
            new_b, new_a, s = truncated_svd(b, a, rank)
            factors[module] = (new_b, new_a)
            spectra[module] = s
        return (merged_config(sources, rank, factors), _as_tensors(factors, dtype)), spectra
