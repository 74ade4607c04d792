"""Merging published adapters into a new one.

- `strategies`: `MergeSpec` and its checks, and how the sources' tensors combine (every PEFT combination
  type on a weightless skeleton, madapt's `exact_linear` and fast `svd`);
- `publish`: opening the sources (one base model), finding a published twin, publishing with lineage;
- `actor`: `AdapterMerger`, the Ray actor that runs merges for a cluster, and `run_merge` (in-process
  without a cluster). Import it as `madapt.merge.actor`: it is not re-exported, so `import madapt.merge`
  loads no Ray.

This package may import `madapt.config`, `madapt.errors`, `madapt.lora`, `madapt.lowrank` and
`madapt.store` (and torch, PEFT); `actor` also `madapt.cluster` and Ray; nothing from serving or training.
"""

from madapt.merge.publish import lineage, merge_and_publish, open_sources, published_twin, recipe
from madapt.merge.strategies import (
    EQUAL_RANK_TYPES,
    Engine,
    MergeError,
    MergeSpec,
    check_spec,
    merge_adapters,
)

__all__ = [
    "EQUAL_RANK_TYPES",
    "Engine",
    "MergeError",
    "MergeSpec",
    "check_spec",
    "lineage",
    "merge_adapters",
    "merge_and_publish",
    "open_sources",
    "published_twin",
    "recipe",
]
