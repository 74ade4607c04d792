"""One Ray Train worker (`train_loop_per_worker`): its Ray Data shard -> examples -> tokens -> a model wrapped
in the run's strategy -> the shared loop (loop.py), with what only a worker adds: losses and tokens summed
over the ranks, a checkpoint every `checkpoint_every` steps, progress posted to the driver's bar, and the
fault injection the restart tests use.

Rank 0 logs every step to the run's trackers (madapt/tracking.py), under `<storage_path>/<run>` beside Ray
Train's checkpoints, and posts it to a ProgressBoard actor from which the driver draws a bar per adapter:
the workers' own output stays in Ray's log files (madapt.cluster)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from madapt import ensemble
from madapt.config import LoraAdapterConfig
from madapt.data import examples_from_table, split_examples
from madapt.lora import add_trainable_adapter
from madapt.models import LoadedBase
from madapt.preference_data import preference_rows_from_table
from madapt.tracking import Tracker
from madapt.train.checkpoints import WorkerState, load_optimizer, resume, save_and_report
from madapt.train.loop import (
    EarlyStop,
    Monitor,
    StepReport,
    Trainer,
    TrainResult,
    held_out_for,
    micro_batches,
    tokenize_rows,
)
from madapt.train.objectives import collate_for, sequences
from madapt.train.spec import RunSpec
from madapt.train.strategies import lora_tensors, wrap

FAULT_GRACE_S = 5.0
METRICS_EVERY = 10
"""Steps between metric-only reports. Ray Train's result queue holds one report and the controller drains it
every couple of seconds, so reporting every (fast) step would stall training on the queue."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: shard -> examples -> tokens -> wrapped model -> the loop -> reports."""
    import ray.train

    spec: RunSpec = loop_config["spec"]
    rank, world, device = placement(spec)
    base = worker_base(spec, device)
    rows, _ = tokenize_rows(base.tokenizer, shard_examples(spec), spec.settings.max_length)
    held = held_out_for(base.tokenizer, spec.eval_examples, spec.settings, base.tokenizer.pad_token_id, device)
    if not rows:
        raise RuntimeError(f"adapter {spec.name!r}: worker {rank} got an empty data shard; use fewer workers")
    peft_model = add_trainable_adapter(
        base.model,
        LoraAdapterConfig(**spec.adapter),
        spec.name,
        quantized=spec.quantization_bits is not None,
        gradient_checkpointing=spec.settings.gradient_checkpointing,
        total_steps=spec.settings.total_steps,
    )
    checkpoint = ray.train.get_checkpoint()
    state, best = resume(checkpoint, peft_model, spec, base.fingerprint)
    model, trainer = wrap(peft_model, spec, device)
    load_optimizer(model, trainer, spec, checkpoint)
    trainer.step, trainer.stopped = state.step, state.stopped_early
    tracker = Tracker(spec.tracking, resume_step=state.step) if rank == 0 and spec.tracking else None
    early = state.early_stop or EarlyStop(spec.settings.early_stop)
    monitor = Monitor(
        trainer,
        held.rows,
        base.tokenizer.pad_token_id,
        early,
        tracker=tracker,
        quantized=spec.quantization_bits is not None,
        agree=lambda loss: all_reduce_sum(loss, device) / world,  # one decision on every rank, bit for bit
        snapshot=lambda: lora_tensors(model, spec),
        best=best,
        score=held.score,
    )
    worker = Worker(spec, rank, world, monitor, state, board=loop_config.get("progress"), first=checkpoint is None)
    pad, seed = base.tokenizer.pad_token_id, spec.settings.seed + rank
    batches = micro_batches(rows, spec.settings.batch_size, pad, seed, collate=collate_for(spec.settings))
    skip = trainer.step * spec.settings.gradient_accumulation_steps
    trainer.run(itertools.islice(batches, skip, None), worker.on_step, worker.result)
    worker.finish(sequences(rows)[0], held.accuracy)


def placement(spec: RunSpec) -> tuple[int, int, torch.device]:
    """This worker's (rank, world size, device)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    return context.get_world_rank(), context.get_world_size(), device


def worker_base(spec: RunSpec, device: torch.device) -> LoadedBase:
    """The run's base model on this worker, after seeding as every driver does (so initial weights agree)."""
    from madapt.models import load_base

    torch.manual_seed(spec.settings.seed)
    return load_base(
        spec.base_model,
        dtype=torch.bfloat16 if spec.use_gpu else torch.float32,  # CPU kernels are fastest (and exact) in fp32
        quantization_bits=spec.quantization_bits,
        quantization_options=spec.quantization_options,
        trust_remote_code=spec.trust_remote_code,
        device=device if spec.quantization_bits else None,
    )


