"""Ray Train: each named adapter is one TorchTrainer run (FSDP2, DDP or DeepSpeed; LoRA or QLoRA).

The driver (`train_ray`) checks the request against the cluster, names the run deterministically from the
adapter and its config (so rerunning the same command after the driver died resumes the run from its
latest checkpoint in `storage_path`), runs `fit()`, and publishes the final checkpoint to the store
exactly once (its best evaluation's adapter under `trainer.early_stop`). The workers
(`train_loop_per_worker`) read their Ray Data shard, format and tokenise it with madapt.data, and drive the
same `Trainer` loop as `train_local`, reporting progress every step, scoring the held-out rows at Ludwig's
checkpoints (`steps_per_checkpoint`), and writing a checkpoint (LoRA weights, optimizer state, step,
metrics, and the early stop's best step, loss and weights) every `checkpoint_every` steps. The early stop
keeps its state in the checkpoint rather than in Ray's scored checkpoints (`checkpoint_score_attribute`):
Ray would prune by score the latest checkpoint a restart needs, and the evaluation cadence is Ludwig's,
not Ray's.

Ray Train V2, FSDP2 and DeepSpeed are touched here only, so an upgrade of any of them is a one-file change;
PEFT only through madapt/lora.py. Rank 0 logs every step to the run's trackers (madapt/tracking.py), under
`<storage_path>/<run>` beside Ray Train's checkpoints, and posts it to a ProgressBoard actor from which the
driver draws a bar per adapter: the workers' own output stays in Ray's log files (madapt.cluster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from madapt import ensemble
from madapt.adapter_types import tensor_marker
from madapt.charts import plot_losses
from madapt.cluster import connect, wait_for_resources
from madapt.config import Config, ConfigError, LoraAdapterConfig, madapt_home, qlora_strategy_problems
from madapt.data import (
    READERS,
    Example,
    Truncation,
    examples_from_table,
    split_examples,
    tokenize_example,
    tokenize_examples,
)
from madapt.lora import (
    adapter_config,
    adapter_state,
    add_trainable_adapter,
    cut_ranks,
    load_adapter_state,
    peft_kind,
    unwrap,
)
from madapt.sources import DatasetLike, read_source
from madapt.splits import load_splits
from madapt.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterStore,
    CorruptAdapter,
    Manifest,
    filesystem_for,
    portable_filesystem,
)
from madapt.tracking import Tracker, TrackingSpec, config_digest, tracking_spec
from madapt.train import (
    EVAL_ROWS,
    EarlyStop,
    StepReport,
    TorchSteps,
    Trainer,
    TrainResult,
    TrainSettings,
    adamw,
    early_stop_for,
    eval_loss,
    micro_batches,
    report_truncation,
    run_params,
    settings_for,
    truncation_metrics,
)

OPTIMIZER = "optimizer.pt"
STATE = "state.json"
PROBE = "probe_logits.safetensors"
DEEPSPEED_DIR = "deepspeed"
PUBLISHED = "published.json"
BEST_WEIGHTS = "best_adapter_model.safetensors"
"""Under trainer.early_stop: the best evaluation's LoRA weights, carried by every checkpoint and published."""
FAIL_AT_STEP_ENV = "MADAPT_FAIL_AT_STEP"
"""Fault injection for tests: rank 1 (rank 0 with one worker) is SIGKILLed at this step on the first attempt."""
FAULT_GRACE_S = 5.0
METRICS_EVERY = 10
"""Steps between metric-only reports. Ray Train's result queue holds one report and the controller drains it
every couple of seconds, so reporting every (fast) step would stall training on the queue."""


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

    def write(self, directory: Path) -> None:
        (directory / STATE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, directory: Path) -> WorkerState:
        values = json.loads((directory / STATE).read_text())
        early = values.pop("early_stop", None)
        return cls(**values, early_stop=EarlyStop(**early) if early is not None else None)


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs, as plain values (the workers never see a Config)."""

    name: str
    base_model: str
    trust_remote_code: bool
    quantization_bits: int | None
    adapter: dict[str, Any]
    columns: dict[str, Any]
    eval_fraction: float
    settings: TrainSettings
    strategy: str
    deepspeed_stage: int
    checkpoint_every: int
    use_gpu: bool
    fail_at_step: int | None
    quantization_options: dict[str, Any] = field(default_factory=dict)
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)
    tracking: TrackingSpec | None = None
    """Rank 0's trackers (TensorBoard, MLflow, W&B); None tracks nothing."""
    eval_examples: list[Example] = field(default_factory=list)
    """Held-out examples every rank scores at each checkpoint and at the end (the trackers' eval/loss)."""
    shard: tuple[int, int] | None = None
    """(index, members) of an ensemble member: train on that shard of the training examples only."""


