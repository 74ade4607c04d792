"""PEFT glue: build adapter configs (LoRA, and every other type of adapter_types.TRAINED_TYPES), wrap a base
for training, attach stored adapters to a base, extract trained ones, pad LoRA ranks.

The training loop and its drivers (madapt/train/) reach PEFT only through here; besides this module PEFT is
touched by adapter_types.py (each type's config class), merge.py, serve/tuners.py (PEFT's own layers for
the per-adapter serving path) and config checks, so a PEFT upgrade stays a local change. Adapters are loaded
from verified tensors (never with PEFT's path loader, which would also accept pickle files; the one exception
is the init snapshot PEFT's PiSSA/OLoRA conversion reloads, a safetensors file madapt has just written).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from peft import (
    EvaConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from madapt import adapter_types
from madapt.adapter_types import PEFT_PREFIX
from madapt.compat.peft import corda_config, corda_preprocess, targeted
from madapt.config import LoraAdapterConfig
from madapt.errors import UserError
from madapt.models import LoadedBase, default_target_modules
from madapt.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterStore,
    CorruptAdapter,
    Manifest,
    StoredAdapter,
    StoreError,
    check_finite,
)

LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"


def lora_scale(config: dict[str, Any]) -> float:
    """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    r = int(config["r"])
    return float(config["lora_alpha"]) / (math.sqrt(r) if config.get("use_rslora") else r)


class AdapterMismatch(UserError, ValueError):
    """An adapter that does not fit the base model it is being attached to."""


def build_lora_config(adapter: LoraAdapterConfig, model: torch.nn.Module, *, inference: bool = False) -> LoraConfig:
    """Map a validated `adapters.<name>` entry onto PEFT's LoraConfig."""
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules or default_target_modules(model),
        bias=adapter.bias,
        task_type="CAUSAL_LM",
        inference_mode=inference,
    )


def peft_lora_config(adapter_config: LoraAdapterConfig, model: torch.nn.Module) -> LoraConfig:
    """PEFT's LoraConfig with every Ludwig LoRA option madapt honours (rsLoRA, DoRA, init, patterns)."""
    return dataclasses.replace(
        build_lora_config(adapter_config, model),
        use_rslora=adapter_config.use_rslora,
        use_dora=adapter_config.use_dora,
        init_lora_weights=adapter_config.peft_init,
        eva_config=EvaConfig(**adapter_config.eva_config or {}) if adapter_config.peft_init == "eva" else None,
        corda_config=corda_config() if adapter_config.peft_init == "corda" else None,
        rank_pattern=dict(adapter_config.rank_pattern or {}),
        alpha_pattern=dict(adapter_config.alpha_pattern or {}),
    )


def peft_adapter_config(
    adapter_config: LoraAdapterConfig, model: torch.nn.Module, *, total_steps: int | None = None
) -> PeftConfig:
    """PEFT's config of any trained type: LoRA's own mapping, or the type's config class from its Ludwig options.
    Default targets: the attention projections (ln_tuning: the norm layers; IA3 treats none as feedforward).
    `total_steps`: AdaLoRA's budget schedule, when the config does not fix `total_step`."""
    kind = adapter_config.type
    if kind == "lora":
        return peft_lora_config(adapter_config, model)
    options = adapter_config.type_options
    targets = adapter_config.target_modules or (
        adapter_types.norm_modules(model) if kind == "ln_tuning" else default_target_modules(model)
    )
    extra: dict[str, Any] = {}
    if kind == "ia3" and "feedforward_modules" not in options:
        extra["feedforward_modules"] = []
    if kind == "adalora" and "total_step" not in options:
        extra["total_step"] = total_steps
    return adapter_types.build_config(kind, options, targets, **extra)


CORDA_ROWS = 64
"""Training rows CorDA's calibration pass runs through the base, one at a time (its hooks take batch 1)."""


