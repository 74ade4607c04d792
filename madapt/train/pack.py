"""Packed multi-adapter training: several adapters of one config trained in one run on one resident base.

Every adapter of a pack is a *lane*: its own rows and micro-batch order, settings (step count, schedule),
optimizer and its state, clipping, early stop, held-out rows, trackers and published version, as if it trained
alone. Each step joins one micro-batch of every running lane into one batch; a forward pre-hook on each PEFT
layer routes every row through its own adapter only (PEFT's mixed-batch forward, `adapter_names`, which groups
the rows of each adapter into one product; here with autograd); the loss is the sum of each lane's own mean
token loss, so each adapter's gradient is the one it would get alone. A lane that reaches its step count, stops
early or fails (a non-finite loss) leaves the pack; the others go on.

Which adapters can share a pack (`unpackable`): LoRA without DoRA whose training leaves the base as it is,
fine-tuned (`trainer.type: finetune`). The rest train one run each, as before.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from madapt import ensemble
from madapt.config import Config, LoraAdapterConfig
from madapt.data import IGNORE_INDEX
from madapt.lora import add_trainable_adapter, peft_adapter_config
from madapt.store import AdapterStore, Manifest
from madapt.train.loop import Member, Monitor, StepReport, Trainer, TrainResult

Batch = dict[str, torch.Tensor]


def unpackable(adapter: LoraAdapterConfig, config: Config) -> str | None:
    """Why adapter `adapter` must train in a run of its own (None: it can share a pack)."""
    if config.backend.type == "ray" and config.backend.trainer.strategy == "deepspeed":
        return "strategy deepspeed: its engine steps one optimizer, a pack one per adapter (use ddp or fsdp)"
    if config.trainer.type != "finetune":
        return f"trainer.type {config.trainer.type} trains one adapter per run"
    if adapter.type != "lora":
        return f"type {adapter.type} has no per-row forward in PEFT (LoRA only)"
    if adapter.use_dora:
        return "use_dora: PEFT's per-row forward excludes DoRA"
    if adapter.bias == "all" or adapter.bias_type == "all":
        return "bias: all trains the base's biases, which every adapter of a pack shares"
    if isinstance(adapter.init_lora_weights, str) and adapter.init_lora_weights not in ("gaussian", "orthogonal"):
        return f"init_lora_weights {adapter.init_lora_weights} rewrites or calibrates the base per adapter"
    return None


def split_packable(config: Config, names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(the adapters that train as one pack, {adapter: why it trains alone}), in the order given."""
    reasons = {name: unpackable(config.named_adapters[name], config) for name in names}
    alone = {name: reason for name, reason in reasons.items() if reason is not None}
    return [name for name in names if name not in alone], alone


def add_pack(
    base: torch.nn.Module,
    adapters: dict[str, LoraAdapterConfig],
    seed: int,
    *,
    quantized: bool,
    gradient_checkpointing: bool,
) -> tuple[PeftModel, RowRouter]:
    """The base wrapped once with every adapter of the pack, all trainable, each initialised from `seed` as it
    would be alone; and the router that sends each row through its own adapter."""
    model: PeftModel | None = None
    for name, adapter in adapters.items():
        torch.manual_seed(seed)
        if model is None:
            model = add_trainable_adapter(
                base, adapter, name, quantized=quantized, gradient_checkpointing=gradient_checkpointing
            )
        else:
            model.add_adapter(name, peft_adapter_config(adapter, model.get_base_model()))
    if model is None:
        raise ValueError("a pack needs at least one adapter")
    model.base_model.set_adapter(list(adapters))  # every adapter trainable (PEFT trains the active ones)
    return model, RowRouter(model)


@dataclass
class PackOutcome:
    """What a pack's driver gives back: each published adapter's manifest, and why each other one failed."""

    published: dict[str, Manifest] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def pack_lanes(config: Config, names: Sequence[str]) -> list[tuple[str, Member | None]]:
    """(adapter, ensemble member or None) of each lane of a pack: an adapter, or each member of its ensemble
    (its shard of the adapter's data) as a lane of its own."""
    lanes: list[tuple[str, Member | None]] = []
    for name in names:
        members = ensemble.members(config, name)
        lanes += [(name, (member, i, len(members))) for i, member in enumerate(members, start=1)] or [(name, None)]
    return lanes