def run_spec(
    config: Config,
    name: str,
    num_examples: int,
    *,
    eval_dataset: bool | None = None,
    tracking: TrackingSpec | None = None,
    eval_examples: list[Example] | None = None,
) -> RunSpec:
    """Build a worker spec from the config; raise ConfigError for combinations that cannot work.
    `eval_dataset`: whether held-out data comes separately (default: the adapter's eval_dataset), so the
    workers carve none off."""
    trainer = config.backend.trainer
    bits = config.quantization.bits if config.quantization else None
    problems = qlora_strategy_problems(bits, trainer.strategy)
    if problems:
        raise ConfigError(problems)
    adapter = config.named_adapters[name]
    separate_eval = adapter.eval_dataset is not None if eval_dataset is None else eval_dataset
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    return RunSpec(
        name=name,
        base_model=config.base_model,
        trust_remote_code=config.trust_remote_code,
        quantization_bits=bits,
        adapter=adapter.model_dump(mode="json", exclude_unset=True),  # a type's options are the keys set
        columns={
            "input_column": config.input_column,
            "output_column": config.output_column,
            "template": config.prompt.template,
            "task": config.prompt.task,
        },
        eval_fraction=0.0 if separate_eval else config.trainer.eval_fraction,
        settings=settings_for(config.trainer, num_examples, trainer.num_workers),
        strategy=trainer.strategy,
        deepspeed_stage=trainer.deepspeed_stage,
        checkpoint_every=trainer.checkpoint_every,
        use_gpu=trainer.use_gpu,
        fail_at_step=int(fail_at) if fail_at else None,
        quantization_options=config.quantization.bnb_options() if config.quantization else {},
        deepspeed_extra=dict(trainer.deepspeed_config),
        tracking=tracking,
        eval_examples=list(eval_examples or [])[:EVAL_ROWS],
    )