def add_trainable_adapter(
    model,
    adapter_config,
    name: str,
    *,
    quantized: bool,
    gradient_checkpointing: bool = False,
    calibration: Sequence[list[int]] = (),
    total_steps: int | None = None,
) -> PeftModel:
    """Wrap a freshly loaded base with a new trainable adapter (QLoRA-ready when quantised).
    `calibration`: token ids of training rows, for CorDA's activation statistics; `total_steps`: the run's
    optimizer steps, for AdaLoRA's schedule."""
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:  # non-reentrant: the frozen base's inputs need no gradients
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    config = peft_adapter_config(adapter_config, model, total_steps=total_steps)
    if getattr(config, "init_lora_weights", None) == "corda":
        calibrate_corda(model, config, calibration)
    return get_peft_model(model, config, adapter_name=name)


@torch.no_grad()
def calibrate_corda(model: torch.nn.Module, config: LoraConfig, rows: Sequence[list[int]]) -> None:
    """CorDA's preprocessing: the covariance of each target layer's inputs on training rows, from which
    get_peft_model then decomposes the base (PEFT keeps the results on the modules)."""
    if not rows:
        raise ValueError("CorDA needs training rows for its calibration pass")
    device = next(model.parameters()).device

    def run_model() -> None:
        for ids in rows[:CORDA_ROWS]:
            model(input_ids=torch.tensor([ids], device=device))

    corda_preprocess(model, config, run_model)


def config_dict(config: PeftConfig) -> dict[str, Any]:
    """PEFT's config as JSON-ready data (sets become sorted lists), as adapter_config.json holds it."""
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    data["peft_type"] = str(getattr(config.peft_type, "value", config.peft_type))
    data["inference_mode"] = True
    return data


