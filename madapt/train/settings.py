"""Ludwig's trainer section resolved into plain values: step counts, the learning-rate schedule, optimizer
and clipping parameters, evaluation cadence and early stopping. Torch-free: the Ray driver sends these to
its workers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from madapt.config import Config, TrainerConfig


@dataclass(frozen=True)
class PreferenceSettings:
    """A preference trainer's objective (trainer.type dpo, kto or orpo) as plain values: which loss, its beta
    (dpo_beta / kto_beta / orpo_beta), DPO's loss_type and label smoothing, KTO's weights."""

    kind: str
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def preference_settings(trainer: TrainerConfig) -> PreferenceSettings | None:
    """None for finetune; else the type's own keys."""
    if trainer.type == "dpo":
        return PreferenceSettings(
            "dpo", trainer.dpo_beta, loss_type=trainer.dpo_loss_type, label_smoothing=trainer.dpo_label_smoothing
        )
    if trainer.type == "kto":
        return PreferenceSettings(
            "kto",
            trainer.kto_beta,
            desirable_weight=trainer.kto_desirable_weight,
            undesirable_weight=trainer.kto_undesirable_weight,
        )
    if trainer.type == "orpo":
        return PreferenceSettings("orpo", trainer.orpo_beta)
    return None


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
    preference: PreferenceSettings | None = None
    """The preference objective (trainer.type dpo/kto/orpo); None: fine-tuning on the model's own loss."""

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
        preference=preference_settings(trainer),
    )


def run_params(config: Config, name: str, settings: TrainSettings) -> dict[str, Any]:
    """What MLflow and W&B record as the run's parameters: the adapter and the resolved training settings."""
    return {"adapter": config.named_adapters[name].model_dump(mode="json"), "trainer": dataclasses.asdict(settings)}
