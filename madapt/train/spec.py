"""What a Ray Train worker is told: the run's plain values (`RunSpec`), built on the driver from the config by
`run_spec`, which also refuses combinations that cannot work before any cluster work."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from madapt.config import Config, ConfigError, qlora_strategy_problems
from madapt.tracking import TrackingSpec
from madapt.train.settings import TrainSettings, settings_for

FAIL_AT_STEP_ENV = "MADAPT_FAIL_AT_STEP"
"""Fault injection for tests: rank 1 (rank 0 with one worker) is SIGKILLed at this step on the first attempt."""


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
    eval_examples: list[Any] = field(default_factory=list)
    """Held-out examples every rank scores at each checkpoint and at the end (the trackers' eval/loss): a
    preference trainer's pairs or KTO rows (settings.preference says which)."""
    preference_column: str = ""
    """A preference trainer's second column: trainer.rejected_column (dpo/orpo) or kto_label_column (kto)."""
    shard: tuple[int, int] | None = None
    """(index, members) of an ensemble member: train on that shard of the training examples only."""


def run_spec(config: Config, name: str, num_examples: int, *, eval_dataset: bool | None = None) -> RunSpec:
    """Build a worker spec from the config; raise ConfigError for combinations that cannot work.
    `eval_dataset`: whether held-out data comes separately (default: the adapter's eval_dataset), so the
    workers carve none off. The driver adds what it knows once the run is placed: name (an ensemble member's),
    shard, trackers and held-out examples."""
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
        preference_column=config.trainer.kto_label_column
        if config.trainer.type == "kto"
        else config.trainer.rejected_column,
    )


@dataclass(frozen=True)
class PackSpec:
    """What a pack's workers are told: one RunSpec per lane (its adapter, settings, trackers, held-out
    examples), in pack order. The base, strategy and checkpoint cadence are the config's, so the first lane's."""

    lanes: tuple[RunSpec, ...]
    max_rows: int | None = None
    """backend.trainer.pack_max_rows: rows of one forward (None: PackTrainer's default for the device)."""

    @property
    def shared(self) -> RunSpec:
        return self.lanes[0]


def pack_dataset(name: str) -> str:
    """The Ray Dataset key of lane `name`'s training data in a pack's run (no "/": Ray Data names a log file
    after it)."""
    return f"train-{name}"
