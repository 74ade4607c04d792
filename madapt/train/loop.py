"""One adapter's training loop, the one both drivers run (local.py in this process, worker.py in each Ray
Train worker): the optimizer step (`Trainer`), held-out evaluation at Ludwig's checkpoints with early stopping
and step metrics to the trackers (`Monitor`), the metrics a version is published with, and the ensemble
dispatch (an adapter with an `ensemble` trains its members, then publishes their merge).

A driver only decides where the rows come from, where the loop runs and how its state survives a restart.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from madapt import ensemble
from madapt.charts import plot_losses
from madapt.config import TORCH_OPTIMIZERS, Config, ConfigError
from madapt.data import Example, Truncation, collate, tokenize_example, tokenize_examples
from madapt.evaluate import heldout_loss
from madapt.lora import rank_allocator
from madapt.sources import DatasetLike
from madapt.splits import load_preference_splits, load_splits
from madapt.store import AdapterStore, Manifest
from madapt.tracking import Tracker
from madapt.train.objectives import Collate, objective_for, preference_held_out, tokenize_preference
from madapt.train.settings import TrainSettings

log = logging.getLogger(__name__)

EVAL_ROWS = 256
"""Held-out rows scored for a run's eval loss (the trackers' `eval/loss`); `madapt eval` scores them all."""

Member = tuple[str, int, int]
"""One ensemble member's run: (its published name, its shard index, the number of members)."""


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
    objective: dict[str, float] = field(default_factory=dict)
    """A preference objective's metrics (rewards/chosen, rewards/margins, ...), averaged over the step's
    micro-batches; empty for fine-tuning."""

    def tracked(self) -> dict[str, float | None]:
        """The step's metrics under the names the trackers show (TensorBoard tags, MLflow keys)."""
        return {
            "train/loss": self.loss,
            "train/learning_rate": self.learning_rate,
            "train/grad_norm": self.grad_norm,
            "train/grad_norm_clipped": self.clipped_grad_norm,
            "train/tokens_per_s": self.tokens_per_s,
            **{f"train/{key}": value for key, value in self.objective.items()},
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


def micro_batches(
    rows: Sequence[Any],
    batch_size: int,
    pad_token_id: int,
    seed: int,
    start_epoch: int = 0,
    collate: Collate = collate,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled micro-batches, reshuffled each epoch with a seed derived from the epoch; `collate`
    pads them (objectives.collate_for: fine-tuning rows, preference pairs or KTO rows)."""
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


class Averages:
    """Means of named metrics over the micro-batches that reported them."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: total / self.counts[key] for key, total in self.totals.items()}


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
            build_optimizer(model, settings), None if allocate is None else lambda: allocate(self.step)
        )
        self.objective = objective_for(settings)
        """The micro-batch loss trainer.type asks for: the model's own, or a preference objective."""
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
        while self.running:
            learning_rate = self.begin_step()
            step_loss, step_tokens, metrics = 0.0, 0, Averages()
            for _ in range(accum):
                batch = {k: v.to(self.device) for k, v in next(batches).items()}
                outcome = self.objective(self.model, batch)
                loss = outcome.loss / accum
                self.steps.micro_step(loss)
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
                metrics.add(outcome.metrics)
            on_step(self.end_step(result, started, learning_rate, step_loss, step_tokens, metrics.means()))
        return result

    @property
    def running(self) -> bool:
        return self.step < self.settings.total_steps and not self.stopped

    def begin_step(self) -> float:
        """Set this step's learning rate from the schedule; returns it."""
        learning_rate = self.settings.learning_rate_at(self.step)
        self.set_learning_rate(learning_rate)
        return learning_rate

    def end_step(
        self,
        result: TrainResult,
        started: float,
        learning_rate: float,
        step_loss: float,
        step_tokens: int,
        metrics: dict[str, float],
    ) -> StepReport:
        """After the step's micro-batches were backpropagated: clip, step the optimizer, record the step."""
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
        return StepReport(
            self.step,
            self.settings.total_steps,
            step_loss,
            result.tokens,
            result.tokens / result.wall_s,
            learning_rate=learning_rate,
            grad_norm=grad_norm,
            clipped_grad_norm=clipped_grad_norm,
            objective=metrics,
        )

    def set_learning_rate(self, lr: float) -> None:
        """Set the schedule's rate on the optimizer (DeepSpeed's engine wraps a torch optimizer too)."""
        engine = getattr(self.steps, "engine", None)
        optimizer = getattr(self.steps, "optimizer", None) or getattr(engine, "optimizer", None)
        for group in getattr(optimizer, "param_groups", []):
            group["lr"] = lr


# -- evaluation and early stopping -----------------------------------------------------------------


def eval_loss(model: torch.nn.Module, rows: Sequence[dict[str, list[int]]], pad_token_id: int, batch_size: int, device):
    """Mean held-out token loss of the model as it is now (None without held-out rows); leaves it training."""
    if not rows:
        return None
    model.eval()
    with torch.no_grad():  # no graph: a DDP-wrapped model would also expect a backward after this forward
        loss, _ = heldout_loss(model, rows, pad_token_id, batch_size, device=device)
    model.train()
    return loss


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


class Monitor:
    """What follows every optimizer step, in every driver: the step's metrics to the trackers, the held-out
    loss at Ludwig's checkpoints (`steps_per_checkpoint`), and early stopping, which keeps the best
    evaluation's adapter (`best`, taken by `snapshot`) and stops the trainer once `patience` evaluations in a
    row failed to beat it.

    `agree` turns this process's held-out loss into the one every process decides on (the mean over Ray
    Train's ranks); `quantized`: no evaluation during training, since an eval-mode forward lets bitsandbytes
    repack 4-bit weights for its CPU inference kernel, and the adapter trained on afterwards no longer
    reproduces its logits on a fresh base."""

    def __init__(
        self,
        trainer: Trainer,
        rows: Sequence[dict[str, list[int]]],
        pad_token_id: int,
        early: EarlyStop,
        *,
        tracker: Tracker | None = None,
        quantized: bool = False,
        agree: Callable[[float], float] = lambda loss: loss,
        snapshot: Callable[[], dict[str, torch.Tensor]] | None = None,
        best: dict[str, torch.Tensor] | None = None,
        score: Callable[[torch.nn.Module], tuple[float | None, dict[str, float]]] | None = None,
    ):
        self.trainer, self.rows, self.pad_token_id, self.early = trainer, rows, pad_token_id, early
        self.tracker, self.quantized, self.agree = tracker, quantized, agree
        self.snapshot = snapshot or (lambda: trainable_state(trainer.model))
        self.best: dict[str, torch.Tensor] = best or {}
        self.score = score
        """A preference run's held-out score (objectives.PreferenceHeldOut.score): its loss and rewards;
        None scores `rows` by their token loss."""
        self.scores: dict[int, float | None] = {}
        """Held-out loss by optimizer step, of the evaluations this process ran."""

    def after_step(self, report: StepReport) -> None:
        if self.tracker is not None:
            self.tracker.log(report.tracked(), report.step)
        settings = self.trainer.settings
        if settings.evaluation_due(report.step) and not self.quantized:
            self.evaluate(report.step)
            self.trainer.stopped = self.early.should_stop and report.step < settings.total_steps

    def evaluate(self, step: int) -> float | None:
        """Score the held-out rows (every Ray Train rank the same rows: a collective under FSDP), log the
        loss, and keep the adapter if it is the best evaluation so far (gathering it is a collective too)."""
        trainer = self.trainer
        batch_size = trainer.settings.held_out_batch_size
        if self.score is not None:
            loss, extra = self.score(trainer.model)
        else:
            loss, extra = eval_loss(trainer.model, self.rows, self.pad_token_id, batch_size, trainer.device), {}
        self.scores[step] = loss
        if self.tracker is not None:
            self.tracker.log({"eval/loss": loss, **{f"eval/{key}": value for key, value in extra.items()}}, step)
            self.tracker.flush()
        if self.early.enabled and loss is not None and self.early.observe(step, self.agree(loss)):
            self.best = self.snapshot()
        return loss

    def final(self) -> float | None:
        """The held-out loss after the last step (evaluated now unless its checkpoint already was)."""
        step = self.trainer.step
        if step not in self.scores:
            self.evaluate(step)
        return self.scores[step]


# -- data, metrics and publishing ------------------------------------------------------------------


def run_examples(
    config: Config, name: str, member: Member | None, dataset: DatasetLike | None, eval_dataset: DatasetLike | None
) -> tuple[str, list[Any], list[Any]]:
    """(published name, training examples, held-out examples) of one run (see `load_splits`; a preference
    trainer's pairs or KTO rows, `load_preference_splits`): an ensemble member trains on its shard only,
    under its own name."""
    load = load_preference_splits if config.trainer.is_preference else load_splits
    train_examples, eval_examples = load(config, name, dataset, eval_dataset)
    if member is None:
        return name, train_examples, eval_examples
    return member[0], ensemble.member_examples(name, train_examples, member[1], member[2]), eval_examples


def tokenized(tokenizer: Any, examples: Sequence[Any], max_length: int, name: str) -> tuple[list[Any], Truncation]:
    """The training rows and what max_length cut of them, reported once per adapter at train start: fine-tuning
    rows, or a preference trainer's (objectives.tokenize_preference)."""
    rows, truncation = tokenize_rows(tokenizer, examples, max_length)
    report_truncation(name, len(rows), truncation)
    return rows, truncation


def tokenize_rows(tokenizer: Any, examples: Sequence[Any], max_length: int) -> tuple[list[Any], Truncation]:
    """Fine-tuning examples as `tokenize_examples` tokenises them, preference examples as
    `objectives.tokenize_preference` does."""
    if examples and not isinstance(examples[0], Example):
        return tokenize_preference(tokenizer, examples, max_length)
    return tokenize_examples(tokenizer, examples, max_length)


def held_out_rows(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[dict[str, list[int]]]:
    """The held-out rows a run scores: the first EVAL_ROWS."""
    return [tokenize_example(tokenizer, e, max_length) for e in examples[:EVAL_ROWS]]


@dataclass
class HeldOut:
    """A run's held-out data as the Monitor scores it: `rows` (the first EVAL_ROWS), `score` (None: their token
    loss; a preference run: its objective and rewards) and `accuracy`, the preference accuracies a
    preference-tuned version is published with (objectives.PreferenceHeldOut.accuracy; nothing otherwise)."""

    rows: list[Any]
    score: Callable[[torch.nn.Module], tuple[float | None, dict[str, float]]] | None = None
    accuracy: Callable[[torch.nn.Module], dict[str, Any]] = lambda model: {}


def held_out_for(
    tokenizer: Any, examples: Sequence[Any], settings: TrainSettings, pad_token_id: int, device: Any
) -> HeldOut:
    """The held-out data of a fine-tuning or a preference run (settings.preference)."""
    if settings.preference is None:
        return HeldOut(held_out_rows(tokenizer, examples, settings.max_length))
    held = preference_held_out(tokenizer, examples, settings, pad_token_id, torch.device(device), EVAL_ROWS)
    return HeldOut(held.rows, held.score, held.accuracy)


def report_truncation(name: str, total: int, truncation: Truncation) -> None:
    """One line per adapter at train start: how many rows max_length cuts, and by how many tokens."""
    log.log(logging.WARNING if truncation.rows else logging.INFO, "adapter %r: %s", name, truncation.describe(total))


def held_out_metrics(early: EarlyStop | None, last: float | None, stopped_at: int | None) -> dict[str, Any]:
    """The held-out loss a version is published with: under early stopping the best evaluation's, its step
    and where training stopped (None when it ran every step); else the last evaluation's, if any."""
    if early is None or not early.enabled:
        return {} if last is None else {"eval_loss": last}
    return {"eval_loss": early.best_loss, **early.metrics(stopped_at)}


def published_metrics(
    result: TrainResult,
    truncation: Truncation,
    *,
    backend: dict[str, Any],
    run: str,
    run_dir: str | None,
    progress: dict[str, Any] | None = None,
    held_out: dict[str, Any],
) -> dict[str, Any]:
    """A version's manifest metrics: the loss curve and throughput, truncation, where it trained (`backend`:
    its name and placement), the tracked run, how the run progressed (resumes) and the held-out loss."""
    return {
        **result.metrics(),
        "truncated_rows": truncation.rows,
        "truncated_tokens": truncation.tokens,
        "losses": result.losses,
        **backend,
        "run": run,
        "run_dir": run_dir,
        **(progress or {}),
        **held_out,
    }


def publish(
    store: AdapterStore,
    config: Config,
    name: str,
    adapter_config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    base_fingerprint: str,
    metrics: dict[str, Any],
) -> Manifest:
    """Publish the trained adapter as the next version of `name`, and draw its loss curve."""
    manifest = store.publish(
        name,
        adapter_config,
        tensors,
        base_model=config.base_model,
        base_fingerprint=base_fingerprint,
        metrics=metrics,
        response_format=config.response_format,
    )
    plot_losses(name, manifest.version, metrics["losses"])
    return manifest


def ensemble_dispatch(
    config: Config,
    name: str,
    store: AdapterStore,
    member: Member | None,
    train_member: Callable[[Member], Manifest],
    *,
    parallel: bool = False,
    prepare: Callable[[], object] | None = None,
) -> Manifest | None:
    """For an adapter with an `ensemble` (and no `member` given): `prepare`, train each member with
    `train_member` (side by side with `parallel`), then publish their merge and return it. None for any
    other run: the driver trains it."""
    if member is not None or config.named_adapters[name].ensemble is None:
        return None
    if prepare is not None:
        prepare()
    return ensemble.train_ensemble(config, name, store, lambda *m: train_member(m), parallel=parallel)
