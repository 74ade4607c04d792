"""Every rule that needs only the config, beyond what one section's types say: names and references across
sections (checked on the raw document), adapter types (through madapt.adapter_types and PEFT's config
classes, imported when a config names a type other than lora), training, quantization, tracking, the prompt
template, and the data a training run needs. The merge rules, which the schema's validators call, are in
merge_rules.py; the QLoRA strategy rule is here, and the Ray driver calls it too.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import string
from collections.abc import Sequence
from typing import Any

from madapt import adapter_types
from madapt.adapter_types import LORA_ENTRY_KEYS
from madapt.config.adapters import (
    ADAPTER_TYPE_KEYS,
    BASE_CHANGING_INITS,
    LOCAL_ONLY_INITS,
    LoraAdapterConfig,
)
from madapt.config.merge_rules import merge_type_problems
from madapt.config.names import MAX_ENSEMBLE_MEMBERS, SINGLE_ADAPTER_NAME, check_adapter_name, member_name
from madapt.config.schema import Config
from madapt.config.trainer import LUDWIG_OPTIMIZERS, PREFERENCE_KEYS, TORCH_OPTIMIZERS, TrainerConfig


def cross_reference_problems(data: dict[str, Any]) -> list[str]:
    """Rules that span sections (names, references, exclusivity), checked on the raw document so they
    are reported even when other keys fail type validation."""
    problems = []
    if "adapter" in data and "adapters" in data:
        problems.append("adapter, adapters: mutually exclusive; keep one")
    if "adapter" not in data and "adapters" not in data:
        problems.append(
            "adapters: declare an adapter: either `adapter:` or `adapters: {adapters: {...}}`; madapt trains and "
            "serves adapters only (without one, Ludwig fine-tunes the whole model, or with trainer.type: none "
            "predicts zero-shot with the base)"
        )
    section = data.get("adapters")
    if not isinstance(section, dict):
        return problems
    declared = section.get("adapters")
    names = [str(n) for n in declared] if isinstance(declared, dict) else []
    for name in names:
        try:
            check_adapter_name(name)
        except ValueError as error:
            problems.append(f"adapters.adapters.{name}: {error}")
    problems += ensemble_name_problems(declared if isinstance(declared, dict) else {}, section.get("merge"))
    merge = section.get("merge")
    merge_name = merge.get("name") if isinstance(merge, dict) else None
    if isinstance(merge_name, str):
        try:
            check_adapter_name(merge_name, "merge name")
        except ValueError as error:
            problems.append(f"adapters.merge.name: {error}")
        if merge_name in names:
            problems.append(f"adapters.merge.name: {merge_name!r} is already an adapter name; pick a distinct one")
    sources = merge.get("sources") if isinstance(merge, dict) else None
    if isinstance(sources, list) and names:
        unknown = [s for s in sources if s not in names]
        if unknown:
            problems.append(f"adapters.merge.sources: undeclared adapter(s) {unknown}; declared: {names}")
    active = section.get("active")
    choices = list(dict.fromkeys([*names, *([merge_name] if isinstance(merge_name, str) else [])]))
    if active is not None and names and active not in choices:
        problems.append(f"adapters.active: {active!r} is neither an adapter nor the merge; choose one of {choices}")
    return problems


def ensemble_name_problems(declared: dict[Any, Any], merge: Any) -> list[str]:
    """Ensemble members are published as `<adapter>-m<i>`: those names must be valid and free."""
    taken = {str(n) for n in declared}
    if isinstance(merge, dict) and "name" in merge:
        taken.add(str(merge["name"]))
    problems = []
    for name, adapter in declared.items():
        ensemble = adapter.get("ensemble") if isinstance(adapter, dict) else None
        members = ensemble.get("members") if isinstance(ensemble, dict) else None
        if not isinstance(members, int) or not 2 <= members <= MAX_ENSEMBLE_MEMBERS:
            continue  # the schema reports it
        for index in range(1, members + 1):
            member = member_name(str(name), index)
            try:
                check_adapter_name(member, "ensemble member name")
            except ValueError as error:
                problems.append(f"adapters.adapters.{name}.ensemble: {error}; use a shorter adapter name")
                break
            if member in taken:
                problems.append(f"adapters.adapters.{name}.ensemble: member name {member!r} is already declared")
    return problems


def adapter_paths(config: Config) -> dict[str, tuple[str, LoraAdapterConfig]]:
    """Each declared adapter by name, with its YAML path (none when the config declares none)."""
    if config.adapters is not None:
        return {name: (f"adapters.adapters.{name}", a) for name, a in config.adapters.adapters.items()}
    return {SINGLE_ADAPTER_NAME: ("adapter", config.adapter)} if config.adapter is not None else {}


def _installed_peft_types() -> set[str] | None:
    try:
        from peft import PeftType
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return {str(t.value).lower() for t in PeftType}


def adapter_problems(config: Config) -> list[str]:
    problems = []
    for path, adapter in adapter_paths(config).values():
        if adapter.type not in ADAPTER_TYPE_KEYS:
            close = difflib.get_close_matches(adapter.type, list(ADAPTER_TYPE_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"{path}.type: unknown adapter type {adapter.type!r}{hint} (Ludwig's: {list(ADAPTER_TYPE_KEYS)})"
            )
        elif adapter.type != "lora":
            installed = _installed_peft_types()
            if installed is not None and adapter.type not in installed:
                problems.append(f"{path}.type: adapter type {adapter.type!r} is not supported by the installed PEFT")
            else:
                problems += type_problems(config, path, adapter)
            continue
        if adapter.options:
            problems.append(f"{path}.options: only other adapter types than lora have options; give lora's as keys")
        init = adapter.init_lora_weights
        if isinstance(init, str) and init in BASE_CHANGING_INITS:
            problems.append(
                f"{path}.init_lora_weights: {init!r} is refused: {BASE_CHANGING_INITS[init]}; madapt publishes "
                "plain LoRA adapters for the original base (use true, false, gaussian, pissa, olora, corda or eva)"
            )
        if isinstance(init, str) and init in LOCAL_ONLY_INITS:
            if config.backend.type != "local":
                problems.append(
                    f"{path}.init_lora_weights: {init!r} trains on backend: local only (PEFT's conversion to a plain "
                    "LoRA on the original base, or EVA's data pass, needs the whole adapter in one process)"
                )
            if config.quantization is not None:
                problems.append(
                    f"{path}.init_lora_weights: {init!r} with quantization is refused: "
                    + (
                        "madapt has not verified EVA's data pass on a quantised base"
                        if init == "eva"
                        else "the adapter converted to the original base would not reproduce the model trained on "
                        "the quantised residual"
                    )
                )
        problems += eva_problems(path, adapter)
    merge = config.merge
    if merge is not None and config.adapters is not None:
        kinds = [config.adapters.adapters[s].type for s in merge.sources if s in config.adapters.adapters]
        problems += [f"adapters.merge: {p}" for p in merge_type_problems(kinds, merge.combination_type)]
    return problems


LORA_ONLY_FIELDS = (
    *LORA_ENTRY_KEYS,
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "eva_config",
)


def type_problems(config: Config, path: str, adapter: LoraAdapterConfig) -> list[str]:
    """A non-lora adapter: its options must be its type's (checked against PEFT's config class), and the
    training setup one that madapt runs for that type."""
    kind = adapter.type
    passed = [k for k in LORA_ENTRY_KEYS if k in ADAPTER_TYPE_KEYS[kind]]
    own = LoraAdapterConfig.passed_keys({"type": kind})
    problems = [
        f"{path}.{key}: a lora option; {kind} adapters do not take it (theirs: {sorted({*passed, *own})})"
        for key in LORA_ONLY_FIELDS
        if key in adapter.model_fields_set and key not in passed
    ]
    problems += [
        f"{path}.options.{key}: not a key of Ludwig's {kind} adapter (its keys: {sorted(own)})"
        for key in sorted(set(adapter.options) - own)
    ]
    if adapter.bias != "none":
        problems.append(
            f"{path}.bias_type: {kind} adapters train no biases in madapt (bias tensors would be dropped when serving)"
        )
    options = adapter.type_options
    option_problems = adapter_types.option_problems(kind, options)
    problems += [f"{path}.{problem}" for problem in option_problems]
    if not option_problems:
        placeholder = {"total_step": 1000} if kind == "adalora" and "total_step" not in options else {}
        try:
            adapter_types.build_config(kind, options, adapter.target_modules, **placeholder)
        except adapter_types.AdapterTypeError as error:
            problems.append(f"{path}: {error}")
    if config.backend.type == "ray":
        strategy = config.backend.trainer.strategy
        refusal = adapter_types.STRATEGY_REFUSALS.get(kind, {}).get(strategy)
        if refusal:
            problems.append(f"{path}.type: {kind} cannot train with backend.trainer.strategy {strategy!r}: {refusal}")
    if config.quantization is not None:
        problems.append(f"{path}.type: madapt trains {kind} adapters on an unquantised base only (QLoRA is lora's)")
    if adapter.ensemble is not None:
        problems += [f"{path}.ensemble: {p}" for p in merge_type_problems([kind], adapter.ensemble.combination_type)]
    return problems


def eva_problems(path: str, adapter: LoraAdapterConfig) -> list[str]:
    """`eva_config` goes with init_lora_weights: eva and holds only PEFT's EvaConfig fields."""
    if adapter.eva_config is None:
        return []
    if adapter.init_lora_weights != "eva":
        return [f"{path}.eva_config: only used with init_lora_weights: eva"]
    try:
        from peft import EvaConfig
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    known = [f.name for f in dataclasses.fields(EvaConfig)]
    return [
        f"{path}.eva_config.{key}: not an EVA option (PEFT's EvaConfig takes {known})"
        for key in adapter.eva_config
        if key not in known
    ]


