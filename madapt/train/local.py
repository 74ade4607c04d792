"""The local driver (`backend.type: local`): one adapter trained in this process by the shared loop, tracked
under MADAPT_HOME/local_runs/<run>, published with its loss curve."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from madapt.config import Config
from madapt.data import Truncation
from madapt.errors import UserError
from madapt.lora import (
    add_trainable_adapter,
    extract_for_original_base,
    initialize_eva,
    mutates_base,
    snapshot_init,
)
from madapt.models import LoadedBase, load_base
from madapt.sources import DatasetLike
from madapt.store import AdapterStore, Manifest
from madapt.tracking import Tracker, local_run_dir, tracking_spec
from madapt.train.loop import (
    EarlyStop,
    HeldOut,
    Member,
    Monitor,
    StepReport,
    Trainer,
    TrainResult,
    early_stop_for,
    ensemble_dispatch,
    held_out_for,
    held_out_metrics,
    micro_batches,
    publish,
    published_metrics,
    restore_trainable,
    run_examples,
    tokenized,
)
from madapt.train.objectives import collate_for, sequences
from madapt.train.pack import (
    AdapterView,
    Lane,
    PackOutcome,
    PackTrainer,
    RowRouter,
    add_pack,
    merge_ensembles,
    pack_lanes,
)
from madapt.train.settings import TrainSettings, run_params, settings_for


def train_local(
    config: Config,
    name: str,
    store: AdapterStore,
    *,
    progress: bool = True,
    dataset: DatasetLike | None = None,
    eval_dataset: DatasetLike | None = None,
    member: Member | None = None,
) -> Manifest:
    """Train one adapter in this process and publish it; `dataset` and `eval_dataset` replace the config's
    (see `load_splits`). The run is tracked under MADAPT_HOME/local_runs/<run> and its loss curve drawn per
    published version.

    An adapter with an `ensemble` trains each member, then publishes their merge (madapt/ensemble.py);
    `member` = (published name, shard index, members) trains one member on its shard."""

    def train_member(member: Member) -> Manifest:
        return train_local(
            config, name, store, progress=progress, dataset=dataset, eval_dataset=eval_dataset, member=member
        )

    merged = ensemble_dispatch(config, name, store, member, train_member)
    if merged is not None:
        return merged
    torch.manual_seed(config.trainer.seed)
    published, train_examples, eval_examples = run_examples(config, name, member, dataset, eval_dataset)
    bits = config.quantization.bits if config.quantization else None
    base = base_of(config)
    rows, truncation = tokenized(base.tokenizer, train_examples, config.trainer.max_length, published)
    settings = settings_for(config.trainer, len(rows))
    pad = base.tokenizer.pad_token_id
    held = held_out_for(base.tokenizer, eval_examples, settings, pad, "cpu")
    adapter = config.named_adapters[name]
    torch.manual_seed(settings.seed)  # the adapter's initial weights, the same when it trains in a pack
    model = add_trainable_adapter(
        base.model,
        adapter,
        name,
        quantized=bits is not None,
        gradient_checkpointing=settings.gradient_checkpointing,
        calibration=[row["input_ids"] for row in sequences(rows)],
        total_steps=settings.total_steps,
    )
    if adapter.peft_init == "eva":
        batches = micro_batches(sequences(rows), settings.batch_size, pad, settings.seed)
        initialize_eva(model, name, batches, progress=progress)
    scratch = tempfile.TemporaryDirectory(prefix="madapt-init-")
    initial = snapshot_init(model, name, scratch.name) if mutates_base(adapter.peft_init) else None
    trainer = Trainer(model, settings)
    early = early_stop_for(settings, published, held.rows)
    run, run_dir = local_run_dir(config, name, published)
    tracker = Tracker(tracking_spec(config, run, str(run_dir), run_params(config, name, settings)))
    monitor = Monitor(trainer, held.rows, pad, early, tracker=tracker, quantized=bits is not None, score=held.score)
    try:
        result = run_with_bar(monitor, rows, pad, published, progress=progress)
        last = monitor.final()
    finally:
        tracker.close()
    if early.enabled:  # publish the best evaluation's adapter, not the last step's
        restore_trainable(model, monitor.best)
    accuracy = held.accuracy(model)  # a preference run's held-out preference accuracy, adapter vs base
    with scratch:
        adapter_config, tensors = extract_for_original_base(model, name, initial)
    stopped_at = trainer.step if trainer.step < settings.total_steps else None
    metrics = published_metrics(
        result,
        truncation,
        backend={"backend": "local", "examples": len(rows)},
        run=run,
        run_dir=str(run_dir),
        held_out={**held_out_metrics(early, last, stopped_at), **accuracy},
    )
    return publish(
        store, config, published, adapter_config, tensors, base_fingerprint=base.fingerprint, metrics=metrics
    )


def base_of(config: Config) -> LoadedBase:
    """The config's base model, quantized as it asks."""
    return load_base(
        config.base_model,
        quantization_bits=config.quantization.bits if config.quantization else None,
        quantization_options=config.quantization.bnb_options() if config.quantization else None,
        trust_remote_code=config.trust_remote_code,
    )