# -- the worker -----------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: shard -> examples -> tokens -> wrapped model -> Trainer -> reports."""
    import ray.train
    import ray.train.torch

    from madapt.models import load_base

    spec: RunSpec = loop_config["spec"]
    board = loop_config.get("progress")  # a ProgressBoard handle, or None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    torch.manual_seed(spec.settings.seed)

    base = load_base(
        spec.base_model,
        dtype=torch.bfloat16 if spec.use_gpu else torch.float32,  # CPU kernels are fastest (and exact) in fp32
        quantization_bits=spec.quantization_bits,
        quantization_options=spec.quantization_options,
        trust_remote_code=spec.trust_remote_code,
        device=device if spec.quantization_bits else None,
    )
    rows = [tokenize_example(base.tokenizer, e, spec.settings.max_length) for e in shard_examples(spec)]
    eval_rows = [tokenize_example(base.tokenizer, e, spec.settings.max_length) for e in spec.eval_examples]
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
    state = WorkerState(base_fingerprint=base.fingerprint)  # in every checkpoint: publishing needs no base
    best: dict[str, torch.Tensor] = {}  # the best evaluation's LoRA weights, under early stopping
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = WorkerState.read(Path(directory))
            if spec.strategy != "deepspeed":
                load_adapter_state(peft_model, load_file(str(Path(directory) / WEIGHTS_FILE)), spec.name)
            if (Path(directory) / BEST_WEIGHTS).exists():
                best = load_file(str(Path(directory) / BEST_WEIGHTS))
        state.resumed_from.append(state.step)
    early = state.early_stop or EarlyStop(spec.settings.early_stop)

    model, trainer = wrap(peft_model, spec, device)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_optimizer(model, trainer, spec, Path(directory))
    trainer.step, trainer.stopped = state.step, state.stopped_early
    result = TrainResult(losses=list(state.losses), tokens=state.tokens, wall_s=state.wall_s)
    history = list(state.history)
    fail_rank = min(1, world - 1)
    first_attempt = checkpoint is None
    totals = {"tokens": state.tokens}
    tracker = Tracker(spec.tracking, resume_step=state.step) if rank == 0 and spec.tracking else None

    evaluated: set[int] = set()

    def evaluate(step: int) -> None:
        """Every rank scores the same held-out rows (a collective under FSDP); rank 0 logs the loss, and under
        early stopping every rank keeps the best adapter (gathering it is a collective too). Not on a
        quantized base: an eval-mode forward lets bitsandbytes repack 4-bit weights for its CPU inference
        kernel, and the adapter trained on afterwards no longer reproduces its logits on a fresh base."""
        if spec.quantization_bits is not None:
            return
        evaluated.add(step)
        pad = base.tokenizer.pad_token_id
        held_out = eval_loss(model, eval_rows, pad, spec.settings.held_out_batch_size, device)
        if tracker is not None:
            tracker.log({"eval/loss": held_out}, step)
            tracker.flush()
        if early.enabled and held_out is not None:
            agreed = all_reduce_sum(held_out, device) / world  # one decision on every rank, bit for bit
            if early.observe(step, agreed):
                best.clear()
                best.update(lora_tensors(model, spec))

    def on_step(report: StepReport) -> None:
        if spec.fail_at_step == report.step and first_attempt and rank == fail_rank:
            # Let the controller collect the last reported checkpoint (it polls workers every ~2 s) so the
            # crash lands after a committed checkpoint, then die as the OOM killer or a lost node kills it.
            time.sleep(FAULT_GRACE_S)
            os.kill(os.getpid(), signal.SIGKILL)
        history.append(report.step)
        global_tokens = int(all_reduce_sum(report.tokens - state.tokens, device)) + state.tokens
        result.losses[-1] = all_reduce_sum(report.loss, device) / world  # the mean loss over all shards
        totals["tokens"] = global_tokens
        if tracker is not None:
            tracked = report.tracked()
            tokens_per_s = global_tokens / max(result.wall_s, 1e-9)  # all workers' tokens, not this shard's
            tracked.update({"train/loss": result.losses[-1], "train/tokens_per_s": tokens_per_s})
            tracker.log(tracked, report.step)
        metrics = {
            "step": report.step,
            "total_steps": report.total_steps,
            "loss": result.losses[-1],
            "tokens": global_tokens,
            "tokens_per_s": global_tokens / max(result.wall_s, 1e-9),
        }
        if rank == 0:  # sys.stdout, not print: Ray Train patches print() and would log each line twice
            sys.stdout.write(
                f"[{spec.name}] step {report.step}/{report.total_steps} loss {result.losses[-1]:.4f} "
                f"{metrics['tokens_per_s']:.0f} tok/s\n"
            )
            sys.stdout.flush()
            if board is not None:
                board.post.remote(metrics)  # not awaited: the bar may lag, the step does not
        if spec.settings.evaluation_due(report.step):
            evaluate(report.step)
            trainer.stopped = early.should_stop and report.step < report.total_steps
        due = report.step % spec.checkpoint_every == 0 and report.step < report.total_steps and not trainer.stopped
        if due:
            checkpointed = run_state(report.step, result, totals, history, state, early)
            save_and_report(model, trainer, spec, metrics, checkpointed, rank, best=best)
        elif report.step % METRICS_EVERY == 0:
            ray.train.report(metrics)

    batches = micro_batches(rows, spec.settings.batch_size, base.tokenizer.pad_token_id, spec.settings.seed + rank)
    skip = trainer.step * spec.settings.gradient_accumulation_steps
    trainer.run(itertools.islice(batches, skip, None), on_step, result)

    if trainer.step not in evaluated and not state.stopped_early:  # a stopped run's last step was evaluated
        evaluate(trainer.step)
    if tracker is not None:
        tracker.close()
    probe = probe_logits(model, rows[0], device)
    final = run_state(trainer.step, result, totals, history, state, early, stopped_early=trainer.stopped)
    if device.type == "cuda":
        final.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    metrics = {"step": trainer.step, "total_steps": spec.settings.total_steps, "done": True, "tokens": totals["tokens"]}
    save_and_report(model, trainer, spec, metrics, final, rank, probe=probe, best=best)