def merge_ensembles(config: Config, store: AdapterStore, outcome: PackOutcome, names: Sequence[str]) -> PackOutcome:
    """Publish the merge of each ensemble whose members all trained; it stands for the adapter in `outcome`."""
    for name in names:
        members = ensemble.members(config, name)
        if not members or name in outcome.failures:
            continue
        for member in members:
            del outcome.published[member]
        outcome.published[name] = ensemble.publish_merge(config, name, store)
    return outcome


# -- per-row routing -------------------------------------------------------------------------------------


class RowRouter:
    """Routes each row of a forward through its own adapter: while `rows(names)` is open, every PEFT layer of
    the model gets `adapter_names=names` (one name per row), as PEFT's own mixed-batch inference passes it.
    Backward runs inside the same `rows` (gradient checkpointing recomputes the forward there)."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.names: list[str] | None = None
        self.layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
        for layer in self.layers:
            layer.register_forward_pre_hook(self.route, with_kwargs=True)

    def route(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs

    @contextlib.contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        previous, self.names = self.names, names
        try:
            yield
        finally:
            self.names = previous

    def parameters_of(self, name: str) -> list[torch.nn.Parameter]:
        """Adapter `name`'s own parameters (its entry in each layer's lora_A, lora_B, ... dicts)."""
        found: list[torch.nn.Parameter] = []
        for layer in self.layers:
            for attribute in layer.adapter_layer_names:
                table = getattr(layer, attribute)
                if name in table:
                    entry = table[name]
                    found += [entry] if isinstance(entry, torch.nn.Parameter) else list(entry.parameters())
        return found


class AdapterView(torch.nn.Module):
    """One adapter of a packed model as a model of its own, for what runs per adapter (optimizer, held-out
    evaluation, early stop's snapshots, the published tensors): every row goes through `name`, and its
    parameters are that adapter's only."""

    def __init__(self, packed: torch.nn.Module, router: RowRouter, name: str):
        super().__init__()
        self.packed, self.router, self.name = packed, router, name
        self.own = {id(p) for p in router.parameters_of(name)}

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        with self.router.rows([self.name] * len(input_ids)):
            return self.packed(input_ids=input_ids, **kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for key, parameter in super().named_parameters(prefix, recurse, remove_duplicate):
            if id(parameter) in self.own:
                yield key, parameter


# -- the packed loop -------------------------------------------------------------------------------------


@dataclass(eq=False)
class Lane:
    """One adapter of a pack: its trainer (over its AdapterView), endless micro-batches, results so far and the
    Monitor that follows its steps; `failure` says why it left early (a non-finite loss)."""

    name: str
    trainer: Trainer
    batches: Iterator[Batch]
    result: TrainResult = field(default_factory=TrainResult)
    monitor: Monitor | None = None
    failure: str | None = None

    @property
    def running(self) -> bool:
        return self.failure is None and self.trainer.running


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (transformers' causal-LM loss)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX)


def join(parts: Sequence[Batch], pad_token_id: int) -> tuple[Batch, list[slice]]:
    """Right-padded micro-batches as one batch (padding is masked from attention and loss), with each part's
    rows."""
    width = max(part["input_ids"].shape[1] for part in parts)
    fills = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    joined = {
        key: torch.cat([F.pad(part[key], (0, width - part[key].shape[1]), value=fill) for part in parts])
        for key, fill in fills.items()
    }
    spans, start = [], 0
    for part in parts:
        spans.append(slice(start, start + len(part["input_ids"])))
        start += len(part["input_ids"])
    return joined, spans


ROWS_PER_FORWARD = {"cpu": 1, "cuda": 4}
"""Default cap of one forward's rows, in lane batches. CPU: one, as fast as four for 8 lanes of the demo
(643 vs 656 s) at 41% of the peak memory (docs/benchmarks.md#packed-training); a GPU needs bigger forwards
to be busy."""


def row_groups(batch_sizes: Sequence[int], max_rows: int) -> list[list[int]]:
    """Consecutive lanes (by index) in groups of at most `max_rows` rows by their configured batch sizes; a
    lane larger than the cap goes alone. Configured, not drawn, sizes: every data-parallel rank forms the same
    groups, so `agree` is called as often on each."""
    groups: list[list[int]] = []
    rows = 0
    for i, size in enumerate(batch_sizes):
        if groups and rows + size <= max_rows:
            groups[-1].append(i)
            rows += size
        else:
            groups.append([i])
            rows = size
    return groups


def no_agreement(finite: torch.Tensor) -> torch.Tensor:
    """One process: its own flags."""
    return finite


class PackTrainer:
    """Optimizer steps of every running lane over joined micro-batches. `model` is the packed model as the
    strategy wrapped it (DDP, FSDP2, or itself); `agree` turns this process's finite-loss flags (1.0: finite)
    into their minimum over the data-parallel ranks, so all ranks drop a failing lane at the same step.
    `max_rows` bounds the rows of one forward (activations grow with them): the lanes of a step go forward
    and backward in groups of at most that many rows (default: ROWS_PER_FORWARD lane batches for the device)."""

    def __init__(
        self,
        model: torch.nn.Module,
        router: RowRouter,
        lanes: list[Lane],
        pad_token_id: int,
        *,
        device: torch.device | str = "cpu",
        agree: Callable[[torch.Tensor], torch.Tensor] = no_agreement,
        max_rows: int | None = None,
    ):
        self.model, self.router, self.lanes = model, router, lanes
        self.pad_token_id, self.device, self.agree = pad_token_id, torch.device(device), agree
        per_device = ROWS_PER_FORWARD.get(self.device.type, 1)
        self.max_rows = max_rows or per_device * max(lane.trainer.settings.batch_size for lane in lanes)

    def run(
        self, on_step: Callable[[Lane, StepReport], None], after_step: Callable[[int], None] = lambda step: None
    ) -> None:
        """Step until every lane has left: reached its steps, stopped early (its Monitor) or failed.
        `on_step` follows each lane's step; `after_step(pack step)` each pack step (every lane's)."""
        starts = {lane.name: time.perf_counter() - lane.result.wall_s for lane in self.lanes}
        while running := [lane for lane in self.lanes if lane.running]:
            self.model.train()
            rates = [lane.trainer.begin_step() for lane in running]
            losses, tokens = [0.0] * len(running), [0] * len(running)
            accumulation = running[0].trainer.settings.gradient_accumulation_steps
            for _ in range(accumulation):
                parts = [next(lane.batches) for lane in running]
                for i, (loss, count) in enumerate(self.micro_step(running, parts, accumulation)):
                    losses[i] += loss
                    tokens[i] += count
            for lane, rate, loss, count in zip(running, rates, losses, tokens, strict=True):
                if lane.failure is None:
                    on_step(lane, lane.trainer.end_step(lane.result, starts[lane.name], rate, loss, count, {}))
            after_step(self.step)

    @property
    def step(self) -> int:
        """Pack steps so far: every running lane steps once per pack step, from the same start."""
        return max(lane.trainer.step for lane in self.lanes)

    def micro_step(self, lanes: list[Lane], parts: list[Batch], accumulation: int) -> list[tuple[float, int]]:
        """Forward the lanes' micro-batches in groups of at most `max_rows` rows (each row through its own
        adapter) and backpropagate each group's sum of its lanes' mean losses; per lane, (its loss /
        accumulation, its tokens). Each lane's loss lies in one group, so its gradient is the same whatever
        the grouping. A lane whose loss is not finite on any rank fails here, its gradients dropped."""
        outcome: list[tuple[float, int]] = []
        for group in row_groups([lane.trainer.settings.batch_size for lane in lanes], self.max_rows):
            outcome += self.group_step([lanes[i] for i in group], [parts[i] for i in group], accumulation)
        return outcome

    def group_step(self, lanes: list[Lane], parts: list[Batch], accumulation: int) -> list[tuple[float, int]]:
        """One forward and backward of the joined micro-batches of `lanes`."""
        batch, spans = join(parts, self.pad_token_id)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        names = [lane.name for lane, span in zip(lanes, spans, strict=True) for _ in range(span.stop - span.start)]
        with self.router.rows(names):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses = [token_loss(logits[span], batch["labels"][span]) / accumulation for span in spans]
            flags = torch.tensor([float(torch.isfinite(loss)) for loss in losses], device=self.device)
            finite = self.agree(flags).bool().tolist()
            kept = [loss for loss, ok in zip(losses, finite, strict=True) if ok]
            if kept:
                torch.stack(kept).sum().backward()
        outcome = []
        for lane, loss, ok, span in zip(lanes, losses, finite, spans, strict=True):
            if not ok:
                lane.failure = f"adapter {lane.name!r}: the loss is not finite at step {lane.trainer.step + 1}"
                for parameter in lane.trainer.model.parameters():  # it never steps again
                    parameter.grad = None
            outcome.append((loss.item(), int(batch["attention_mask"][span].sum())))
        return outcome