def random_adapter(
    model: torch.nn.Module, *, r: int, seed: int, targets=("q_proj", "v_proj"), alpha: float | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A LoRA adapter with random A and B (no training) as (adapter_config, tensors): for benchmarks and
    tests, whose speed and maths do not depend on training. `model` is left as it was."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        target_modules=list(targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name="random")
    try:
        return extract(peft_model, "random")
    finally:
        peft_model.unload()  # restores the original Linear modules in `model`


def publish_random(
    store: AdapterStore,
    base: LoadedBase,
    name: str,
    *,
    r: int = 8,
    seed: int = 0,
    targets=("q_proj", "v_proj"),
    alpha: float | None = None,
) -> Manifest:
    """Publish a `random_adapter` on `base` into `store`, as if it had been trained there."""
    config, tensors = random_adapter(base.model, r=r, seed=seed, targets=targets, alpha=alpha)
    return store.publish(name, config, tensors, base_model=base.name, base_fingerprint=base.fingerprint)


def adapter_kind(config: dict[str, Any]) -> str:
    """The adapter type of an adapter_config.json, by madapt's (Ludwig's) lowercase name."""
    return str(config.get("peft_type", "")).lower()


def peft_kind(config: PeftConfig) -> str:
    """The adapter type of a PEFT config, by madapt's (Ludwig's) lowercase name."""
    return str(getattr(config.peft_type, "value", config.peft_type)).lower()


def attached_kind(model: PeftModel) -> str:
    """The adapter type a PeftModel holds (PEFT allows one per model)."""
    return peft_kind(next(iter(model.peft_config.values())))


def to_peft_config(data: dict[str, Any]) -> PeftConfig:
    """PEFT's config from an adapter_config.json of any layer tuner PEFT has: LoRA, the types madapt trains, and
    the others (SHiRA, RandLoRA, MiSS, ...), which it imports, serves and evaluates on PEFT's own layers. Prompt
    learning types and names PEFT does not know are refused by name."""
    if not adapter_types.is_layer_tuner(adapter_kind(data)):
        raise AdapterMismatch(
            f"adapter type {data.get('peft_type')!r} is not supported by madapt (it handles PEFT's layer tuners: "
            f"lora, {', '.join(adapter_types.TRAINED_TYPES)} and the others PEFT has; not prompt learning)"
        )
    try:
        return PeftConfig.from_peft_type(**data)
    except (TypeError, ValueError, KeyError) as error:
        raise AdapterMismatch(f"adapter_config.json is not a valid PEFT config: {error}") from None


def rank_allocator(model: torch.nn.Module) -> Callable[[int], None] | None:
    """AdaLoRA's `update_and_allocate(step)`, which must run after each optimizer step and before the gradients
    are zeroed; None for every other type (and for a model that is not a PEFT model)."""
    inner = getattr(model, "module", model)
    if isinstance(inner, PeftModel) and peft_kind(inner.peft_config[inner.active_adapter]) == "adalora":
        return inner.base_model.update_and_allocate
    return None


def extract(model: PeftModel, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter `name` as (adapter_config dict, tensors), ready for AdapterStore.publish."""
    config = adapter_config(model, name)
    tensors = cut_ranks(config, adapter_state(model, name))
    return config, {k: v.detach().cpu().clone() for k, v in tensors.items()}


def adapter_config(model: PeftModel, name: str) -> dict[str, Any]:
    """Adapter `name`'s adapter_config.json data; AdaLoRA's rank pattern keyed by module as PEFT saves it."""
    config = config_dict(model.peft_config[name])
    if config.get("rank_pattern") and config["peft_type"] == "ADALORA":
        config["rank_pattern"] = {k.removesuffix(f".{name}"): v for k, v in config["rank_pattern"].items()}
    return config


def cut_ranks(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AdaLoRA's tensors cut to the ranks its allocation kept (`rank_pattern`: module.lora_E -> kept flags), as
    PEFT saves them; other adapters as they are. Training state and checkpoints keep the full ranks."""
    if config.get("peft_type") != "ADALORA" or not config.get("rank_pattern"):
        return tensors
    cut = dict(tensors)
    for key, kept in config["rank_pattern"].items():
        module = PEFT_PREFIX + key.removesuffix(".lora_E")
        mask = torch.tensor(kept, dtype=torch.bool)
        for factor in ("lora_E", "lora_A"):
            cut[f"{module}.{factor}"] = tensors[f"{module}.{factor}"][mask]
        cut[f"{module}.lora_B"] = tensors[f"{module}.lora_B"][:, mask]
    return cut


BASE_MUTATING_INITS = ("pissa", "olora", "corda")
"""init_lora_weights values that move part of each base weight into the adapter at init (PiSSA, and its
`pissa_niter_<k>` fast SVD; OLoRA; CorDA): trained adapters are converted before publishing (see below)."""
INITIAL_ADAPTER = "madapt_initial"


def mutates_base(init: bool | str) -> bool:
    return isinstance(init, str) and init.split("_niter_")[0] in BASE_MUTATING_INITS


def _saved_dir(root: str, name: str) -> str:
    """Where save_pretrained put adapter `name` (PEFT writes 'default' at the root, others in a subfolder)."""
    return root if name == "default" else os.path.join(root, name)


def snapshot_init(model: PeftModel, name: str, directory: str) -> str:
    """Save adapter `name` as initialised, before any step: the A0, B0 that PEFT's conversion subtracts.
    Returns the snapshot's path for `extract_for_original_base`."""
    config = model.peft_config[name]
    init = config.init_lora_weights
    config.init_lora_weights = True  # loading the snapshot must not decompose the (already residual) base again
    try:
        model.save_pretrained(os.path.join(directory, "staging"), selected_adapters=[name])
    finally:
        config.init_lora_weights = init
    path = os.path.join(directory, INITIAL_ADAPTER)
    os.replace(_saved_dir(os.path.join(directory, "staging"), name), path)
    return path


def extract_for_original_base(
    model: PeftModel, name: str, initial: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`extract`, or for an init that rewrote the base (`initial` = its snapshot) PEFT's own conversion to an
    ordinary LoRA on the unmodified base: delta W = B A - B0 A0 = [B | -B0] [A ; A0], at rank 2r (save_pretrained's
    path_initial_model_for_weight_conversion). The store, merges and serving then need nothing special."""
    if initial is None:
        return extract(model, name)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out, selected_adapters=[name], path_initial_model_for_weight_conversion=initial)
        config, tensors = read_peft_dir(_saved_dir(out, name))
    return config_dict(to_peft_config(config)), tensors


EVA_BATCHES = 16
"""Training micro-batches EVA's data pass may read (it stops earlier once each layer's components settle)."""


def initialize_eva(
    model: PeftModel, name: str, batches: Iterable[dict[str, torch.Tensor]], *, progress: bool = False
) -> None:
    """EVA: each A from the top right-singular vectors of its layer's inputs on training batches (B stays zero,
    the base is untouched, ranks may be redistributed into rank_pattern), so the adapter publishes as it is."""
    from peft import initialize_lora_eva_weights

    data = list(itertools.islice(batches, EVA_BATCHES))
    initialize_lora_eva_weights(model, dataloader=data, adapter_name=name, show_progress_bar=progress)


def unwrap(model: torch.nn.Module) -> PeftModel:
    """The PeftModel inside a DDP or DeepSpeed wrapper (they keep it in `.module`), or the model itself."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, PeftModel):
        raise TypeError(f"expected a PEFT model, got {type(inner).__name__}")
    return inner


def adapter_state(
    model: PeftModel, name: str, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors in PEFT's file format, from the model or from a state dict gathered from it
    (FSDP and DeepSpeed gather their shards first). AdaLoRA's at full rank: `cut_ranks` cuts them to publish."""
    config = model.peft_config[name]
    # never a copy of the base's embedding or output weights (PEFT's "auto" saves one beside an adapter on
    # those layers): madapt never resizes them, and serving runs every adapter on the base's own
    save = functools.partial(get_peft_model_state_dict, model, state_dict, name, save_embedding_layers=False)
    if config.peft_type != "ADALORA" or not config.rank_pattern:
        return save()
    pattern, config.rank_pattern = config.rank_pattern, None  # PEFT's own cut mistakes paths containing `name`
    try:
        return save()
    finally:
        config.rank_pattern = pattern


def load_adapter_state(model: PeftModel, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Put checkpointed adapter tensors (PEFT's file format) back into adapter `name`."""
    set_peft_model_state_dict(model, tensors, adapter_name=name)


def attach(model: torch.nn.Module, adapter: StoredAdapter, name: str | None = None) -> PeftModel:
    """Add a stored adapter to `model` under `name` (default: the adapter's own name).

    The first adapter wraps the base in a PeftModel; later ones of the same type are added beside it, so
    switching between adapters never reloads the base. Returns the PeftModel.
    """
    name = name or adapter.manifest.name
    config = to_peft_config(adapter.config)
    config.inference_mode = True
    if isinstance(config, LoraConfig):
        # The stored weights are final: an init that rewrites the base (PiSSA, OLoRA, CorDA, LoftQ, EVA) named
        # in adapter_config.json must never run on the shared base when loading.
        config.init_lora_weights = False
    cut_ranks = None
    if getattr(config, "rank_pattern", None) and config.peft_type == "ADALORA":
        # AdaLoRA's kept ranks: injected at init_r, cut when the tensors load. PEFT tells a pattern key's module
        # path by whether the adapter name occurs in it (as a substring): naming the adapter makes that right.
        cut_ranks = {f"{k}.{name}": v for k, v in config.rank_pattern.items()}
        config.rank_pattern = None
    missing = _missing_targets(model, config)
    if missing:
        raise AdapterMismatch(f"{adapter.ref}: base model has no module(s) {missing} to adapt")
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise AdapterMismatch(f"an adapter named {name!r} is already attached")
        held = attached_kind(model)
        if held != peft_kind(config):
            raise AdapterMismatch(
                f"{adapter.ref}: a {peft_kind(config)} adapter cannot join the {held} adapters of this PEFT model "
                "(PEFT holds one adapter type per model; unload them first)"
            )
        model.add_adapter(name, config)
    else:
        was_training = model.training
        model = get_peft_model(model, config, adapter_name=name)
        model.train(was_training)  # get_peft_model leaves the wrapper in train mode (dropout on)
    try:
        if cut_ranks is not None:
            model.peft_config[name].rank_pattern = cut_ranks
        result = set_peft_model_state_dict(model, adapter.tensors, adapter_name=name)
        marker = adapter_types.tensor_marker(adapter_kind(adapter.config))
        unexpected = [k for k in result.unexpected_keys if marker in k]
        if unexpected:
            raise AdapterMismatch(f"{adapter.ref}: weights do not fit this base model (e.g. {unexpected[0]})")
    except (AdapterMismatch, RuntimeError, AttributeError) as error:  # AttributeError: a pattern's module is missing
        _detach(model, name)  # leave the model as it was: other adapters keep working
        if isinstance(error, AdapterMismatch):
            raise
        raise AdapterMismatch(f"{adapter.ref}: weights do not fit this base model: {error}") from None
    return model


def _detach(model: PeftModel, name: str) -> None:
    if len(model.peft_config) > 1:
        model.delete_adapter(name)
    else:  # PEFT cannot delete the last adapter; unwrap the base instead
        model.unload()


def _missing_targets(model: torch.nn.Module, config: Any) -> list[str]:
    """The target_modules names no module of `model` answers to; a regular expression (PEFT's string form,
    as Unsloth and others save it) that matches no module path, by PEFT's own matching."""
    targets = config.target_modules
    if targets is None or targets == "all-linear":  # PEFT resolves its shorthand itself
        return []
    if isinstance(targets, str):
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        return [] if targeted(config, [n for n, _ in base.named_modules()]) else [targets]
    names = [n for n, _ in model.named_modules()]
    return [m for m in targets if not any(n == m or n.endswith("." + m) for n in names)]


def pad_rank(config: dict[str, Any], tensors: dict[str, torch.Tensor], rank: int) -> tuple[dict, dict]:
    """Zero-pad a LoRA adapter to a larger rank without changing any delta W.

    A gains zero rows and B zero columns, so B @ A is unchanged; alpha is scaled with r so the
    scaling alpha/r stays the same. PEFT's linear/ties/dare merges need equal ranks; this lets
    adapters of different ranks merge.
    """
    r = int(config["r"])
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterMismatch("adapters with per-module rank_pattern/alpha_pattern cannot be rank-padded")
    padded = {}
    for key, tensor in tensors.items():
        if key.endswith(LORA_A):
            tensor = torch.cat([tensor, tensor.new_zeros(rank - r, tensor.shape[1])], dim=0)
        elif key.endswith(LORA_B):
            tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], rank - r)], dim=1)
        padded[key] = tensor
    scale = rank / r
    new_config = {**config, "r": rank, "lora_alpha": config["lora_alpha"] * scale}
    if new_config.get("use_rslora"):
        raise AdapterMismatch("rsLoRA adapters cannot be rank-padded exactly")
    return new_config, padded


