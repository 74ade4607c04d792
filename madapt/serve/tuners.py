"""The per-adapter serving path: PEFT's own layers for adapters the gathered LoRA forward cannot apply
exactly (DoRA and other LoRA variants, IA3, OFT, BOFT, LoHa, LoKr, VeRA, HRA, FourierFT, VBLoRA, LN tuning,
AdaLoRA, ...).

PEFT's layers are built without touching the shared base: a skeleton module tree holds, at each target
module's path, a shallow copy of the base module (its own Parameter objects over the base's storage: no
memory, and an assignment to `.weight` inside PEFT cannot reach the base), and `PeftModel` injects the
adapter into that skeleton under one name. The stored tensors are loaded with PEFT's own loader, after
checking that they are exactly the tensors those layers hold: serving never drops part of an adapter
(trained base biases) and never writes into the base. What an adapter saves besides its layers (its
modules_to_save and trainable tokens) is taken out before, and served by `madapt.serve.saved_modules`.
`madapt.serve.multilora` routes the rows of such an adapter through these layers; each layer's forward
includes its base module.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from madapt.compat.peft import is_layer_tuner, is_tuner_layer, targeted
from madapt.compat.torch import detached_copy

ADAPTER_NAME = "served"
"""The adapter's name inside its own skeleton (refs hold '@' and '.', which PEFT's module dicts refuse)."""

REFUSED_OPTIONS = {  # modules_to_save and trainable_token_indices: served beside (`madapt.serve.saved_modules`)
    "layer_replication": "duplicates base layers, which a shared base cannot do",
    "alora_invocation_tokens": "activates on invocation tokens, which serving does not track",
}


def lora_variants(config: dict[str, Any]) -> list[str]:
    """The LoRA variants a LoRA adapter_config turns on (DoRA, aLoRA, ...: the LoraConfig fields PEFT tags as
    changing its forward, and the init_lora_weights values that name a variant)."""
    found = []
    for field in dataclasses.fields(LoraConfig):
        value = config.get(field.name)
        if field.metadata.get("is_lora_variant") and value:
            found.append(field.name)
        elif isinstance(value, str) and value in field.metadata.get("lora_variants", ()):
            found.append(f"{field.name}={value}")
    return found


class UnsupportedAdapter(ValueError):
    """An adapter that serving cannot apply exactly; the message names it and why."""


@dataclass(frozen=True)
class PeftAdapter:
    """An adapter served through PEFT's own layers: its validated config and its stored tensors."""

    ref: str
    config: PeftConfig
    tensors: dict[str, torch.Tensor]


def peft_adapter(ref: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PeftAdapter:
    """Validate an adapter_config for the per-adapter path; refuse what it would apply only in part."""
    try:
        peft_config = PeftConfig.from_peft_type(**config)
    except (TypeError, ValueError, KeyError) as error:
        raise UnsupportedAdapter(f"{ref}: adapter_config.json is not a valid PEFT config: {error}") from None
    if peft_config.is_prompt_learning or not is_layer_tuner(peft_config.peft_type):
        raise UnsupportedAdapter(f"{ref}: peft_type {config.get('peft_type')!r} is not a layer tuner serving runs")
    for key, why in REFUSED_OPTIONS.items():
        if getattr(peft_config, key, None):
            raise UnsupportedAdapter(f"{ref}: {key} is set, and it {why}")
    if getattr(peft_config, "bias", "none") != "none":
        raise UnsupportedAdapter(f"{ref}: bias={peft_config.bias!r} trains base biases, which serving would drop")
    if not getattr(peft_config, "target_modules", None):
        raise UnsupportedAdapter(f"{ref}: adapter_config.json names no target_modules")
    peft_config.inference_mode = True
    peft_config.task_type = None  # the skeleton is a plain module tree, not a causal LM
    if hasattr(peft_config, "init_lora_weights"):
        named = [v for v in lora_variants(config) if v.startswith("init_lora_weights")]
        if isinstance(peft_config, LoraConfig) and named:
            raise UnsupportedAdapter(f"{ref}: init_lora_weights={peft_config.init_lora_weights!r} is not served")
        peft_config.init_lora_weights = False  # PiSSA-like inits rewrite base weights; the stored ones are final
    return PeftAdapter(ref=ref, config=peft_config, tensors=tensors)


def target_paths(adapter: PeftAdapter, modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """The paths among `modules` that the adapter's tuner would adapt (PEFT's own target matching)."""
    return targeted(adapter.config, [path for path, _ in modules])


def build_layers(adapter: PeftAdapter, base_modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """PEFT's tuner layer for each target path (keys of `base_modules`, the unwrapped base modules), with the
    stored tensors loaded; refuses tensors the layers do not hold and layers the tensors do not fill."""
    if not base_modules:
        raise UnsupportedAdapter(f"{adapter.ref}: the base model has none of its target_modules")
    skeleton = nn.Module()
    for path, module in base_modules.items():
        parent = skeleton
        *parents, name = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name, detached_copy(module))
    try:
        model = PeftModel(skeleton, copy.copy(adapter.config), adapter_name=ADAPTER_NAME)
    except (ValueError, TypeError, RuntimeError) as error:
        raise UnsupportedAdapter(f"{adapter.ref}: PEFT cannot build its layers on this base: {error}") from None
    expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    extra = sorted(set(adapter.tensors) - expected)
    if extra:
        raise UnsupportedAdapter(f"{adapter.ref}: tensor {extra[0]!r} is not part of its layers; serving would drop it")
    missing = sorted(expected - set(adapter.tensors))
    if missing:
        raise UnsupportedAdapter(f"{adapter.ref}: tensor {missing[0]!r} is missing")
    try:
        set_peft_model_state_dict(model, adapter.tensors, adapter_name=ADAPTER_NAME)
    except RuntimeError as error:
        raise UnsupportedAdapter(f"{adapter.ref}: weights do not fit this base model: {error}") from None
    model.eval()
    layers = {path: skeleton.get_submodule(path) for path in base_modules}
    for path, layer in layers.items():
        if not is_tuner_layer(layer):
            raise UnsupportedAdapter(f"{adapter.ref}: PEFT left {path!r} unadapted")
    return layers
