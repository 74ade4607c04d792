"""The training loop of one adapter, shared by the local trainer and every Ray Train worker.

`Trainer` owns the model, optimizer and step counter; `run` drives micro-batches through it and calls
back after every optimizer step so the caller decides about progress bars, reports and checkpoints.
`train_local` is the one-process path (`backend.type: local`); distributed.py wraps the same loop in a
Ray TorchTrainer.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from madapt.config import Config, ConfigError, TrainerConfig
from madapt.data import Example, collate, load_examples, split_examples, tokenize_example
from madapt.lora import build_lora_config, extract
from madapt.models import load_base
from madapt.store import AdapterStore, Manifest


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    total_steps: int
    max_length: int
    seed: int


@dataclass
class StepReport:
    step: int
    total_steps: int
    loss: float
    tokens: int
    tokens_per_s: float


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
    """Resolve epochs/max_steps into a step count for `num_examples` shared by `world_size` workers."""
    per_step = trainer.batch_size * trainer.gradient_accumulation_steps * world_size
    steps_per_epoch = max(1, math.ceil(num_examples / per_step))
    total = trainer.max_steps or trainer.epochs * steps_per_epoch
    return TrainSettings(
        batch_size=trainer.batch_size,
        gradient_accumulation_steps=trainer.gradient_accumulation_steps,
        learning_rate=trainer.learning_rate,
        weight_decay=trainer.weight_decay,
        total_steps=total,
        max_length=trainer.max_length,
        seed=trainer.seed,
    )


def add_trainable_adapter(model, adapter_config, name: str, *, quantized: bool) -> PeftModel:
    """Wrap a freshly loaded base with a new trainable LoRA adapter (QLoRA-ready when quantised)."""
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, build_lora_config(adapter_config, model), adapter_name=name)


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

    def optimizer_step(self) -> None: ...


class TorchSteps:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def micro_step(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def adamw(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


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
        self.steps = steps or TorchSteps(adamw(model, settings))
        self.step = 0

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
        while self.step < self.settings.total_steps:
            step_loss, step_tokens = 0.0, 0
            for _ in range(accum):
                batch = {k: v.to(self.device) for k, v in next(batches).items()}
                loss = self.model(**batch).loss / accum
                self.steps.micro_step(loss)
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
            self.steps.optimizer_step()
            self.step += 1
            result.losses.append(step_loss)
            result.tokens += step_tokens
            result.wall_s = time.perf_counter() - started
            on_step(
                StepReport(
                    self.step, self.settings.total_steps, step_loss, result.tokens, result.tokens / result.wall_s
                )
            )
        return result


def load_splits(config: Config, name: str) -> tuple[list[Example], list[Example]]:
    """The adapter's training and held-out examples: its eval_dataset, else a deterministic carve-out."""
    path = config.dataset_for(name)
    if path is None:
        raise ConfigError([f"adapters.adapters.{name}.dataset: adapter {name!r} has no dataset (nor a top-level one)"])

    def load(source: str) -> list[Example]:
        return load_examples(
            source,
            input_column=config.input_column,
            output_column=config.output_column,
            template=config.prompt.template,
        )

    examples = load(path)
    eval_path = config.named_adapters[name].eval_dataset
    if eval_path:
        return examples, load(eval_path)
    return split_examples(examples, config.trainer.eval_fraction)


def train_local(config: Config, name: str, store: AdapterStore, *, progress: bool = True) -> Manifest:
    """Train one adapter in this process and publish it (the `backend.type: local` path)."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.trainer.seed)
    train_examples, _ = load_splits(config, name)
    bits = config.quantization.bits if config.quantization else None
    base = load_base(config.base_model, quantization_bits=bits, trust_remote_code=config.trust_remote_code)
    model = add_trainable_adapter(base.model, config.named_adapters[name], name, quantized=bits is not None)
    rows = [tokenize_example(base.tokenizer, e, config.trainer.max_length) for e in train_examples]
    settings = settings_for(config.trainer, len(rows))
    trainer = Trainer(model, settings)
    bar = tqdm(total=settings.total_steps, desc=f"train {name}", disable=not progress)

    def show(report: StepReport) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{report.loss:.3f}", tok_s=f"{report.tokens_per_s:.0f}")

    result = trainer.run(micro_batches(rows, settings.batch_size, base.tokenizer.pad_token_id, settings.seed), show)
    bar.close()
    adapter_config, tensors = extract(model, name)
    return store.publish(
        name,
        adapter_config,
        tensors,
        base_model=config.base_model,
        base_fingerprint=base.fingerprint,
        metrics={**result.metrics(), "losses": result.losses, "backend": "local"},
    )