def delta_weights(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense delta W = (alpha / r) * B @ A for every adapted module, keyed by module path."""
    scale = lora_scale(config)
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(LORA_A):
            module = key.removesuffix("." + LORA_A)
            b = tensors[f"{module}.{LORA_B}"]
            deltas[module] = scale * (b.float() @ a.float())
    return deltas


def read_peft_dir(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter saved by PEFT's save_pretrained (local dir), refusing anything but safetensors.

    PEFT's layout, not the store's (the store reads its own versions, checksums first): used to import an
    adapter trained elsewhere and to read back what PEFT's own conversions write."""
    path = os.path.abspath(directory)
    config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    if not os.path.isdir(path):
        raise StoreError(f"{directory}: not a directory")
    if not os.path.exists(weights_path):
        pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
        detail = f"; found {pickles}, which madapt never loads (pickle can run code)" if pickles else ""
        raise StoreError(f"{directory}: no {WEIGHTS_FILE}{detail}")
    if not os.path.exists(config_path):
        raise StoreError(f"{directory}: no {CONFIG_FILE}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(f"{config_path}: not valid JSON: {error}") from None
    with open(weights_path, "rb") as handle:
        data = handle.read()
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise CorruptAdapter(f"{weights_path}: not a readable safetensors file: {error}") from None
    check_finite(tensors, weights_path)
    return config, tensors
