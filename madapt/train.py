"""The training loop of one adapter, shared by the local trainer and every Ray Train worker.

`Trainer` owns the model, optimizer and step counter; `run` drives micro-batches through it and calls
back after every optimizer step so the caller decides about progress bars, reports and checkpoints.
`train_local` is the one-process path (`backend.type: local`); distributed.py wraps the same loop in a
Ray TorchTrainer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from madapt.config import TORCH_OPTIMIZERS, Config, ConfigError, TrainerConfig
from madapt.data import (
    Truncation,
    collate,
    tokenize_example,
    tokenize_examples,
)
from madapt.lora import (
    add_trainable_adapter,
    extract_for_original_base,
    initialize_eva,
    mutates_base,
    rank_allocator,
    snapshot_init,
)
from madapt.models import load_base
from madapt.sources import DatasetLike
from madapt.splits import load_splits
from madapt.store import AdapterStore, Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    total_steps: int
    max_length: int
    seed: int
    optimizer: str = "adamw"
    optimizer_params: dict[str, Any] = field(default_factory=dict)
    """Ludwig's trainer.optimizer parameters (betas, eps, momentum...) as given; torch's defaults otherwise."""
    decay: str | None = None
    decay_rate: float = 0.96
    decay_steps: int = 10000
    staircase: bool = False
    warmup_steps: float = 0.0
    cosine_period: int | None = None
    cosine_mult: int = 1
    eta_min: float = 0.0
    clip_global_norm: float | None = None
    clip_norm: float | None = None
    clip_value: float | None = None
    gradient_checkpointing: bool = False
    steps_per_checkpoint: int = 0
    """Optimizer steps between held-out evaluations (Ludwig's checkpoints); 0: only after the last step."""
    early_stop: int = -1
    """Evaluations without a lower held-out loss before training stops; -1 or 0: never stop early."""
    eval_batch_size: int | None = None
    """Held-out rows per forward pass; None: batch_size."""

    @property
    def held_out_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    def evaluation_due(self, step: int) -> bool:
        """Whether Ludwig's checkpoint cadence evaluates the held-out loss after optimizer step `step`."""
        return self.steps_per_checkpoint > 0 and step % self.steps_per_checkpoint == 0

    def lr_factor(self, step: int) -> float:
        """Ludwig's schedule (ludwig/modules/lr_scheduler.py): the multiplier of the learning rate for the
        optimizer step `step` (0-based): linear warm-up from 0 over `warmup_steps`, then the decay counted
        from the end of warm-up."""
        warmup = self.warmup_steps
        if step < warmup:
            return step / max(1.0, warmup)
        after = step - math.ceil(warmup) if warmup else step
        remaining = max(1, self.total_steps - math.ceil(warmup))
        if self.decay == "linear":
            return max(0.0, (remaining - after) / remaining)
        if self.decay == "exponential":
            exponent = 1 + after / self.decay_steps
            return float(self.decay_rate ** (math.ceil(exponent) if self.staircase else exponent))
        if self.decay == "cosine":  # torch's CosineAnnealingWarmRestarts, as Ludwig runs it
            period, position = self.cosine_period or remaining, after
            while position >= period:
                position -= period
                period *= self.cosine_mult
            floor = self.eta_min / self.learning_rate
            return floor + (1 - floor) * (1 + math.cos(math.pi * position / period)) / 2
        return 1.0

    def learning_rate_at(self, step: int) -> float:
        return self.learning_rate * self.lr_factor(step)


@dataclass
class StepReport:
    step: int
    total_steps: int
    loss: float
    tokens: int
    tokens_per_s: float
    learning_rate: float = 0.0
    grad_norm: float | None = None
    """The gradient norm before clipping; None where the engine does not expose it."""
    clipped_grad_norm: float | None = None
    """The norm the optimizer stepped with, after gradient_clipping; None without clipping (or under
    DeepSpeed, which clips inside its engine)."""

    def tracked(self) -> dict[str, float | None]:
        """The step's metrics under the names the trackers show (TensorBoard tags, MLflow keys)."""
        return {
            "train/loss": self.loss,
            "train/learning_rate": self.learning_rate,
            "train/grad_norm": self.grad_norm,
            "train/grad_norm_clipped": self.clipped_grad_norm,
            "train/tokens_per_s": self.tokens_per_s,
        }


@dataclass
class EarlyStop:
    """Ludwig's trainer.early_stop on the held-out loss: the best evaluation so far and how many evaluations
    since failed to beat it. Plain values, so a Ray checkpoint carries them across a restart."""

    patience: int
    best_step: int | None = None
    best_loss: float | None = None
    without_improvement: int = 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def observe(self, step: int, loss: float) -> bool:
        """Count one evaluation; True when it is the best so far (its adapter is the one to publish)."""
        if self.best_loss is None or loss < self.best_loss:
            self.best_step, self.best_loss, self.without_improvement = step, loss, 0
            return True
        self.without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.without_improvement >= self.patience

    def metrics(self, stopped_at: int | None) -> dict[str, Any]:
        """What the manifest records: the published (best) step, its held-out loss, and where training
        stopped early (None when it ran every step)."""
        return {"best_step": self.best_step, "best_eval_loss": self.best_loss, "stopped_early_at": stopped_at}


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0

    def metrics(self) -> dict[str, float]:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "steps": len(self.losses),
            "first_loss": self.losses[0] if self.losses else math.nan,
            "final_loss": sum(tail) / len(tail) if tail else math.nan,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s else 0.0,
            "wall_s": self.wall_s,
        }


