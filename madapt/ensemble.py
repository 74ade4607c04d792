"""Adapter ensembles (`adapters.adapters.<name>.ensemble`): k members trained on disjoint shards, one merge.

The seed's use case, "merge adapters trained on different data splits for better generalisation", as one
key. Member i is trained on shard i of the adapter's training examples (its held-out split is kept out of
every shard) and published as `<name>-m<i>`; the members are then merged with the declared strategy and the
merge is published as `<name>` with the members' versions as lineage, so serving `<name>` serves the
ensemble. On Ray the members are parallel Ray Train runs. `madapt eval` scores the base, each member and
the merge on the adapter's held-out split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from madapt.config import Config, ConfigError, member_name
from madapt.data import Prompted, Row
from madapt.merge import MergeSpec, merge_and_publish
from madapt.store import AdapterStore, Manifest

SALT = b"madapt-ensemble:"
"""Shards hash the prompt with a salt of their own, so they do not line up with the held-out split's hash."""


def shard_of(example: Prompted, members: int) -> int:
    """The 1-based shard of an example: a hash of its prompt, so stable across runs, machines and row order."""
    digest = hashlib.sha256(SALT + example.prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") % members + 1


def shard(examples: Sequence[Row], index: int, members: int) -> list[Row]:
    """Shard `index` (1-based) of `members`: the shards are disjoint and together hold every example."""
    return [e for e in examples if shard_of(e, members) == index]


def member_examples(name: str, examples: Sequence[Row], index: int, members: int) -> list[Row]:
    """Member `index`'s shard of adapter `name`'s training examples; an empty shard is a config error."""
    mine = shard(examples, index, members)
    if not mine:
        raise ConfigError(
            [f"adapters.adapters.{name}.ensemble.members: shard {index} of {members} has no training "
             "examples; use fewer members or more data"]
        )  # fmt: skip
    return mine


def members(config: Config, name: str) -> list[str]:
    """The published names of adapter `name`'s ensemble members (none without an ensemble)."""
    ensemble = config.named_adapters[name].ensemble
    return [member_name(name, i) for i in range(1, ensemble.members + 1)] if ensemble else []


def merge_spec(config: Config, name: str) -> MergeSpec:
    """The merge of `name`'s members, equal weights, with the ensemble's strategy."""
    ensemble = config.named_adapters[name].ensemble
    if ensemble is None:
        raise ConfigError([f"adapters.adapters.{name}.ensemble: adapter {name!r} declares no ensemble"])
    names = members(config, name)
    return MergeSpec(
        name=name,
        sources=tuple(names),
        weights=tuple([1.0 / len(names)] * len(names)),
        combination_type=ensemble.combination_type,
        density=ensemble.density,
        seed=ensemble.seed,
        rank=ensemble.rank,
    )


def train_ensemble(
    config: Config,
    name: str,
    store: AdapterStore,
    train_member: Callable[[str, int, int], Manifest],
    *,
    parallel: bool = False,
) -> Manifest:
    """Train every member with `train_member(member name, shard index, members)` (side by side with
    `parallel`: Ray Train runs whose workers wait until the cluster has room), then publish the merge."""
    names = members(config, name)
    jobs = [(member, index, len(names)) for index, member in enumerate(names, start=1)]
    if parallel:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            list(pool.map(lambda job: train_member(*job), jobs))
    else:
        for job in jobs:
            train_member(*job)
    return publish_merge(config, name, store)


def publish_merge(config: Config, name: str, store: AdapterStore) -> Manifest:
    """Publish the merge of adapter `name`'s trained members under its name."""
    return merge_and_publish(store, merge_spec(config, name))
