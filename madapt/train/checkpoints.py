"""A Ray Train run's checkpoints: what a worker writes every `checkpoint_every` steps and at the end (LoRA
weights, optimizer state, `WorkerState`, and under early stopping the best evaluation's weights), how a
restarted worker resumes from the latest one, and how the driver publishes the final one.

The early stop keeps its state in the checkpoint rather than in Ray's scored checkpoints
(`checkpoint_score_attribute`): Ray would prune by score the latest checkpoint a restart needs, and the
evaluation cadence is Ludwig's, not Ray's."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from madapt.config import Config
from madapt.data import Truncation
from madapt.lora import adapter_config, cut_ranks, load_adapter_state, unwrap
from madapt.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore, Manifest
from madapt.train.loop import EarlyStop, Trainer, TrainResult, held_out_metrics, publish, published_metrics
from madapt.train.spec import RunSpec
from madapt.train.strategies import lora_tensors, torch_optimizer

OPTIMIZER = "optimizer.pt"
STATE = "state.json"
PROBE = "probe_logits.safetensors"
DEEPSPEED_DIR = "deepspeed"
BEST_WEIGHTS = "best_adapter_model.safetensors"
"""Under trainer.early_stop: the best evaluation's LoRA weights, carried by every checkpoint and published."""


@dataclass
class WorkerState:
    """What a checkpoint remembers besides weights: enough to continue a run's metrics without repeating
    steps, and the base's fingerprint, so publishing the finished run needs no base model."""

    base_fingerprint: str
    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    history: list[int] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    peak_gpu_bytes: int | None = None
    early_stop: EarlyStop | None = None
    """Under trainer.early_stop: the best evaluation so far (its weights are in BEST_WEIGHTS)."""
    stopped_early: bool = False
    """Early stopping ended the run: a restart from its last checkpoint trains no further."""
    held_out: dict[str, Any] = field(default_factory=dict)
    """The final checkpoint's held-out scores beyond the loss: a preference run's preference accuracies."""

    def write(self, directory: Path) -> None:
        (directory / STATE).write_text(json.dumps(asdict(self)))

    def after(
        self, step: int, result: TrainResult, history: list[int], early: EarlyStop, *, stopped_early: bool = False
    ) -> WorkerState:
        """The state to checkpoint after `step`, continuing this one (its resume points and base); `result`
        holds every step's loss and all workers' tokens."""
        return WorkerState(
            base_fingerprint=self.base_fingerprint,
            step=step,
            losses=list(result.losses),
            tokens=result.tokens,
            wall_s=result.wall_s,
            history=list(history),
            resumed_from=list(self.resumed_from),
            early_stop=dataclasses.replace(early) if early.enabled else None,
            stopped_early=stopped_early,
        )

    @classmethod
    def read(cls, directory: Path) -> WorkerState:
        values = json.loads((directory / STATE).read_text())
        early = values.pop("early_stop", None)
        return cls(**values, early_stop=EarlyStop(**early) if early is not None else None)


def save_and_report(
    model, trainer: Trainer, spec: RunSpec, metrics, state: WorkerState, rank, *, probe=None, best=None
) -> None:
    """Write a checkpoint (rank 0; every rank under DeepSpeed, whose optimizer state is partitioned), with
    the best evaluation's weights under early stopping."""
    import ray.train

    tensors = lora_tensors(model, spec)
    optimizer = None if spec.strategy == "deepspeed" else optimizer_state(model, torch_optimizer(trainer))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        if spec.strategy == "deepspeed":
            model.save_checkpoint(str(path / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)
        if rank == 0:
            write_adapter(path, model, spec.name, tensors, state, optimizer, best=best)
            if probe is not None:
                save_file(probe, str(path / PROBE))
        keep = rank == 0 or spec.strategy == "deepspeed"
        checkpoint = ray.train.Checkpoint.from_directory(directory) if keep else None
        ray.train.report(metrics, checkpoint=checkpoint)


def write_adapter(
    directory: Path,
    model: torch.nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    state: WorkerState,
    optimizer: dict[str, Any] | None,
    *,
    best: dict[str, torch.Tensor] | None,
) -> None:
    """One adapter's part of a checkpoint (a whole checkpoint, or one pack lane's folder): its weights and
    PEFT config, state, optimizer state and the best evaluation's weights."""
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(adapter_config(unwrap(model), name)))
    state.write(directory)
    if optimizer is not None:
        torch.save(optimizer, directory / OPTIMIZER)
    if best:
        save_file(best, str(directory / BEST_WEIGHTS))