class Worker:
    """A worker's run after setup: what follows each step, and the final checkpoint. `state` is the
    checkpoint resumed from (a fresh one on the first attempt); `board`, the driver's ProgressBoard or None."""

    def __init__(
        self, spec: RunSpec, rank: int, world: int, monitor: Monitor, state: WorkerState, *, board: Any, first: bool
    ):
        self.spec, self.rank, self.world, self.monitor, self.state = spec, rank, world, monitor, state
        self.board, self.first_attempt = board, first
        self.trainer: Trainer = monitor.trainer
        self.result = TrainResult(losses=list(state.losses), tokens=state.tokens, wall_s=state.wall_s)
        """Every step's loss (the mean over the ranks) and all ranks' tokens."""
        self.history = list(state.history)
        self.counted = state.tokens
        """All ranks' tokens up to the last step (the loop adds only this rank's to `result.tokens`)."""

    def on_step(self, report: StepReport) -> None:
        import ray.train

        inject_fault(self.spec, report.step, self.rank, self.world, first_attempt=self.first_attempt)
        metrics = self.record(report)
        if self.rank == 0 and self.board is not None:
            self.board.post.remote(metrics)  # not awaited: the bar may lag, the step does not
        due = report.step % self.spec.checkpoint_every == 0 and report.step < report.total_steps
        if due and not self.trainer.stopped:  # a stopped run's last checkpoint is the final one
            self.checkpoint(metrics, self.state.after(report.step, self.result, self.history, self.monitor.early))
        elif report.step % METRICS_EVERY == 0:
            ray.train.report(metrics)

    def record(self, report: StepReport) -> dict[str, Any]:
        """A finished step over all ranks, to the Monitor (trackers, evaluation, early stop) and rank 0's log;
        its metrics."""
        self.history.append(report.step)
        report = self.over_all_ranks(report)
        self.monitor.after_step(report)
        if self.rank == 0:  # sys.stdout, not print: Ray Train patches print() and would log each line twice
            sys.stdout.write(
                f"[{self.spec.name}] step {report.step}/{report.total_steps} loss {report.loss:.4f} "
                f"{report.tokens_per_s:.0f} tok/s\n"
            )
            sys.stdout.flush()
        return {
            "step": report.step,
            "total_steps": report.total_steps,
            "loss": report.loss,
            "tokens": report.tokens,
            "tokens_per_s": report.tokens_per_s,
        }

    def over_all_ranks(self, report: StepReport) -> StepReport:
        """This rank's step as the run's: the mean loss over all shards, every rank's tokens."""
        device, result = self.trainer.device, self.result
        mine = report.tokens - self.counted  # this step's tokens on this rank
        result.tokens = self.counted = int(all_reduce_sum(mine, device)) + self.counted
        result.losses[-1] = all_reduce_sum(report.loss, device) / self.world
        tokens_per_s = result.tokens / max(result.wall_s, 1e-9)
        return dataclasses.replace(report, loss=result.losses[-1], tokens=result.tokens, tokens_per_s=tokens_per_s)

    def checkpoint(self, metrics: dict[str, Any], state: WorkerState, probe: Any = None) -> None:
        save_and_report(
            self.trainer.model, self.trainer, self.spec, metrics, state, self.rank, probe=probe, best=self.monitor.best
        )

    def finish(self, probe_row: dict[str, list[int]], accuracy: Callable[[torch.nn.Module], dict[str, Any]]) -> None:
        """The last evaluation (unless a stopped run's last step had it, or the base is quantized), then the
        final checkpoint, with the probe logits, peak GPU memory and a preference run's held-out accuracy
        (every rank scores the same pairs: a collective under FSDP)."""
        trainer, spec = self.trainer, self.spec
        if not self.state.stopped_early and spec.quantization_bits is None:
            self.monitor.final()
        scores = accuracy(trainer.model)
        if self.monitor.tracker is not None:
            self.monitor.tracker.close()
        probe = probe_logits(trainer.model, probe_row, trainer.device)
        final = self.state.after(
            trainer.step, self.result, self.history, self.monitor.early, stopped_early=trainer.stopped
        )
        if trainer.device.type == "cuda":
            final.peak_gpu_bytes = torch.cuda.max_memory_allocated(trainer.device)
        final.held_out = scores
        total = spec.settings.total_steps
        metrics = {"step": trainer.step, "total_steps": total, "done": True, "tokens": self.result.tokens}
        self.checkpoint(metrics, final, probe)


def inject_fault(spec: RunSpec, step: int, rank: int, world: int, *, first_attempt: bool) -> None:
    """MADAPT_FAIL_AT_STEP: SIGKILL this worker after `step` on the first attempt (rank 1, or 0 alone)."""
    if spec.fail_at_step == step and first_attempt and rank == min(1, world - 1):
        # Let the controller collect the last reported checkpoint (it polls workers every ~2 s) so the
        # crash lands after a committed checkpoint, then die as the OOM killer or a lost node kills it.
        time.sleep(FAULT_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)


def shard_examples(spec: RunSpec, dataset: str = "train") -> list[Any]:
    """This worker's training examples: its shard of Ray Data dataset `dataset`, formatted exactly as
    load_splits formats rows."""
    import ray.train

    shard = ray.train.get_dataset_shard(dataset)
    examples: list[Any] = []
    preference = spec.settings.preference
    for table in shard.iter_batches(batch_format="pyarrow", batch_size=None):
        source = f"{spec.name} shard"
        if preference is None:
            examples += examples_from_table(table, source=source, **spec.columns)
        else:
            examples += preference_rows_from_table(
                table, kind=preference.kind, source=source, other_column=spec.preference_column, **spec.columns
            )
    train = split_examples(examples, spec.eval_fraction)[0]
    return ensemble.shard(train, *spec.shard) if spec.shard else train


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item()


@torch.no_grad()
def probe_logits(model: torch.nn.Module, row: dict[str, list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Last-position logits of the first training row, so tests can check the published adapter reloads
    to the model that was trained (every rank runs it: under FSDP the forward is a collective)."""
    model.eval()
    ids = torch.tensor([row["input_ids"]], device=device)
    logits = model(input_ids=ids).logits[0, -1].float().cpu()
    model.train()
    return {"input_ids": ids[0].cpu(), "logits": logits}
