"""One Ray Train worker of a pack (`pack_loop_per_worker`): one base, this rank's shard of every lane's data,
the packed model wrapped once in the run's strategy, and PackTrainer over one Trainer per lane (pack.py).
What follows each lane's step is what follows a single adapter's (worker.Worker.record: losses and tokens over
all ranks, its Monitor, rank 0's trackers under its own run dir); what follows each pack step is the pack's:
fault injection, progress, and a checkpoint every `checkpoint_every` pack steps.

A checkpoint holds one folder per lane, laid out as a single adapter's checkpoint (checkpoints.write_adapter:
weights, PEFT config, WorkerState with its step, losses, tokens and early stop, optimizer state, the best
evaluation's weights), and PACK_STATE: which lanes failed and why. A restarted worker resumes every lane from
its folder and skips the micro-batches each already trained, so no lane repeats a step."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from madapt.config import LoraAdapterConfig
from madapt.tracking import Tracker
from madapt.train.checkpoints import (
    WorkerState,
    optimizer_state,
    restore_optimizer,
    resume_adapter,
    write_adapter,
)
from madapt.train.loop import (
    EarlyStop,
    HeldOut,
    Monitor,
    StepReport,
    Trainer,
    held_out_for,
    micro_batches,
    tokenize_rows,
)
from madapt.train.objectives import collate_for
from madapt.train.pack import AdapterView, Lane, PackTrainer, RowRouter, add_pack
from madapt.train.spec import PackSpec, RunSpec, pack_dataset
from madapt.train.strategies import pack_tensors, torch_optimizer, wrap_pack
from madapt.train.worker import (
    METRICS_EVERY,
    Worker,
    all_reduce_sum,
    inject_fault,
    placement,
    shard_examples,
    worker_base,
)

PACK_STATE = "pack.json"
"""In a pack's checkpoint, beside the lanes' folders: {"failures": {lane: why it left}}."""


def pack_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker of a pack: shards -> one base -> the packed model, resumed and wrapped -> PackTrainer."""
    import ray.train

    pack: PackSpec = loop_config["spec"]
    shared = pack.shared
    rank, world, device = placement(shared)
    base = worker_base(shared, device)
    tokenizer, pad = base.tokenizer, base.tokenizer.pad_token_id
    rows = {spec.name: lane_rows(spec, tokenizer, rank) for spec in pack.lanes}
    packed, router = add_pack(
        base.model,
        {spec.name: LoraAdapterConfig(**spec.adapter) for spec in pack.lanes},
        shared.settings.seed,
        quantized=shared.quantization_bits is not None,
        gradient_checkpointing=shared.settings.gradient_checkpointing,
    )
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as location:
        directory = Path(location) if location else None
        resumed = {spec.name: resume_lane(directory, packed, spec.name, base.fingerprint) for spec in pack.lanes}
        failures = json.loads((directory / PACK_STATE).read_text())["failures"] if directory else {}
        model = wrap_pack(packed, shared, device)
        board, first = loop_config.get("progress"), checkpoint is None
        run = PackRun(pack, model, router, rank, world, device, board=board, first_attempt=first)
        for spec in pack.lanes:
            held = held_out_for(tokenizer, spec.eval_examples, spec.settings, pad, device)
            lane = run.start_lane(spec, rows[spec.name], held, pad, *resumed[spec.name], failures.get(spec.name))
            if directory is not None:
                restore_optimizer(model, torch_optimizer(lane.trainer), directory / spec.name)
    trainer = PackTrainer(model, router, run.lanes, pad, device=device, agree=min_over_ranks, max_rows=pack.max_rows)
    trainer.run(run.on_step, run.after_step)
    run.finish()


def lane_rows(spec: RunSpec, tokenizer: Any, rank: int) -> list[Any]:
    """This rank's tokenized rows of lane `spec.name`."""
    rows, _ = tokenize_rows(tokenizer, shard_examples(spec, pack_dataset(spec.name)), spec.settings.max_length)
    if not rows:
        raise RuntimeError(f"adapter {spec.name!r}: worker {rank} got an empty data shard; use fewer workers")
    return rows


def resume_lane(
    directory: Path | None, packed: torch.nn.Module, name: str, fingerprint: str
) -> tuple[WorkerState, dict[str, torch.Tensor]]:
    """Lane `name`'s (state, best evaluation's weights) from its checkpoint folder (weights loaded into the
    packed model), else a fresh lane's."""
    if directory is None:
        return WorkerState(base_fingerprint=fingerprint), {}
    return resume_adapter(directory / name, packed, name, load_weights=True)