def training_problems(config: Config) -> list[str]:
    trainer = config.trainer
    problems = []
    if trainer.type == "none":
        problems.append(
            "trainer.type: trainer type 'none' is not run by madapt yet (finetune, dpo, kto or orpo): madapt "
            "trains adapters and does not predict zero-shot without training"
        )
    elif trainer.type == "grpo":
        problems.append(
            "trainer.type: trainer type 'grpo' is not run by madapt yet (finetune, dpo, kto or orpo): GRPO needs a "
            "reward function and completions generated inside the training loop, which madapt's loop does not "
            "do; score candidates offline and train dpo on the best/worst pairs"
        )
    problems += preference_key_problems(trainer)
    optimizer = trainer.optimizer
    if optimizer.type not in LUDWIG_OPTIMIZERS:
        close = difflib.get_close_matches(optimizer.type, list(LUDWIG_OPTIMIZERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"trainer.optimizer.type: unknown optimizer {optimizer.type!r}{hint}")
    elif optimizer.type not in TORCH_OPTIMIZERS:
        problems.append(
            f"trainer.optimizer.type: optimizer {optimizer.type!r} is not run by madapt yet "
            f"(use one of {list(TORCH_OPTIMIZERS)})"
        )
    else:
        allowed = TORCH_OPTIMIZERS[optimizer.type][1]
        for key in sorted(optimizer.model_fields_set - {"type"} - set(allowed)):
            problems.append(
                f"trainer.optimizer.{key}: not a parameter of {optimizer.type!r} (it takes {list(allowed)})"
            )
    decay = trainer.learning_rate_scheduler.decay
    if decay not in (None, "none", "linear", "cosine", "exponential"):
        problems.append(
            f"trainer.learning_rate_scheduler.decay: {decay!r} is not run by madapt yet "
            "(use none, linear, cosine or exponential)"
        )
    if config.is_multimodal:
        problems.append("is_multimodal: madapt trains text-only causal LMs (AutoModelForCausalLM)")
    return problems


def preference_key_problems(trainer: TrainerConfig) -> list[str]:
    """A preference trainer type's keys (trainer.PREFERENCE_KEYS) under another type: an error naming theirs."""
    own = set(PREFERENCE_KEYS.get(trainer.type, ()))
    owners: dict[str, list[str]] = {}
    for kind, keys in PREFERENCE_KEYS.items():
        for key in keys:
            owners.setdefault(key, []).append(kind)
    return [
        f"trainer.{key}: a key of trainer type {' / '.join(kinds)}, not of {trainer.type!r}; "
        f"set trainer.type: {kinds[0]} or drop it"
        for key, kinds in owners.items()
        if key in trainer.model_fields_set and key not in own
    ]


def early_stop_problems(config: Config) -> list[str]:
    """trainer.early_stop needs an unquantized base, since madapt does not evaluate a quantized base mid-run
    (an eval-mode forward lets bitsandbytes repack its 4-bit weights, and the adapter trained on afterwards no
    longer matches a fresh base). Its held-out data is checked with the data, at train time (`data_problems`)."""
    if config.trainer.early_stop <= 0 or config.quantization is None:
        return []
    return [
        "trainer.early_stop: needs held-out evaluations during training, which madapt does not run on a "
        "quantized base (quantization.bits); set early_stop: -1 or drop quantization"
    ]


def data_problems(
    config: Config, adapters: Sequence[str], *, given: Sequence[str] = (), given_eval: Sequence[str] = ()
) -> list[str]:
    """What training `adapters` needs of its data, checked before any of them trains. As in Ludwig, data comes
    at train time: `given`/`given_eval` name the adapters whose (held-out) data came with the command
    (`--dataset`, `Model.train(dataset=...)`); the others need the config's `dataset:`/`eval_dataset:`."""
    paths = adapter_paths(config)
    problems = [
        f"{paths[name][0]}.dataset: adapter {name!r} has no training data: give it at train time "
        f"(madapt train CONFIG --dataset FILE{'' if len(paths) == 1 else f' --adapter {name}'}) "
        "or in the config (a dataset: key)"
        for name in adapters
        if name not in given and config.dataset_for(name) is None
    ]
    no_held_out = [
        name
        for name in adapters
        if config.trainer.eval_fraction == 0 and name not in given_eval and not config.named_adapters[name].eval_dataset
    ]
    if config.trainer.early_stop > 0:
        problems += [
            f"trainer.early_stop: adapter {name!r} has no held-out data to watch; give --eval-dataset, "
            f"{paths[name][0]}.eval_dataset or trainer.eval_fraction > 0"
            for name in no_held_out
        ]
    return problems


def report_problems(config: Config, given_eval: Sequence[str] = ()) -> list[str]:
    """The quality report that follows a merge reads each source's held-out examples; with
    trainer.eval_fraction 0 a source needs its own eval data."""
    if config.merge is None or config.trainer.eval_fraction > 0:
        return []
    adapters = config.named_adapters
    return [
        f"adapters.adapters.{name}.eval_dataset: no held-out examples for the quality report after the merge; "
        "set eval_dataset or trainer.eval_fraction > 0"
        for name in config.merge.sources
        if name in adapters and not adapters[name].eval_dataset and name not in given_eval
    ]


def quantization_problems(config: Config) -> list[str]:
    quantization = config.quantization
    if quantization is None:
        return []
    problems = []
    if quantization.backend != "bitsandbytes" or quantization.mode is not None or quantization.qat:
        problems.append("quantization.backend: madapt quantises with bitsandbytes only (no torchao mode or qat)")
    if config.backend.type == "ray":
        problems += qlora_strategy_problems(quantization.bits, config.backend.trainer.strategy)
    return problems


def qlora_strategy_problems(bits: int | None, strategy: str) -> list[str]:
    """Ray Train runs a quantised base (QLoRA) with ddp only: fsdp and deepspeed shard weights, and
    bitsandbytes' packed weights cannot be sharded. Checked at load and again by the Ray driver."""
    if bits is None or strategy == "ddp":
        return []
    return [
        f"backend.trainer.strategy: {strategy!r} cannot shard {bits}-bit quantised weights; "
        "QLoRA (quantization.bits) needs strategy: ddp"
    ]


TRACKING_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
"""Each tracker and the package that writes for it (tensorboardX ships with ray[train]; the others are the
`tracking` extra)."""


def tracking_problems(config: Config) -> list[str]:
    """Trackers that `train` could not start: a missing package, or MLflow's default file store in a bucket."""
    tracking = config.tracking
    problems = []
    wanted = {"tensorboard": tracking.tensorboard, "mlflow": tracking.mlflow, "wandb": tracking.wandb}
    for key, package in TRACKING_PACKAGES.items():
        if wanted[key] and importlib.util.find_spec(package) is None:
            problems.append(f"tracking.{key}: needs the {package} package: pip install 'madapt[tracking]'")
    storage = config.backend.trainer.storage_path or ""
    bucket = config.backend.type == "ray" and "://" in storage and not storage.startswith("file://")
    if (
        tracking.mlflow
        and tracking.mlflow.tracking_uri is None
        and not os.environ.get("MLFLOW_TRACKING_URI")
        and bucket
    ):
        problems.append(
            f"tracking.mlflow.tracking_uri: MLflow's default file store cannot live in {storage!r} "
            "(backend.trainer.storage_path); give a tracking server (http://...) or a shared directory"
        )
    return problems


def prompt_problems(config: Config) -> list[str]:
    """Template rules Ludwig checks from the config alone (ludwig/config_validation/checks.py). Its other
    placeholders are dataset columns, whichever the input feature is: they are checked against the data when
    it is read (data.prompt_columns)."""
    template, task = config.prompt.template, config.prompt.task
    if template is None:
        return []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        return [f"prompt.template: broken placeholder ({error}); write literal braces as {{{{ and }}}}"]
    problems = []
    fields = [(name, spec) for _, name, spec, _ in parsed if name is not None]
    for name, spec in fields:
        if name == "__context__":
            problems.append("prompt.template: {__context__} needs prompt.retrieval, which madapt does not run")
        elif name == config.output_column:
            problems.append(
                f"prompt.template: {{{name}}} is the output feature's column; the response is appended after the "
                "prompt, not written into it (as in Ludwig)"
            )
        elif not name or name.isdigit() or "." in name or "[" in name:
            problems.append(f"prompt.template: {{{name}}} names no column (no positional, attribute or index fields)")
        if spec and "f" not in spec:
            problems.append(f"prompt.template: unsupported format spec {spec!r} in {{{name}}} (only float specs)")
    if not any(name != "__task__" for name, _ in fields):
        problems.append(
            "prompt.template: must contain {__sample__} or at least one dataset column, "
            f"e.g. {{{config.input_column}}}"
        )
    if task is not None and "__task__" not in [name for name, _ in fields]:
        problems.append("prompt.template: prompt.task is set, so the template must contain {__task__}")
    return problems
