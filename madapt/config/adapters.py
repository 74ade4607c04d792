"""Config sections about adapters: one adapter entry (LoRA's fields, another type's own keys), its ensemble,
the merge and the `adapters:` section that holds them."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from madapt.adapter_types import LORA_ENTRY_KEYS
from madapt.config.ludwig import Strict
from madapt.config.merge_rules import default_density, merge_problems
from madapt.config.names import (
    DENSITY_TYPES,
    MAX_ENSEMBLE_MEMBERS,
    CombinationType,
    MajoritySignMethod,
    member_name,
)

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
"""Inits that rewrite the base at init and that madapt trains anyway: PEFT converts the trained adapter to an
ordinary LoRA (rank 2r) on the original base before it is published (lora.extract_for_original_base)."""
LOCAL_ONLY_INITS = (*CONVERTED_INITS, "eva")
"""Inits run in the local trainer only: the conversion, or EVA's data pass, needs the whole adapter in one process."""
LoraInit = Literal["default", "gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal"]


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
            self.density = default_density(self.combination_type)
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
    init_lora_weights: bool | LoraInit = True
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
    majority_sign_method: MajoritySignMethod = Field("total", description="How ties types elect each entry's sign.")

    @model_validator(mode="before")
    @classmethod
    def _equal_weights_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("weights") is None and isinstance(data.get("sources"), list):
            data = {**data, "weights": [1.0] * len(data["sources"])}
        return data

    @model_validator(mode="after")
    def _weights_and_density(self) -> MergeConfig:
        if self.density is None and self.combination_type in DENSITY_TYPES:
            self.density = default_density(self.combination_type)
        problems = merge_problems(
            self.name,
            self.sources,
            self.weights,
            self.combination_type,
            density=self.density,
            rank=self.rank,
            majority_sign_method=self.majority_sign_method,
        )
        if problems:
            raise ValueError("; ".join(problems))
        total = sum(self.weights)
        self.weights = [w / total for w in self.weights]
        return self


class AdaptersConfig(Strict):
    adapters: dict[str, LoraAdapterConfig] = Field(min_length=1)
    merge: MergeConfig | None = None
    active: str | None = None