def settings_for(trainer: TrainerConfig, num_examples: int, world_size: int = 1) -> TrainSettings:
    """Resolve epochs/max_steps into a step count for `num_examples` shared by `world_size` workers, and
    Ludwig's optimizer, learning_rate_scheduler and gradient_clipping into plain values."""
    per_step = trainer.batch_size * trainer.gradient_accumulation_steps * world_size
    steps_per_epoch = max(1, math.ceil(num_examples / per_step))
    total = trainer.max_steps or trainer.epochs * steps_per_epoch
    schedule = trainer.learning_rate_scheduler
    steps_per_checkpoint = trainer.steps_per_checkpoint or max(
        1, steps_per_epoch // (trainer.checkpoints_per_epoch or 1)
    )
    warmup = max(schedule.warmup_fraction * total, schedule.warmup_evaluations * steps_per_checkpoint)
    params = trainer.optimizer.params()
    clipping = trainer.gradient_clipping
    return TrainSettings(
        batch_size=trainer.batch_size,
        gradient_accumulation_steps=trainer.gradient_accumulation_steps,
        learning_rate=trainer.learning_rate,
        weight_decay=params.pop("weight_decay", trainer.weight_decay),
        total_steps=total,
        max_length=trainer.max_length,
        seed=trainer.seed,
        optimizer=trainer.optimizer.type,
        optimizer_params={k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        decay=None if schedule.decay == "none" else schedule.decay,
        decay_rate=schedule.decay_rate,
        decay_steps=schedule.decay_steps,
        staircase=schedule.staircase,
        warmup_steps=warmup,
        cosine_period=schedule.t_0,
        cosine_mult=schedule.t_mult,
        eta_min=schedule.eta_min,
        clip_global_norm=clipping.clipglobalnorm if clipping else None,
        clip_norm=clipping.clipnorm if clipping else None,
        clip_value=clipping.clipvalue if clipping else None,
        gradient_checkpointing=trainer.enable_gradient_checkpointing,
        steps_per_checkpoint=steps_per_checkpoint,
        early_stop=trainer.early_stop,
        eval_batch_size=trainer.eval_batch_size,
    )


def micro_batches(
    rows: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int, seed: int, start_epoch: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled micro-batches, reshuffled each epoch with a seed derived from the epoch."""
    epoch = start_epoch
    while True:
        order = list(range(len(rows)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([rows[i] for i in order[start : start + batch_size]], pad_token_id)
        epoch += 1


class Steps(Protocol):
    """How a micro-batch loss becomes an update: plain autograd + optimizer, or a DeepSpeed engine."""

    def micro_step(self, loss: torch.Tensor) -> None: ...

    def grad_norm(self, model: torch.nn.Module) -> float | None:
        """The global gradient norm of this optimizer step, before clipping (None if not known)."""
        ...

    def optimizer_step(self) -> None: ...


class TorchSteps:
    """`after_update` runs between the optimizer step and zeroing the gradients (AdaLoRA's rank budget)."""

    def __init__(self, optimizer: torch.optim.Optimizer, after_update: Callable[[], None] | None = None):
        self.optimizer = optimizer
        self.after_update = after_update

    def micro_step(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self, model: torch.nn.Module) -> float | None:
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads)
        full = getattr(norm, "full_tensor", None)  # FSDP2's sharded gradients give a DTensor
        return float((full() if full is not None else norm).item())

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if self.after_update is not None:
            self.after_update()
        self.optimizer.zero_grad(set_to_none=True)


def build_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """The torch optimizer Ludwig's trainer.optimizer names, with its parameters (AdamW by default)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    torch_name = TORCH_OPTIMIZERS[settings.optimizer][0]
    options = dict(settings.optimizer_params)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    optimizer: torch.optim.Optimizer = getattr(torch.optim, torch_name)(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay, **options
    )
    return optimizer


adamw = build_optimizer
"""The former name (AdamW was the only optimizer); kept for callers."""


def clips(settings: TrainSettings) -> bool:
    return not (settings.clip_global_norm is None and settings.clip_norm is None and settings.clip_value is None)


def clip_gradients(model: torch.nn.Module, settings: TrainSettings) -> None:
    """Ludwig's gradient_clipping: the global norm, then the norm, then each value."""
    if not clips(settings):
        return
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if settings.clip_global_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, settings.clip_global_norm)
    if settings.clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)
    if settings.clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, settings.clip_value)