def run_with_bar(
    monitor: Monitor, rows: Sequence[dict[str, list[int]]], pad_token_id: int, name: str, *, progress: bool
) -> TrainResult:
    """Run the loop over shuffled micro-batches of `rows`, drawing a bar of its steps, loss and tokens/s."""
    from tqdm.auto import tqdm

    trainer, settings = monitor.trainer, monitor.trainer.settings
    bar = tqdm(total=settings.total_steps, desc=f"train {name}", disable=not progress)

    def show(report: StepReport) -> None:
        monitor.after_step(report)
        bar.update(1)
        bar.set_postfix(loss=f"{report.loss:.3f}", tok_s=f"{report.tokens_per_s:.0f}")

    batches = micro_batches(rows, settings.batch_size, pad_token_id, settings.seed, collate=collate_for(settings))
    result = trainer.run(batches, show)
    bar.close()
    return result


def train_local_pack(
    config: Config,
    names: Sequence[str],
    store: AdapterStore,
    *,
    progress: bool = True,
    datasets: Mapping[str, DatasetLike] | None = None,
    eval_datasets: Mapping[str, DatasetLike] | None = None,
) -> PackOutcome:
    """Train adapters `names` (all packable: pack.split_packable) as one pack in this process, on one base, and
    publish each as `train_local` would. An adapter whose data cannot be read, or whose loss turns non-finite,
    fails alone: the others train and publish."""
    datasets, eval_datasets = datasets or {}, eval_datasets or {}
    outcome = PackOutcome()
    base = base_of(config)
    pad, quantized = base.tokenizer.pad_token_id, config.quantization is not None
    prepared: dict[str, PreparedLane] = {}  # by lane: the adapter's name, or its ensemble member's
    for name, member in pack_lanes(config, names):
        try:
            run = run_examples(config, name, member, datasets.get(name), eval_datasets.get(name))
            prepared[run[0]] = prepare_lane(config, base.tokenizer, name, *run)
        except (UserError, OSError, ValueError) as error:
            outcome.failures[name] = str(error)
    if not prepared:
        return outcome
    model, router = add_pack(
        base.model,
        {lane: config.named_adapters[prep.adapter] for lane, prep in prepared.items()},
        config.trainer.seed,
        quantized=quantized,
        gradient_checkpointing=config.trainer.enable_gradient_checkpointing,
    )
    lanes = [prep.start(config, model, router, pad, quantized=quantized) for prep in prepared.values()]
    try:
        max_rows = config.backend.trainer.pack_max_rows
        run_pack_with_bar(PackTrainer(model, router, lanes, pad, max_rows=max_rows), progress=progress)
    finally:
        for prep in prepared.values():
            prep.tracker.close()
    for lane, prep in zip(lanes, prepared.values(), strict=True):
        if lane.failure is not None or prep.adapter in outcome.failures:
            outcome.failures.setdefault(prep.adapter, lane.failure or "")
            continue
        outcome.published[lane.name] = prep.publish(config, store, model, lane, base.fingerprint, list(prepared))
    return merge_ensembles(config, store, outcome, names)


