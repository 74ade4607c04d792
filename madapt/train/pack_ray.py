"""The Ray Train driver of a pack (issue 25): the adapters of one config that can share a run
(pack.split_packable) train as ONE TorchTrainer run, one resident base per worker (pack_worker.py), and each
is then published from the run's final checkpoint as train_ray publishes a single adapter (+ "pack").

An adapter whose data cannot be read fails here, before the run, alone; one whose loss turns non-finite
leaves the pack, and both are reported in PackOutcome.failures while the others publish. The run is named
from the config and the pack's members (and any data given outside the config), so rerunning after the driver
died resumes it; each adapter is published once (published_by), and the run marked published once all are."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from madapt.config import Config
from madapt.data import Truncation
from madapt.errors import UserError
from madapt.sources import DatasetLike
from madapt.store import AdapterStore
from madapt.tracking import config_digest
from madapt.train.checkpoints import publish_checkpoint
from madapt.train.distributed import (
    examples_digest,
    fit_loop,
    mark_published,
    place_run,
    published_by,
    read_dataset,
    run_tracking,
)
from madapt.train.loop import EVAL_ROWS, Member, early_stop_for, run_examples, tokenized
from madapt.train.pack import PackOutcome, merge_ensembles, pack_lanes
from madapt.train.pack_worker import PACK_STATE, pack_loop_per_worker
from madapt.train.spec import PackSpec, RunSpec, pack_dataset, run_spec


@dataclasses.dataclass
class PlannedLane:
    """An adapter of the pack whose data was read: its worker spec (trackers to come), its training data
    and what publishing needs (the truncation); `data_digest` identifies data given outside the config."""

    adapter: str
    spec: RunSpec
    truncation: Truncation
    data: DatasetLike
    data_digest: str | None


def train_ray_pack(
    config: Config,
    names: Sequence[str],
    store: AdapterStore,
    *,
    progress: bool = True,
    datasets: Mapping[str, DatasetLike] | None = None,
    eval_datasets: Mapping[str, DatasetLike] | None = None,
) -> PackOutcome:
    """Train adapters `names` (all packable) as one Ray Train run (resuming an unfinished run of the same
    pack) and publish each; `datasets`/`eval_datasets`: per adapter, replacing the config's."""
    from madapt.models import load_tokenizer

    datasets, eval_datasets = datasets or {}, eval_datasets or {}
    tokenizer = load_tokenizer(config.base_model, trust_remote_code=config.trust_remote_code)
    outcome = PackOutcome()
    planned: dict[str, PlannedLane] = {}  # by lane: the adapter's name, or its ensemble member's
    for name, member in pack_lanes(config, names):
        try:
            lane = plan_lane(config, name, member, tokenizer, datasets.get(name), eval_datasets.get(name))
            planned[lane.spec.name] = lane
        except (UserError, OSError, ValueError) as error:
            outcome.failures[name] = str(error)
    if not planned:
        return outcome
    first = next(iter(planned.values())).adapter
    storage, run = place_run(config, first, "pack", pack_digest(config, planned))
    specs = tuple(
        dataclasses.replace(
            lane.spec, tracking=run_tracking(config, lane.adapter, lane.spec.settings, storage, f"{run}/{name}")
        )
        for name, lane in planned.items()
    )
    published = {name: published_by(store, name, run) for name in planned}
    if not all(published.values()):  # else the driver died after publishing them all: publish nothing twice
        data = {pack_dataset(name): read_dataset(lane.data) for name, lane in planned.items()}
        label = f"pack of {len(specs)}"
        checkpoint = fit_loop(
            config,
            pack_loop_per_worker,
            PackSpec(specs, config.backend.trainer.pack_max_rows),
            data,
            storage,
            run,
            label=label,
            progress=progress,
        )
        with checkpoint.as_directory() as directory:
            failures = json.loads(Path(directory, PACK_STATE).read_text())["failures"]
            for spec in specs:
                adapter = planned[spec.name].adapter
                if spec.name in failures or adapter in outcome.failures:
                    outcome.failures.setdefault(adapter, failures.get(spec.name, ""))
                elif published[spec.name] is None:
                    lane_dir, truncation = Path(directory, spec.name), planned[spec.name].truncation
                    published[spec.name] = publish_checkpoint(
                        lane_dir, config, spec, store, run, truncation, pack=list(planned)
                    )
    outcome.published = {name: manifest for name, manifest in published.items() if manifest is not None}
    mark_published(storage, run, *outcome.published.values())
    return merge_ensembles(config, store, outcome, names)


def plan_lane(
    config: Config,
    name: str,
    member: Member | None,
    tokenizer: Any,
    dataset: DatasetLike | None,
    eval_dataset: DatasetLike | None,
) -> PlannedLane:
    """Read adapter `name`'s data (raising if it cannot be read) and build its worker spec, as train_ray does;
    an ensemble `member` trains on its shard under its own name."""
    published, train_examples, eval_examples = run_examples(config, name, member, dataset, eval_dataset)
    _, truncation = tokenized(tokenizer, train_examples, config.trainer.max_length, published)
    has_eval = eval_dataset is not None or config.named_adapters[name].eval_dataset is not None
    spec = run_spec(config, name, len(train_examples), eval_dataset=has_eval)
    shard = member[1:] if member else None
    spec = dataclasses.replace(spec, name=published, shard=shard, eval_examples=eval_examples[:EVAL_ROWS])
    early_stop_for(spec.settings, published, spec.eval_examples)  # refuses early_stop without held-out rows
    data = dataset if dataset is not None else config.dataset_for(name)
    digest = None if dataset is None else examples_digest(train_examples)
    return PlannedLane(name, spec, truncation, data, digest)


def pack_digest(config: Config, planned: Mapping[str, PlannedLane]) -> str:
    """Identifies the pack within its config: its members, each one's config and data given outside it."""
    members = [[name, config_digest(config, lane.adapter), lane.data_digest] for name, lane in planned.items()]
    return hashlib.sha256(json.dumps(members).encode()).hexdigest()[:10]