class Trainer:
    """Optimizer steps over micro-batches; `step` counts finished optimizer steps (for resuming)."""

    def __init__(
        self,
        model: torch.nn.Module,
        settings: TrainSettings,
        device: torch.device | str = "cpu",
        steps: Steps | None = None,
    ):
        self.model = model
        self.settings = settings
        self.device = torch.device(device)
        allocate = rank_allocator(model)
        self.steps = steps or TorchSteps(
            adamw(model, settings), None if allocate is None else lambda: allocate(self.step)
        )
        self.step = 0
        self.stopped = False
        """Set by a step callback (early stop) to end `run` before total_steps."""

    def run(
        self,
        batches: Iterator[dict[str, torch.Tensor]],
        on_step: Callable[[StepReport], None] = lambda report: None,
        result: TrainResult | None = None,
    ) -> TrainResult:
        result = result or TrainResult()
        self.model.train()
        started = time.perf_counter() - result.wall_s
        accum = self.settings.gradient_accumulation_steps
        while self.step < self.settings.total_steps and not self.stopped:
            learning_rate = self.settings.learning_rate_at(self.step)
            self.set_learning_rate(learning_rate)
            step_loss, step_tokens = 0.0, 0
            for _ in range(accum):
                batch = {k: v.to(self.device) for k, v in next(batches).items()}
                loss = self.model(**batch).loss / accum
                self.steps.micro_step(loss)
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
            grad_norm = self.steps.grad_norm(self.model)
            clipped_grad_norm = None
            if isinstance(self.steps, TorchSteps) and clips(self.settings):  # DeepSpeed clips inside its engine
                clip_gradients(self.model, self.settings)
                clipped_grad_norm = self.steps.grad_norm(self.model)
            self.steps.optimizer_step()
            self.step += 1
            result.losses.append(step_loss)
            result.tokens += step_tokens
            result.wall_s = time.perf_counter() - started
            on_step(
                StepReport(
                    self.step,
                    self.settings.total_steps,
                    step_loss,
                    result.tokens,
                    result.tokens / result.wall_s,
                    learning_rate,
                    grad_norm,
                    clipped_grad_norm,
                )
            )
        return result

    def set_learning_rate(self, lr: float) -> None:
        """Set the schedule's rate on the optimizer (DeepSpeed's engine wraps a torch optimizer too)."""
        engine = getattr(self.steps, "engine", None)
        optimizer = getattr(self.steps, "optimizer", None) or getattr(engine, "optimizer", None)
        for group in getattr(optimizer, "param_groups", []):
            group["lr"] = lr