@dataclass
class PreparedLane:
    """A pack lane's data and settings before the model exists, then its tracking and publishing. `name`: the
    lane's published name (the adapter's, or its ensemble member's)."""

    adapter: str
    name: str
    rows: list[Any]
    truncation: Truncation
    settings: TrainSettings
    held: HeldOut
    early: EarlyStop
    run: str = ""
    run_dir: str = ""
    tracker: Tracker = field(init=False)

    def start(self, config: Config, model: Any, router: RowRouter, pad: int, *, quantized: bool) -> Lane:
        """The lane's trainer over its view of the packed model, its batches and its Monitor."""
        trainer = Trainer(AdapterView(model, router, self.name), self.settings)
        self.run, run_dir = local_run_dir(config, self.adapter, self.name)
        self.run_dir = str(run_dir)
        params = run_params(config, self.adapter, self.settings)
        self.tracker = Tracker(tracking_spec(config, self.run, self.run_dir, params))
        monitor = Monitor(
            trainer, self.held.rows, pad, self.early, tracker=self.tracker, quantized=quantized, score=self.held.score
        )
        batches = micro_batches(self.rows, self.settings.batch_size, pad, self.settings.seed)
        return Lane(self.name, trainer, batches, monitor=monitor)

    def publish(
        self, config: Config, store: AdapterStore, model: Any, lane: Lane, fingerprint: str, pack: list[str]
    ) -> Manifest:
        """Publish the lane's adapter (its best evaluation's under early stopping) with its metrics."""
        assert lane.monitor is not None
        last = lane.monitor.final()
        if self.early.enabled:
            restore_trainable(lane.trainer.model, lane.monitor.best)
        adapter_config, tensors = extract_for_original_base(model, self.name, None)
        stopped_at = lane.trainer.step if lane.trainer.step < self.settings.total_steps else None
        metrics = published_metrics(
            lane.result,
            self.truncation,
            backend={"backend": "local", "examples": len(self.rows), "pack": pack},
            run=self.run,
            run_dir=self.run_dir,
            held_out=held_out_metrics(self.early, last, stopped_at),
        )
        return publish(store, config, self.name, adapter_config, tensors, base_fingerprint=fingerprint, metrics=metrics)


def prepare_lane(
    config: Config, tokenizer: Any, adapter: str, name: str, train: list[Any], held_out: list[Any]
) -> PreparedLane:
    """Lane `name` of adapter `adapter`: its tokenized rows, settings, held-out data and early stopping."""
    rows, truncation = tokenized(tokenizer, train, config.trainer.max_length, name)
    settings = settings_for(config.trainer, len(rows))
    held = held_out_for(tokenizer, held_out, settings, tokenizer.pad_token_id, "cpu")
    return PreparedLane(adapter, name, rows, truncation, settings, held, early_stop_for(settings, name, held.rows))


def run_pack_with_bar(pack: PackTrainer, *, progress: bool) -> None:
    """Run the pack, drawing one bar of all its lanes' steps with each lane's latest loss."""
    from tqdm.auto import tqdm

    total = sum(lane.trainer.settings.total_steps for lane in pack.lanes)
    bar = tqdm(total=total, desc=f"train pack of {len(pack.lanes)}", disable=not progress)

    def show(lane: Lane, report: StepReport) -> None:
        assert lane.monitor is not None
        lane.monitor.after_step(report)
        bar.update(1)
        bar.set_postfix_str(
            ", ".join(f"{lane.name} {lane.result.losses[-1]:.3f}" for lane in pack.lanes if lane.result.losses)
        )

    pack.run(show)
    bar.close()
