"""`madapt adapters import`: publish an adapter that PEFT saved elsewhere, once it is proven to fit the base
and to be what a replica can serve, as hub uploads save them (a regular expression for target_modules, a
copy of the base's embedding beside a LoRA on it, keys naming PEFT's default adapter, any layer tuner).
Nothing is published that serving would refuse or apply in part; each refusal names the file and why.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from madapt import adapter_types
from madapt.adapter_types import PEFT_PREFIX
from madapt.config import check_adapter_name
from madapt.lora import (
    LORA_A,
    LORA_B,
    AdapterMismatch,
    adapter_kind,
    attach,
    read_peft_dir,
    to_peft_config,
)
from madapt.models import LoadedBase
from madapt.serve.multilora import served_adapter
from madapt.serve.saved_modules import saved_layers, split_saved
from madapt.serve.tuners import UnsupportedAdapter
from madapt.store import AdapterStore, Manifest, StoredAdapter

PEFT_DEFAULT_NAME = "default"
"""The name PEFT gives an adapter it was not given one for."""
BASE_COPY = ".base_layer.weight"
"""What PEFT names the copy of a base weight it saves beside an adapter on the embedding or output layer."""


def import_peft_dir(store: AdapterStore, base: LoadedBase, directory: str, name: str) -> Manifest:
    """Publish an adapter saved by PEFT elsewhere, after proving it fits `base` (names, ranks, shapes)."""
    check_adapter_name(name)
    config, tensors = read_peft_dir(directory)
    tensors = without_adapter_name(tensors)
    try:
        to_peft_config(config)
    except AdapterMismatch as error:
        raise AdapterMismatch(f"{name}: {error}") from None
    modules = dict(base.model.named_modules())
    tensors = without_base_copies(name, directory, tensors, modules)
    own = served_tensors(name, config, tensors, base, modules)
    foreign = foreign_tensors(config, own)
    if foreign:
        raise AdapterMismatch(
            f"{name}: {directory} holds tensors besides the {config.get('peft_type')} adapter's own and the modules "
            f"it saves (modules modules_to_save does not name, biases or lora_bias: {foreign[:3]}), which serving "
            "would drop silently; save the adapter without them"
        )
    if adapter_kind(config) == "lora":
        check_ranks(config, tensors, directory)
    try:
        served_adapter(name, config, tensors)  # what a replica will do with it, refused now rather than there
    except UnsupportedAdapter as error:
        raise AdapterMismatch(f"{error}; serving cannot apply it") from None
    probe = Manifest(name, 0, base.name, base.fingerprint, int(config.get("r") or 0), 0.0, [], {})
    attach(base.model, StoredAdapter(probe, config, tensors), f"import_{name}")
    return store.publish(
        name,
        config,
        tensors,
        base_model=base.name,
        base_fingerprint=base.fingerprint,
        lineage={"imported_from": os.path.abspath(directory)},
    )


def without_adapter_name(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as PEFT saves them: a state dict taken from a live PeftModel names its adapter inside each key
    (`lora_A.default.weight`), which PEFT's own loader accepts and save_pretrained never writes."""
    renamed = {".".join(part for part in key.split(".") if part != PEFT_DEFAULT_NAME): t for key, t in tensors.items()}
    return renamed if len(renamed) == len(tensors) else tensors


def without_base_copies(
    name: str, directory: str, tensors: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """`tensors` less the copies of the base's own weights that PEFT saves beside an adapter on the embedding
    or output layer (`save_embedding_layers="auto"`); a copy that is not the base's weight (a resized or
    retrained vocabulary) is refused by name, as serving runs every adapter on the base's own weights (`modules`:
    the base model's, by path)."""
    kept = {}
    for key, tensor in tensors.items():
        module = modules.get(key.removeprefix(PEFT_PREFIX).removesuffix(BASE_COPY)) if key.endswith(BASE_COPY) else None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            kept[key] = tensor
        elif tensor.shape != weight.shape or not torch.equal(tensor.to(weight.dtype), weight):
            raise AdapterMismatch(
                f"{name}: {directory} carries its own {key} ({list(tensor.shape)}), not the base's "
                f"({list(weight.shape)}, a resized or retrained vocabulary?); madapt serves adapters on the base's "
                "own weights: train new or changed token rows with trainable_token_indices or modules_to_save"
            )
    return kept


def served_tensors(
    name: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base: LoadedBase,
    modules: dict[str, torch.nn.Module],
) -> dict[str, torch.Tensor]:
    """The tensors of an imported adapter's layers, once what it saves besides them (modules_to_save,
    trainable tokens) is proven to fit `base` as serving builds it."""
    try:
        _, own, saved = split_saved(name, config, tensors)
        if saved:
            saved_layers(name, saved, modules, base.model)
    except UnsupportedAdapter as error:
        raise AdapterMismatch(str(error)) from None
    return own


def foreign_tensors(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Tensors that are not the adapter's own (module copies its modules_to_save does not name, base biases,
    a lora_B bias its config does not declare with lora_bias) among the tensors of its layers: serving would
    drop them silently."""
    marker = adapter_types.tensor_marker(adapter_kind(config))
    undeclared_bias = not config.get("lora_bias")
    return sorted(
        k
        for k in tensors
        if marker not in k or "modules_to_save" in k or (undeclared_bias and k.endswith("lora_B.bias"))
    )


def check_ranks(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    """adapter_config.json's r must match the factors (PEFT would fail later, less clearly)."""
    if config.get("rank_pattern"):
        return
    for key, tensor in tensors.items():
        rank = tensor.shape[0] if key.endswith(LORA_A) else tensor.shape[1] if key.endswith(LORA_B) else None
        if rank is not None and rank != config.get("r"):
            raise AdapterMismatch(f"{where}: adapter_config.json says r={config.get('r')} but {key} has rank {rank}")