def shard_examples(spec: RunSpec):
    """This worker's training examples: its Ray Data shard, formatted exactly as load_splits formats rows."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    examples = []
    for table in shard.iter_batches(batch_format="pyarrow", batch_size=None):
        examples += examples_from_table(table, source=f"{spec.name} shard", **spec.columns)
    train = split_examples(examples, spec.eval_fraction)[0]
    return ensemble.shard(train, *spec.shard) if spec.shard else train


def wrap(peft_model: torch.nn.Module, spec: RunSpec, device: torch.device) -> tuple[torch.nn.Module, Trainer]:
    """Apply the strategy and build the Trainer over the wrapped model."""
    import ray.train.torch

    if spec.strategy == "deepspeed":
        import deepspeed

        peft_model.to(device)
        engine, *_ = deepspeed.initialize(
            model=peft_model,
            optimizer=adamw(peft_model, spec.settings),
            config=deepspeed_config(spec),
            dist_init_required=False,
        )
        return engine, Trainer(engine, spec.settings, device, steps=DeepSpeedSteps(engine))
    if spec.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        peft_model.to(device)
        for module in peft_model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(peft_model)
        return peft_model, Trainer(peft_model, spec.settings, device)
    model = ray.train.torch.prepare_model(peft_model, move_to_device=spec.quantization_bits is None)
    return model, Trainer(model, spec.settings, device)


def deepspeed_config(spec: RunSpec) -> dict[str, Any]:
    """madapt's DeepSpeed config, with the rest of Ludwig's strategy dict (e.g. zero_optimization offloads)
    merged over it; batch sizes always follow the trainer section."""
    extra = dict(spec.deepspeed_extra)
    zero = {**extra.pop("zero_optimization", {}), "stage": spec.deepspeed_stage}
    config = {
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **extra,
        "train_micro_batch_size_per_gpu": spec.settings.batch_size,
        "gradient_accumulation_steps": spec.settings.gradient_accumulation_steps,
        "zero_optimization": zero,
    }
    offloads = [zero.get(k) for k in ("offload_optimizer", "offload_param")]
    if any(isinstance(o, dict) and o.get("device") not in (None, "none") for o in offloads):
        config.setdefault("zero_force_ds_cpu_optimizer", False)  # madapt passes a torch optimizer
    clip = spec.settings.clip_global_norm or spec.settings.clip_norm
    if clip is not None:
        config.setdefault("gradient_clipping", clip)
    return config


class DeepSpeedSteps:
    """The engine scales nothing (the loop already divides by accumulation) and steps at its boundary."""

    def __init__(self, engine):
        self.engine = engine

    def micro_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def grad_norm(self, model: torch.nn.Module) -> float | None:
        """The norm the engine measured at the accumulation boundary (None where it skips measuring)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def optimizer_step(self) -> None:
        """Nothing: the engine stepped at the accumulation boundary in micro_step."""


