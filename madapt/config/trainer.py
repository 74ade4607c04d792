"""Config sections about training: the trainer, its optimizer, learning rate schedule and gradient clipping,
and the base model's quantization."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from madapt.config.ludwig import Strict, same_note

Decay = Literal["none", "linear", "cosine", "exponential", "one_cycle", "inverse_sqrt", "polynomial", "wsd"]


class LRSchedulerConfig(Strict):
    decay: Decay | None = None
    decay_rate: float = Field(0.96, gt=0, le=1)
    decay_steps: int = Field(10000, ge=1)
    staircase: bool = False
    warmup_fraction: float = Field(0.0, ge=0, le=1)
    warmup_evaluations: float = Field(0, ge=0)
    t_0: int | None = Field(None, ge=1, description="Cosine period in steps; default: the steps after warm-up.")
    t_mult: int = Field(1, ge=1)
    eta_min: float = Field(0.0, ge=0)
    ludwig_ignored: ClassVar[dict[str, str]] = {
        **same_note(
            "reduce_on_plateau reduce_on_plateau_patience reduce_on_plateau_rate reduce_eval_metric reduce_eval_split",
            "madapt does not evaluate during training, so the learning rate is never reduced on a plateau",
        ),
        **same_note(
            "max_lr pct_start div_factor final_div_factor inverse_sqrt_warmup_steps polynomial_power "
            "polynomial_end_lr wsd_warmup_fraction wsd_stable_fraction wsd_decay_fraction",
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


PREFERENCE_TYPES = ("dpo", "kto", "orpo")
PREFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "dpo": ("dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "rejected_column"),
    "kto": ("kto_beta", "kto_desirable_weight", "kto_undesirable_weight", "kto_label_column", "rejected_column"),
    "orpo": ("orpo_beta", "rejected_column"),
    "grpo": ("grpo_beta", "grpo_epsilon", "grpo_num_generations"),
}
"""Each preference trainer type's own keys (Ludwig's DPO/KTO/ORPO/GRPOTrainerConfig; the kto_* weights and label
column are madapt's): any of them under another trainer type is an error naming its type."""
PREFERENCE_ALIASES: dict[str, dict[str, str]] = {
    "dpo": {"beta": "dpo_beta", "loss_type": "dpo_loss_type"},
    "kto": {
        "beta": "kto_beta",
        "desirable_weight": "kto_desirable_weight",
        "undesirable_weight": "kto_undesirable_weight",
    },
    "orpo": {"beta": "orpo_beta"},
}
"""Keys Ludwig's alignment examples (examples/alignment/config_*.yaml) and trainer_dpo.py's docstring write but
its schema lacks (Ludwig drops them): read as the type's key, with a warning line saying so."""

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
    # Preference tuning: each key belongs to one trainer type (PREFERENCE_KEYS); Ludwig's defaults and ranges.
    dpo_beta: float = Field(0.1, gt=0, description="DPO's beta: how far the policy may move from the reference.")
    dpo_loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    dpo_label_smoothing: float = Field(0.0, ge=0, le=0.5, description="Conservative DPO's label noise.")
    rejected_column: str = Field("rejected", min_length=1, description="Column of the rejected completions.")
    kto_beta: float = Field(0.1, gt=0, description="KTO's beta.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="madapt: KTO's lambda_D (TRL's desirable_weight).")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="madapt: KTO's lambda_U (TRL's undesirable_weight).")
    kto_label_column: str = Field(
        "label", min_length=1, description="madapt: KTO's column of booleans, true where the completion is desirable."
    )
    orpo_beta: float = Field(0.1, gt=0, description="ORPO's lambda: the weight of the odds-ratio term.")
    grpo_beta: float = 0.04
    grpo_epsilon: float = Field(0.2, ge=0, le=1)
    grpo_num_generations: int = Field(4, ge=1)
    ludwig_ignored: ClassVar[dict[str, str]] = {
        **same_note(
            "eval_steps evaluate_training_set validation_field validation_metric skip_all_evaluation "
            "increase_batch_size_on_plateau increase_batch_size_on_plateau_patience "
            "increase_batch_size_on_plateau_rate increase_batch_size_eval_metric "
            "increase_batch_size_eval_split",
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
        **same_note(
            "loss_balancing loss_balancing_alpha loss_balancing_lr loss_balancing_preference_vector "
            "loss_balancing_tchebycheff_weight contrastive_pretrain_epochs "
            "contrastive_pretrain_temperature contrastive_pretrain_projection_dim "
            "contrastive_pretrain_learnable_temperature modality_dropout model_soup model_soup_top_k",
            "ECD multi-task option; an LLM fine-tune has one loss, so madapt ignores it",
        ),
    }

    @property
    def is_preference(self) -> bool:
        """A preference-tuning trainer (dpo, kto, orpo): rows carry a judged completion, not one answer."""
        return self.type in PREFERENCE_TYPES

    @classmethod
    def passed_keys(cls, data: dict[Any, Any]) -> frozenset[str]:
        kind = data.get("type")
        return frozenset(PREFERENCE_ALIASES.get(kind, {})) if isinstance(kind, str) else frozenset()

    @model_validator(mode="before")
    @classmethod
    def _preference_aliases(cls, data: Any) -> Any:
        """`beta:` (and KTO's `desirable_weight:`/`undesirable_weight:`), as Ludwig's example configs write
        them, read as the trainer type's own key."""
        if not isinstance(data, dict):
            return data
        kind = data.get("type")
        own = PREFERENCE_ALIASES.get(kind, {}) if isinstance(kind, str) else {}
        aliases = {k: v for k, v in own.items() if k in data}
        if not aliases:
            return data
        data = dict(data)
        for alias, key in aliases.items():
            value = data.pop(alias)
            if key in data and data[key] != value:
                raise ValueError(f"{alias} {value!r} and {key} {data[key]!r} disagree: keep {key}")
            data[key] = value
        return data

    @property
    def held_out_batch_size(self) -> int:
        """Rows per forward pass wherever held-out rows are scored (mid-training, `madapt eval`)."""
        return self.eval_batch_size or self.batch_size

    @classmethod
    def value_notes(cls, data: dict[Any, Any]) -> dict[str, tuple[str, bool]]:
        defaults = {"batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "eval_batch_size": None}
        notes = {
            key: (
                "'auto' tuning is not run by madapt; it uses "
                + (f"its default {default}" if default is not None else "trainer.batch_size"),
                True,
            )
            for key, default in defaults.items()
            if data.get(key) == "auto"
        }
        kind = data.get("type")
        for alias, key in (PREFERENCE_ALIASES.get(kind, {}) if isinstance(kind, str) else {}).items():
            if alias in data:
                notes[alias] = (
                    f"not a key of Ludwig's {kind} trainer (Ludwig drops it with a warning and trains with "
                    f"{key}'s default); madapt reads it as trainer.{key}: write {key}",
                    False,
                )
        if kind == "kto" and "rejected_column" in data:
            notes["rejected_column"] = (
                "KTO rows hold one completion and a label (trainer.kto_label_column); rejected_column is not read",
                False,
            )
        return notes


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
