"""The distributed strategies a Ray Train worker wraps its model in (FSDP2, DDP, DeepSpeed): the wrapping, the
DeepSpeed config and step, and the adapter weights and optimizer each one gives back for a checkpoint.

FSDP2 and DeepSpeed are touched here only (and in checkpoints.py's state dicts), so an upgrade of either is
a change here."""

from __future__ import annotations

from typing import Any

import torch

from madapt.adapter_types import tensor_marker
from madapt.lora import adapter_state, peft_kind, unwrap
from madapt.train.loop import TorchSteps, Trainer, build_optimizer
from madapt.train.spec import RunSpec


def wrap(peft_model: torch.nn.Module, spec: RunSpec, device: torch.device) -> tuple[torch.nn.Module, Trainer]:
    """Apply the strategy and build the Trainer over the wrapped model."""
    import ray.train.torch

    if spec.strategy == "deepspeed":
        import deepspeed

        peft_model.to(device)
        engine, *_ = deepspeed.initialize(
            model=peft_model,
            optimizer=build_optimizer(peft_model, spec.settings),
            config=deepspeed_config(spec),
            dist_init_required=False,
        )
        return engine, Trainer(engine, spec.settings, device, steps=DeepSpeedSteps(engine))
    if spec.strategy == "fsdp":
        return shard(peft_model, device), Trainer(peft_model, spec.settings, device)
    model = ray.train.torch.prepare_model(peft_model, move_to_device=spec.quantization_bits is None)
    return model, Trainer(model, spec.settings, device)


def wrap_pack(packed: torch.nn.Module, spec: RunSpec, device: torch.device) -> torch.nn.Module:
    """Apply the strategy to a pack's model, once for all its adapters: FSDP2 shards the base once; DDP is
    told that some parameters get no gradient (those of the lanes that left the pack). DeepSpeed's engine
    steps one optimizer, a pack one per adapter: pack.unpackable keeps its adapters out of packs."""
    import ray.train.torch

    if spec.strategy == "deepspeed":
        raise ValueError("a pack cannot train under DeepSpeed (pack.unpackable)")
    if spec.strategy == "fsdp":
        return shard(packed, device)
    return ray.train.torch.prepare_model(
        packed,
        move_to_device=spec.quantization_bits is None,
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )


def shard(peft_model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: each decoder layer, then the root, sharded in place (the model itself, now sharded)."""
    from torch.distributed.fsdp import fully_shard

    peft_model.to(device)
    for module in peft_model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(peft_model)
    return peft_model


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
    inner = unwrap(model)
    if spec.strategy == "deepspeed":
        import deepspeed

        trainable = [p for p in inner.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            marker = tensor_marker(peft_kind(inner.peft_config[spec.name]))
            state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if marker in k}
        tensors = adapter_state(inner, spec.name, state)
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return pack_tensors(model, [spec.name])[spec.name]


def pack_tensors(model: torch.nn.Module, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Adapters `names`' full weights in PEFT's file format, from one gathering of the trainable state (a
    collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = unwrap(model)
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    state = get_model_state_dict(inner, options=options)
    return {
        name: {k: v.detach().cpu().contiguous() for k, v in adapter_state(inner, name, state).items()} for name in names
    }


def torch_optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    """The optimizer whose state a checkpoint carries (DeepSpeed checkpoints its own engine instead)."""
    if not isinstance(trainer.steps, TorchSteps):
        raise TypeError(f"no torch optimizer in {type(trainer.steps).__name__}")
    return trainer.steps.optimizer