def lora_tensors(model: torch.nn.Module, spec: RunSpec) -> dict[str, torch.Tensor]:
    """The full adapter weights in PEFT's file format, gathered on every rank (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = unwrap(model)
    if spec.strategy == "deepspeed":
        import deepspeed

        trainable = [p for p in inner.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            marker = tensor_marker(peft_kind(inner.peft_config[spec.name]))
            state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if marker in k}
    else:
        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        state = get_model_state_dict(inner, options=options)
    tensors = adapter_state(inner, spec.name, state)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_and_report(
    model, trainer: Trainer, spec: RunSpec, metrics, state: WorkerState, rank, *, probe=None, best=None
) -> None:
    """Write a checkpoint (rank 0; every rank under DeepSpeed, whose optimizer state is partitioned), with
    the best evaluation's weights under early stopping."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    tensors = lora_tensors(model, spec)
    optimizer = None
    if spec.strategy != "deepspeed":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = get_optimizer_state_dict(unwrap(model), torch_optimizer(trainer), options=options)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        if spec.strategy == "deepspeed":
            model.save_checkpoint(str(path / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)
        if rank == 0:
            save_file(tensors, str(path / WEIGHTS_FILE))
            (path / CONFIG_FILE).write_text(json.dumps(adapter_config(unwrap(model), spec.name)))
            state.write(path)
            if optimizer is not None:
                torch.save(optimizer, path / OPTIMIZER)
            if probe is not None:
                save_file(probe, str(path / PROBE))
            if best:
                save_file(best, str(path / BEST_WEIGHTS))
        keep = rank == 0 or spec.strategy == "deepspeed"
        checkpoint = ray.train.Checkpoint.from_directory(directory) if keep else None
        ray.train.report(metrics, checkpoint=checkpoint)


def load_optimizer(model, trainer: Trainer, spec: RunSpec, directory: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if spec.strategy == "deepspeed":
        model.load_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", load_module_strict=False)
        return
    state = torch.load(directory / OPTIMIZER, weights_only=True)
    set_optimizer_state_dict(
        unwrap(model), torch_optimizer(trainer), state, options=StateDictOptions(full_state_dict=True)
    )


def torch_optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    """The optimizer whose state a checkpoint carries (DeepSpeed checkpoints its own engine instead)."""
    if not isinstance(trainer.steps, TorchSteps):
        raise TypeError(f"no torch optimizer in {type(trainer.steps).__name__}")
    return trainer.steps.optimizer


def run_state(
    step: int,
    result: TrainResult,
    totals: dict[str, int],
    history: list[int],
    previous: WorkerState,
    early: EarlyStop,
    *,
    stopped_early: bool = False,
) -> WorkerState:
    """The state to checkpoint after `step`, continuing `previous` (its resume points and base)."""
    return WorkerState(
        base_fingerprint=previous.base_fingerprint,
        step=step,
        losses=list(result.losses),
        tokens=totals["tokens"],
        wall_s=result.wall_s,
        history=list(history),
        resumed_from=list(previous.resumed_from),
        early_stop=dataclasses.replace(early) if early.enabled else None,
        stopped_early=stopped_early,
    )


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


# -- the driver -----------------------------------------------------------------------------------


def train_ray(
    config: Config,
    name: str,
    store: AdapterStore,
    *,
    dataset: DatasetLike | None = None,
    eval_dataset: DatasetLike | None = None,
    member: tuple[str, int, int] | None = None,
    progress: bool = True,
) -> Manifest:
    """Train adapter `name` as one Ray Train run (resuming an unfinished run of the same config and data) and
    publish it; `dataset` and `eval_dataset` replace the config's (see `load_splits`). `progress`: draw a bar
    of its steps and losses.

    An adapter with an `ensemble` trains its members as parallel runs, then publishes their merge;
    `member` = (published name, shard index, members) is one of those runs."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from madapt.models import load_tokenizer

    if member is None and config.named_adapters[name].ensemble is not None:
        connect(start=True)

        def train_member(*member: Any) -> Manifest:
            return train_ray(
                config, name, store, dataset=dataset, eval_dataset=eval_dataset, member=member, progress=progress
            )

        return ensemble.train_ensemble(config, name, store, train_member, parallel=True)
    published = member[0] if member else name
    train_examples, eval_examples = load_splits(config, name, dataset, eval_dataset)  # bad data fails first
    if member is not None:
        train_examples = ensemble.member_examples(name, train_examples, member[1], member[2])
    tokenizer = load_tokenizer(config.base_model, trust_remote_code=config.trust_remote_code)
    _, truncation = tokenize_examples(tokenizer, train_examples, config.trainer.max_length)
    report_truncation(published, len(train_examples), truncation)
    trainer_config = config.backend.trainer
    has_eval = eval_dataset is not None or config.named_adapters[name].eval_dataset is not None
    spec = run_spec(config, name, len(train_examples), eval_dataset=has_eval)  # refuses impossible combinations
    connect(start=True)
    resources = worker_resources(config)
    check_resources(name, trainer_config.num_workers, resources, ray.cluster_resources())
    storage = storage_path(config, alive_nodes=sum(1 for node in ray.nodes() if node["Alive"]))
    data = None if dataset is None else examples_digest(train_examples)
    run = run_name(config, name, storage, published, data=data)
    # Built here, not from the URI in Ray Train's controller and workers, whose processes may not know this
    # driver's AWS_ENDPOINT_URL and keys: a portable filesystem carries them wherever it is sent.
    storage_fs, storage_location = portable_filesystem(storage) if "://" in storage else (None, storage)
    tracking = tracking_spec(config, run, f"{storage}/{run}", run_params(config, name, spec.settings))
    if storage_fs is not None:  # the workers write the run's events through it too
        tracking = dataclasses.replace(tracking, located=(storage_fs, f"{storage_location.rstrip('/')}/{run}"))
    spec = run_spec(
        config, name, len(train_examples), eval_dataset=has_eval, tracking=tracking, eval_examples=eval_examples
    )
    spec = dataclasses.replace(spec, name=published, shard=member[1:] if member else None)
    early_stop_for(spec.settings, published, spec.eval_examples)  # refuses early_stop without held-out rows
    already = published_by(store, published, run)
    if already is not None:  # a driver that died between publishing and marking the run: publish nothing twice
        mark_published(storage, run, already)
        return already
    with progress_bar(published, enabled=progress) as board:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec, "progress": board},
            datasets={"train": read_dataset(dataset if dataset is not None else config.dataset_for(name))},
            scaling_config=ray.train.ScalingConfig(
                num_workers=trainer_config.num_workers, use_gpu=trainer_config.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=run,
                storage_path=storage_location,
                storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=trainer_config.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"adapter {published!r}: Ray Train run {run!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        manifest = publish_checkpoint(Path(directory), config, spec, store, run, truncation)
    mark_published(storage, run, manifest)
    return manifest


class ProgressBoard:
    """Rank 0's latest step metrics, held by a zero-CPU actor: the driver draws its bar from them, so progress
    shows without the workers' output (which stays in Ray's log files unless --verbose)."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}

    def post(self, metrics: dict[str, Any]) -> None:
        self.latest = metrics

    def read(self) -> dict[str, Any]:
        return self.latest


@contextlib.contextmanager
def progress_bar(name: str, *, enabled: bool) -> Iterator[Any]:
    """A bar of adapter `name`'s steps, loss and tokens/s, redrawn each second from the ProgressBoard actor
    it yields (None when not `enabled`)."""
    if not enabled:
        yield None
        return
    import ray
    from tqdm import tqdm

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    bar = tqdm(desc=f"train {name}", unit="step", dynamic_ncols=True)
    stopped = threading.Event()

    def redraw() -> None:
        metrics = ray.get(board.read.remote())
        if metrics and metrics["step"] != bar.n:  # one redraw per step, not per poll
            bar.total = metrics["total_steps"]
            bar.update(metrics["step"] - bar.n)
            bar.set_postfix_str(f"loss {metrics['loss']:.4f}, {metrics['tokens_per_s']:.0f} tok/s")

    def follow() -> None:
        while not stopped.wait(1.0):
            redraw()

    thread = threading.Thread(target=follow, name=f"progress-{name}", daemon=True)
    thread.start()
    try:
        yield board
        stopped.set()
        thread.join()
        redraw()
    finally:
        stopped.set()
        bar.close()
        ray.kill(board)


def publish_checkpoint(
    directory: Path, config: Config, spec: RunSpec, store: AdapterStore, run: str, truncation: Truncation
) -> Manifest:
    state = WorkerState.read(directory)
    result = TrainResult(losses=state.losses, tokens=state.tokens, wall_s=state.wall_s)
    metrics = {
        **result.metrics(),
        **truncation_metrics(truncation),
        "losses": result.losses,
        "backend": "ray",
        "strategy": spec.strategy,
        "num_workers": config.backend.trainer.num_workers,
        "run": run,
        "run_dir": spec.tracking.run_dir if spec.tracking else None,
        "resumed_from": state.resumed_from,
        "steps_trained": state.history,
        **({"peak_gpu_bytes": state.peak_gpu_bytes} if state.peak_gpu_bytes is not None else {}),
    }
    weights = directory / WEIGHTS_FILE
    if state.early_stop is not None:  # publish the best evaluation's adapter, not the last step's
        weights = directory / BEST_WEIGHTS
        metrics.update(state.early_stop.metrics(state.step if state.stopped_early else None))
        metrics["eval_loss"] = state.early_stop.best_loss
    peft_config = json.loads((directory / CONFIG_FILE).read_text())
    manifest = store.publish(
        spec.name,
        peft_config,
        cut_ranks(peft_config, load_file(str(weights))),
        base_model=config.base_model,
        base_fingerprint=state.base_fingerprint,
        metrics=metrics,
        response_format=config.response_format,
    )
    plot_losses(spec.name, manifest.version, result.losses)
    return manifest


def read_dataset(dataset: DatasetLike | None):
    """The adapter's data as a Ray Dataset in file order (so one worker sees what train_local sees): a CSV,
    JSONL or Parquet file or URI through Ray Data's reader (CSV cells as text, as train_local reads them;
    a URI with this driver's endpoint and keys),
    any other source read on the driver by sources.py."""
    import pyarrow.csv as pa_csv
    import ray.data

    assert dataset is not None  # load_splits already refused a missing dataset
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the workers print per-step progress; a bar per shard is noise
    kind = READERS.get(Path(dataset).suffix.lower()) if isinstance(dataset, str | os.PathLike) else None
    if kind is None:
        return ray.data.from_arrow(read_source(dataset))
    path = os.fspath(dataset)
    # A URI is resolved here: the read tasks may lack this driver's endpoint and keys (portable_filesystem).
    filesystem, location = portable_filesystem(path) if "://" in path else (None, path)
    if kind == "csv":
        text = {name: pa.string() for name in read_source(path).column_names}
        options = pa_csv.ConvertOptions(column_types=text)
        return ray.data.read_csv(location, filesystem=filesystem, convert_options=options)
    if kind == "json":
        return ray.data.read_json(location, filesystem=filesystem)
    return ray.data.read_parquet(location, filesystem=filesystem)


def worker_resources(config: Config) -> dict[str, float]:
    """Explicit resources, else one GPU per worker, else half a CPU (two workers, the controller and the data
    actors then fit a 2-core machine; a full CPU each hangs waiting for the CPU they hold)."""
    trainer = config.backend.trainer
    if trainer.resources_per_worker:
        return dict(trainer.resources_per_worker)
    return {"CPU": 1.0, "GPU": 1.0} if trainer.use_gpu else {"CPU": 0.5}


def check_resources(name: str, num_workers: int, per_worker: dict[str, float], cluster: dict[str, float]) -> None:
    """Fail fast on a request the cluster can never satisfy, instead of waiting for it forever."""
    problems = [
        f"backend.trainer: adapter {name!r} needs {amount * num_workers:g} {key} "
        f"({num_workers} workers x {amount:g}) but the Ray cluster has {cluster.get(key, 0):g}"
        for key, amount in per_worker.items()
        if amount * num_workers > cluster.get(key, 0)
    ]
    if problems:
        raise ConfigError(problems)


def storage_path(config: Config, *, alive_nodes: int) -> str:
    """Where Ray Train keeps runs: `storage_path`, else MADAPT_HOME/ray_runs; shared storage on multi-node."""
    path = config.backend.trainer.storage_path
    if path is None:
        path = str(madapt_home() / "ray_runs")
    if "://" not in path:
        if alive_nodes > 1:
            raise ConfigError(
                [
                    f"backend.trainer.storage_path: {path!r} is local but the Ray cluster has {alive_nodes} nodes; "
                    "use shared storage (s3://, gs://, or an NFS mount given as file://)"
                ]
            )
        path = str(Path(path).expanduser().resolve())
    return path


def run_name(config: Config, name: str, storage: str, label: str | None = None, *, data: str | None = None) -> str:
    """`<label>-<config hash>-<n>` (label: the adapter, or an ensemble member): the first generation of this
    config not yet published, so rerunning an interrupted command resumes its run while rerunning a finished
    one trains afresh. `data`: a digest of data given outside the config (`--dataset`), which the config's
    own paths do not name."""
    digest = config_digest(config, name)
    if data is not None:
        digest = hashlib.sha256(f"{digest}:{data}".encode()).hexdigest()[:10]
    fs, root = filesystem_for(storage)
    for generation in itertools.count(1):
        run = f"{label or name}-{digest}-{generation}"
        if fs.get_file_info(f"{root}/{run}/{PUBLISHED}").type == pafs.FileType.NotFound:
            return run
    raise AssertionError("unreachable")


def examples_digest(examples: list) -> str:
    """Identifies training data given outside the config, whatever its source (file, DataFrame, hub)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt, example.response, example.messages]).encode())
    return digest.hexdigest()[:10]


def published_by(store: AdapterStore, name: str, run: str) -> Manifest | None:
    """The version of `name` that run `run` published, if any."""
    for version in reversed(store.versions(name)):
        try:
            manifest = store.manifest(f"{name}@{version}")
        except CorruptAdapter:
            continue  # not this run's: a run's own publish is verified before it is marked
        if manifest.metrics.get("run") == run:
            return manifest
    return None


def mark_published(storage: str, run: str, manifest: Manifest) -> None:
    fs, root = filesystem_for(storage)
    fs.create_dir(f"{root}/{run}", recursive=True)
    with fs.open_output_stream(f"{root}/{run}/{PUBLISHED}") as stream:
        stream.write(json.dumps({"ref": manifest.ref}).encode())


def train_adapters(
    config: Config,
    names: list[str],
    store: AdapterStore,
    *,
    parallel: bool = False,
    datasets: dict[str, DatasetLike] | None = None,
    eval_datasets: dict[str, DatasetLike] | None = None,
    progress: bool = True,
) -> list[Manifest]:
    """Train several adapters, one Ray Train run each; `parallel` runs them side by side (Ray queues the
    workers of runs that do not fit yet). `datasets`/`eval_datasets`: per adapter, replacing the config's.

    First, the cluster must have one run's workers free within a bounded time (see madapt.cluster): Ray
    Train would otherwise wait forever for resources that Serve replicas or other jobs hold."""
    datasets, eval_datasets = datasets or {}, eval_datasets or {}
    connect(start=True)
    trainer = config.backend.trainer
    per_worker = worker_resources(config)
    workers = (
        f"Ray Train's {trainer.num_workers} worker(s) ({', '.join(f'{v:g} {k}' for k, v in per_worker.items())} each)"
    )
    wait_for_resources({key: amount * trainer.num_workers for key, amount in per_worker.items()}, workers)

    def train(name: str) -> Manifest:
        return train_ray(
            config, name, store, dataset=datasets.get(name), eval_dataset=eval_datasets.get(name), progress=progress
        )

    if not parallel:
        return [train(name) for name in names]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(train, names))