def report_truncation(name: str, total: int, truncation: Truncation) -> None:
    """One line per adapter at train start: how many rows max_length cuts, and by how many tokens."""
    log.log(logging.WARNING if truncation.rows else logging.INFO, "adapter %r: %s", name, truncation.describe(total))


EVAL_ROWS = 256
"""Held-out rows scored for a run's eval loss (the trackers' `eval/loss`); `madapt eval` scores them all."""


def run_params(config: Config, name: str, settings: TrainSettings) -> dict[str, Any]:
    """What MLflow and W&B record as the run's parameters: the adapter and the resolved training settings."""
    return {"adapter": config.named_adapters[name].model_dump(mode="json"), "trainer": dataclasses.asdict(settings)}


def eval_loss(model: torch.nn.Module, rows: Sequence[dict[str, list[int]]], pad_token_id: int, batch_size: int, device):
    """Mean held-out token loss of the model as it is now (None without held-out rows); leaves it training."""
    from madapt.evaluate import heldout_loss

    if not rows:
        return None
    model.eval()
    with torch.no_grad():  # no graph: a DDP-wrapped model would also expect a backward after this forward
        loss, _ = heldout_loss(model, rows, pad_token_id, batch_size, device=device)
    model.train()
    return loss


def train_local(
    config: Config,
    name: str,
    store: AdapterStore,
    *,
    progress: bool = True,
    dataset: DatasetLike | None = None,
    eval_dataset: DatasetLike | None = None,
    member: tuple[str, int, int] | None = None,
) -> Manifest:
    """Train one adapter in this process and publish it (the `backend.type: local` path); `dataset` and
    `eval_dataset` replace the config's (see `load_splits`). The run is tracked under
    MADAPT_HOME/local_runs/<run> and its loss curve drawn per published version.

    An adapter with an `ensemble` trains each member, then publishes their merge (madapt/ensemble.py);
    `member` = (published name, shard index, members) trains one member on its shard."""
    from tqdm.auto import tqdm

    from madapt import ensemble
    from madapt.charts import plot_losses
    from madapt.tracking import Tracker, local_run_dir, tracking_spec

    if member is None and config.named_adapters[name].ensemble is not None:
        return ensemble.train_ensemble(
            config,
            name,
            store,
            lambda *m: train_local(
                config, name, store, progress=progress, dataset=dataset, eval_dataset=eval_dataset, member=m
            ),
        )
    published = member[0] if member else name
    torch.manual_seed(config.trainer.seed)
    train_examples, eval_examples = load_splits(config, name, dataset, eval_dataset)
    if member is not None:
        train_examples = ensemble.member_examples(name, train_examples, member[1], member[2])
    bits = config.quantization.bits if config.quantization else None
    base = load_base(
        config.base_model,
        quantization_bits=bits,
        quantization_options=config.quantization.bnb_options() if config.quantization else None,
        trust_remote_code=config.trust_remote_code,
    )
    rows, truncation = tokenize_examples(base.tokenizer, train_examples, config.trainer.max_length)
    report_truncation(published, len(rows), truncation)
    eval_rows = [tokenize_example(base.tokenizer, e, config.trainer.max_length) for e in eval_examples[:EVAL_ROWS]]
    settings = settings_for(config.trainer, len(rows))
    model = add_trainable_adapter(
        base.model,
        config.named_adapters[name],
        name,
        quantized=bits is not None,
        gradient_checkpointing=settings.gradient_checkpointing,
        calibration=[row["input_ids"] for row in rows],
        total_steps=settings.total_steps,
    )
    if config.named_adapters[name].peft_init == "eva":
        pad = base.tokenizer.pad_token_id
        initialize_eva(model, name, micro_batches(rows, settings.batch_size, pad, settings.seed), progress=progress)
    scratch = tempfile.TemporaryDirectory(prefix="madapt-init-")
    initial = snapshot_init(model, name, scratch.name) if mutates_base(config.named_adapters[name].peft_init) else None
    trainer = Trainer(model, settings)
    early = early_stop_for(settings, published, eval_rows)
    best: dict[str, torch.Tensor] = {}
    run, run_dir = local_run_dir(config, name, published)
    tracker = Tracker(tracking_spec(config, run, str(run_dir), run_params(config, name, settings)))
    bar = tqdm(total=settings.total_steps, desc=f"train {published}", disable=not progress)
    pad = base.tokenizer.pad_token_id
    scores: dict[int, float | None] = {}

    def evaluate() -> None:
        """Score the held-out rows, log the loss, and keep the best adapter under early stopping."""
        held_out = scores[trainer.step] = eval_loss(model, eval_rows, pad, settings.held_out_batch_size, trainer.device)
        tracker.log({"eval/loss": held_out}, trainer.step)
        if early.enabled and held_out is not None and early.observe(trainer.step, held_out):
            best.update(trainable_state(model))

    def show(report: StepReport) -> None:
        tracker.log(report.tracked(), report.step)
        bar.update(1)
        bar.set_postfix(loss=f"{report.loss:.3f}", tok_s=f"{report.tokens_per_s:.0f}")
        if settings.evaluation_due(report.step) and bits is None:  # see distributed.py's evaluate on quantized
            evaluate()
            trainer.stopped = early.should_stop

    try:
        result = trainer.run(micro_batches(rows, settings.batch_size, pad, settings.seed), show)
        bar.close()
        if trainer.step not in scores:
            evaluate()
        held_out = scores[trainer.step]
        if early.enabled:  # publish the best evaluation's adapter, not the last step's
            restore_trainable(model, best)
            held_out = early.best_loss
    finally:
        tracker.close()
    with scratch:
        adapter_config, tensors = extract_for_original_base(model, name, initial)
    manifest = store.publish(
        published,
        adapter_config,
        tensors,
        base_model=config.base_model,
        base_fingerprint=base.fingerprint,
        metrics={
            **result.metrics(),
            **truncation_metrics(truncation),
            "losses": result.losses,
            "backend": "local",
            "examples": len(rows),
            "run": run,
            "run_dir": str(run_dir),
            **({"eval_loss": held_out} if held_out is not None else {}),
            **(early.metrics(trainer.step if trainer.step < settings.total_steps else None) if early.enabled else {}),
        },
        response_format=config.response_format,
    )
    plot_losses(published, manifest.version, result.losses)
    return manifest


def early_stop_for(settings: TrainSettings, name: str, eval_rows: Sequence[object]) -> EarlyStop:
    """The run's early stopping; refused without held-out rows to watch (validate catches the config's
    eval_fraction 0; this is data that left none, e.g. a tiny dataset or an empty --eval-dataset)."""
    early = EarlyStop(settings.early_stop)
    if early.enabled and not eval_rows:
        raise ConfigError(
            [f"trainer.early_stop: adapter {name!r} has no held-out rows to watch; give an eval_dataset or more data"]
        )
    return early


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trained (adapter) parameters, to restore the best evaluation's adapter at the end."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, parameter in model.named_parameters():
        if key in state:
            parameter.copy_(state[key])


def truncation_metrics(truncation: Truncation) -> dict[str, int]:
    return {"truncated_rows": truncation.rows, "truncated_tokens": truncation.tokens}
