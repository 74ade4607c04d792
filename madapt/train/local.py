"""The local driver (`backend.type: local`): one adapter trained in this process by the shared loop, tracked
under MADAPT_HOME/local_runs/<run>, published with its loss curve."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch

from madapt.config import Config
from madapt.lora import (
    add_trainable_adapter,
    extract_for_original_base,
    initialize_eva,
    mutates_base,
    snapshot_init,
)
from madapt.models import load_base
from madapt.sources import DatasetLike
from madapt.store import AdapterStore, Manifest
from madapt.tracking import Tracker, local_run_dir, tracking_spec
from madapt.train.loop import (
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
from madapt.train.settings import run_params, settings_for


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
    base = load_base(
        config.base_model,
        quantization_bits=bits,
        quantization_options=config.quantization.bnb_options() if config.quantization else None,
        trust_remote_code=config.trust_remote_code,
    )
    rows, truncation = tokenized(base.tokenizer, train_examples, config.trainer.max_length, published)
    settings = settings_for(config.trainer, len(rows))
    pad = base.tokenizer.pad_token_id
    held = held_out_for(base.tokenizer, eval_examples, settings, pad, "cpu")
    adapter = config.named_adapters[name]
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
