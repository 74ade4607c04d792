"""Combine published adapters into a new one with PEFT's `add_weighted_adapter`.

madapt adds what PEFT leaves to the caller: ranks are harmonised by zero-padding (so the Ludwig
example that merges r=16 with r=8 by `ties` works), DARE's random drop is seeded, every source must
come from the same base model, and an existing target name is refused instead of PEFT's silent no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel

from madapt.lora import attach, extract, pad_rank
from madapt.store import AdapterStore, Manifest, StoredAdapter

EQUAL_RANK_TYPES = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
"""PEFT combines A and B factor-wise for these, so every source must have the same rank."""


class MergeError(ValueError):
    """A merge that cannot run; raised before anything is written."""


@dataclass(frozen=True)
class MergeSpec:
    name: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    combination_type: str = "linear"
    density: float | None = None
    seed: int = 0

    @classmethod
    def from_config(cls, merge) -> MergeSpec:
        return cls(
            name=merge.name,
            sources=tuple(merge.sources),
            weights=tuple(merge.weights),
            combination_type=merge.combination_type,
            density=merge.density,
            seed=merge.seed,
        )


def harmonise_ranks(adapters: Sequence[StoredAdapter], combination_type: str) -> list[StoredAdapter]:
    """Pad every source to the largest rank where PEFT needs equal ranks; identity otherwise."""
    if combination_type not in EQUAL_RANK_TYPES:
        return list(adapters)
    rank = max(int(a.config["r"]) for a in adapters)
    padded = []
    for adapter in adapters:
        config, tensors = pad_rank(adapter.config, adapter.tensors, rank)
        padded.append(StoredAdapter(manifest=adapter.manifest, config=config, tensors=tensors))
    return padded


def merge_into(model: torch.nn.Module, adapters: Sequence[StoredAdapter], spec: MergeSpec) -> PeftModel:
    """Attach the sources to `model` and add the merged adapter `spec.name` beside them."""
    if len(adapters) != len(spec.sources):
        raise MergeError(f"merge {spec.name!r}: got {len(adapters)} adapters for {len(spec.sources)} sources")
    peft_model = model
    slot_names = [f"__src{i}_{s}" for i, s in enumerate(spec.sources)]
    for adapter, slot in zip(harmonise_ranks(adapters, spec.combination_type), slot_names, strict=True):
        peft_model = attach(peft_model, adapter, slot)
    if spec.name in peft_model.peft_config:
        raise MergeError(f"merge {spec.name!r}: an adapter with that name is already loaded")
    torch.manual_seed(spec.seed)
    peft_model.add_weighted_adapter(
        adapters=slot_names,
        weights=list(spec.weights),
        adapter_name=spec.name,
        combination_type="cat" if spec.combination_type == "exact_linear" else spec.combination_type,
        density=spec.density,
    )
    if spec.name not in peft_model.peft_config:  # PEFT returns silently in some cases
        raise MergeError(f"merge {spec.name!r}: PEFT did not create the merged adapter")
    for slot in slot_names:
        peft_model.delete_adapter(slot)
    return peft_model


def lineage(adapters: Sequence[StoredAdapter], spec: MergeSpec) -> dict:
    return {
        "sources": [{"name": a.manifest.name, "version": a.manifest.version} for a in adapters],
        "weights": list(spec.weights),
        "combination_type": spec.combination_type,
        "density": spec.density,
        "seed": spec.seed,
    }


def open_sources(store: AdapterStore, spec: MergeSpec, fingerprint: str) -> list[StoredAdapter]:
    """Open every source verified against the base; a source from another base is refused by name."""
    return [store.open(source, expected_fingerprint=fingerprint) for source in spec.sources]


def published_twin(
    store: AdapterStore, spec: MergeSpec, sources: Sequence[StoredAdapter], overwrite: bool
) -> Manifest | None:
    """The published merge with the same lineage, if any; refuse to shadow one from something else."""
    if overwrite or not store.versions(spec.name):
        return None
    previous = store.manifest(spec.name)
    if previous.lineage != lineage(sources, spec):
        raise MergeError(
            f"merge {spec.name!r}: {previous.ref} is already published with different lineage; "
            "pass --overwrite to publish a new version"
        )
    return previous


def merge_and_publish(
    store: AdapterStore, model: torch.nn.Module, base_model: str, fingerprint: str, spec: MergeSpec, *, overwrite=False
) -> Manifest:
    """Merge published sources on `model` (the loaded base) and publish the result with lineage.

    The same merge of the same source versions is not repeated: its published version is returned.
    """
    sources = open_sources(store, spec, fingerprint)
    twin = published_twin(store, spec, sources, overwrite)
    if twin is not None:
        return twin
    merged = merge_into(model, sources, spec)
    config, tensors = extract(merged, spec.name)
    return store.publish(
        spec.name,
        config,
        tensors,
        base_model=base_model,
        base_fingerprint=fingerprint,
        lineage=lineage(sources, spec),
    )