def load_optimizer(model, trainer: Trainer, spec: RunSpec, checkpoint: Any) -> None:
    """The optimizer state of `checkpoint` (None: a fresh run, nothing to load) into the trainer's optimizer
    (under DeepSpeed, the engine's whole checkpoint)."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as location:
        directory = Path(location)
        if spec.strategy == "deepspeed":
            model.load_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", load_module_strict=False)
            return
        restore_optimizer(model, torch_optimizer(trainer), directory)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full state of `optimizer` over (some of) `model`'s parameters, on the CPU (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(unwrap(model), optimizer, options=options)


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """`optimizer_state`'s file in `directory` back into `optimizer` (each rank its shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(directory / OPTIMIZER, weights_only=True)
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


def resume(checkpoint: Any, peft_model: torch.nn.Module, spec: RunSpec, fingerprint: str):
    """(state, best evaluation's weights) to continue from: the checkpoint's (its LoRA weights loaded into
    `peft_model`, except under DeepSpeed, whose engine loads its own), else a fresh run's."""
    if checkpoint is None:
        return WorkerState(base_fingerprint=fingerprint), {}  # in every checkpoint: publishing needs no base
    with checkpoint.as_directory() as directory:
        return resume_adapter(Path(directory), peft_model, spec.name, load_weights=spec.strategy != "deepspeed")


def resume_adapter(
    directory: Path, peft_model: torch.nn.Module, name: str, *, load_weights: bool
) -> tuple[WorkerState, dict[str, torch.Tensor]]:
    """(state, best evaluation's weights) of adapter `name`'s part of a checkpoint (write_adapter's), its
    weights loaded into `peft_model` where `load_weights`."""
    state = WorkerState.read(directory)
    if load_weights:
        load_adapter_state(peft_model, load_file(str(directory / WEIGHTS_FILE)), name)
    best = load_file(str(directory / BEST_WEIGHTS)) if (directory / BEST_WEIGHTS).exists() else {}
    state.resumed_from.append(state.step)
    return state, best


def publish_checkpoint(
    directory: Path,
    config: Config,
    spec: RunSpec,
    store: AdapterStore,
    run: str,
    truncation: Truncation,
    *,
    pack: list[str] | None = None,
) -> Manifest:
    """Publish a finished run's final checkpoint (its best evaluation's adapter under early stopping);
    `pack`: the members of the pack whose run it was (`directory`: this adapter's folder)."""
    state = WorkerState.read(directory)
    result = TrainResult(losses=state.losses, tokens=state.tokens, wall_s=state.wall_s)
    peak = {"peak_gpu_bytes": state.peak_gpu_bytes} if state.peak_gpu_bytes is not None else {}
    early = state.early_stop
    metrics = published_metrics(
        result,
        truncation,
        backend={
            "backend": "ray",
            "strategy": spec.strategy,
            "num_workers": config.backend.trainer.num_workers,
            **({"pack": pack} if pack else {}),
        },
        run=run,
        run_dir=spec.tracking.run_dir if spec.tracking else None,
        progress={"resumed_from": state.resumed_from, "steps_trained": state.history, **peak},
        held_out={**held_out_metrics(early, None, state.step if state.stopped_early else None), **state.held_out},
    )
    weights = directory / (BEST_WEIGHTS if early is not None else WEIGHTS_FILE)
    peft_config = json.loads((directory / CONFIG_FILE).read_text())
    tensors = cut_ranks(peft_config, load_file(str(weights)))
    return publish(
        store, config, spec.name, peft_config, tensors, base_fingerprint=state.base_fingerprint, metrics=metrics
    )