def min_over_ranks(flags: torch.Tensor) -> torch.Tensor:
    """PackTrainer's agreement: a lane's loss is finite only if it is finite on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags


class PackRun:
    """A worker's pack after setup: its lanes (each with the Worker that records its steps), what follows
    each pack step, and the checkpoints."""

    def __init__(
        self,
        pack: PackSpec,
        model: torch.nn.Module,
        router: RowRouter,
        rank: int,
        world: int,
        device: torch.device,
        *,
        board: Any,
        first_attempt: bool,
    ):
        self.pack, self.model, self.router = pack, model, router
        self.rank, self.world, self.device, self.board = rank, world, device, board
        self.first_attempt = first_attempt
        self.lanes: list[Lane] = []
        self.workers: dict[str, Worker] = {}

    def start_lane(
        self,
        spec: RunSpec,
        rows: list[Any],
        held: HeldOut,
        pad: int,
        state: WorkerState,
        best: dict[str, torch.Tensor],
        failure: str | None,
    ) -> Lane:
        """Lane `spec.name` over its view of the packed model, continuing from `state`: its Trainer, Monitor
        (held-out loss agreed over the ranks, its best weights gathered from the packed model) and batches in
        the order this rank would give it alone, less those it already trained."""
        trainer = Trainer(AdapterView(self.model, self.router, spec.name), spec.settings, self.device)
        trainer.step, trainer.stopped = state.step, state.stopped_early
        tracker = Tracker(spec.tracking, resume_step=state.step) if self.rank == 0 and spec.tracking else None
        monitor = Monitor(
            trainer,
            held.rows,
            pad,
            state.early_stop or EarlyStop(spec.settings.early_stop),
            tracker=tracker,
            quantized=spec.quantization_bits is not None,
            agree=lambda loss: all_reduce_sum(loss, self.device) / self.world,
            snapshot=lambda: pack_tensors(self.model, [spec.name])[spec.name],
            best=best,
            score=held.score,
        )
        worker = Worker(spec, self.rank, self.world, monitor, state, board=None, first=self.first_attempt)
        self.workers[spec.name] = worker
        settings = spec.settings
        batches = micro_batches(
            rows, settings.batch_size, pad, settings.seed + self.rank, collate=collate_for(settings)
        )
        skip = trainer.step * settings.gradient_accumulation_steps
        lane = Lane(spec.name, trainer, itertools.islice(batches, skip, None), worker.result, monitor, failure)
        self.lanes.append(lane)
        return lane

    def on_step(self, lane: Lane, report: StepReport) -> None:
        self.workers[lane.name].record(report)

    def after_step(self, step: int) -> None:
        """After pack step `step`: the fault injection, rank 0's progress, a checkpoint when due (while any
        lane runs on: the last one is the final checkpoint), else metrics every METRICS_EVERY steps."""
        import ray.train

        inject_fault(self.pack.shared, step, self.rank, self.world, first_attempt=self.first_attempt)
        metrics = self.metrics(step)
        if self.rank == 0 and self.board is not None:
            self.board.post.remote(metrics)  # not awaited: the bar may lag, the step does not
        if step % self.pack.shared.checkpoint_every == 0 and any(lane.running for lane in self.lanes):
            self.checkpoint(metrics)
        elif step % METRICS_EVERY == 0:
            ray.train.report(metrics)

    def metrics(self, step: int) -> dict[str, Any]:
        """The pack's step for the bar and Ray: the mean of the lanes' latest losses, all lanes' tokens."""
        latest = [lane.result.losses[-1] for lane in self.lanes if lane.result.losses]
        tokens = sum(lane.result.tokens for lane in self.lanes)
        wall_s = max(lane.result.wall_s for lane in self.lanes)
        return {
            "step": step,
            "total_steps": max(lane.trainer.settings.total_steps for lane in self.lanes),
            "loss": sum(latest) / len(latest) if latest else math.nan,
            "tokens": tokens,
            "tokens_per_s": tokens / max(wall_s, 1e-9),
        }

    def checkpoint(self, metrics: dict[str, Any], *, final: bool = False) -> None:
        """Every lane's part (rank 0 writes; gathering weights and optimizer state is a collective under FSDP)
        and the failures, reported to Ray Train as one checkpoint."""
        import ray.train

        tensors = pack_tensors(self.model, [lane.name for lane in self.lanes])
        optimizers = {lane.name: optimizer_state(self.model, torch_optimizer(lane.trainer)) for lane in self.lanes}
        with tempfile.TemporaryDirectory() as directory:
            if self.rank == 0:
                for lane in self.lanes:
                    worker, folder = self.workers[lane.name], Path(directory, lane.name)
                    folder.mkdir()
                    state = worker.state.after(
                        lane.trainer.step,
                        lane.result,
                        worker.history,
                        worker.monitor.early,
                        stopped_early=lane.trainer.stopped,
                    )
                    if final and self.device.type == "cuda":
                        state.peak_gpu_bytes = torch.cuda.max_memory_allocated(self.device)
                    write_adapter(
                        folder,
                        self.model,
                        lane.name,
                        tensors[lane.name],
                        state,
                        optimizers[lane.name],
                        best=worker.monitor.best,
                    )
                failures = {lane.name: lane.failure for lane in self.lanes if lane.failure is not None}
                Path(directory, PACK_STATE).write_text(json.dumps({"failures": failures}))
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)

    def finish(self) -> None:
        """Each trained lane's last evaluation (unless it stopped early or the base is quantized: see Monitor),
        then the final checkpoint."""
        for lane in self.lanes:
            assert lane.monitor is not None
            if lane.failure is None and not lane.trainer.stopped and not self.pack.shared.quantization_bits:
                lane.monitor.final()
            if lane.monitor.tracker is not None:
                lane.monitor.tracker.close()
        step = max(lane.trainer.step for lane in self.lanes)
        metrics = {**self.metrics(step), "done": True}
        self.checkpoint(metrics, final=True)
