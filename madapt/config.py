"""The madapt YAML schema: a Ludwig-compatible LLM config, validated once at load.

Every rule lives here and every error names its YAML path. `load_config` reports all problems in a
file together as one `ConfigError`, so a user fixes a config in one pass.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""Safe adapter names: they become store paths and HTTP model ids, so no separators and no dots."""

SINGLE_ADAPTER_NAME = "default"
"""The name a singular `adapter:` section is trained and published under."""

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


class ConfigError(ValueError):
    """A config that cannot be used; `problems` lists every issue as 'yaml.path: message'."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class InvalidName(ValueError):
    """An adapter id that is not a safe identifier."""


def check_adapter_name(name: str, what: str = "adapter name") -> str:
    """Refuse names that could escape a directory or break an HTTP model id."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Feature(Strict):
    name: str = Field(description="Dataset column holding this text.")
    type: Literal["text"] = "text"


class PromptConfig(Strict):
    template: str | None = Field(
        None, description="Prompt template with {column} placeholders; default: the input column as is."
    )


class TrainerConfig(Strict):
    type: Literal["finetune"] = "finetune"
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    max_length: int = Field(256, ge=8, description="Tokens per example after templating; longer rows are cut.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Held-out share of each dataset when no eval_dataset is given."
    )
    seed: int = 42


class QuantizationConfig(Strict):
    bits: Literal[4, 8]


class LoraAdapterConfig(Strict):
    type: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the base model's attention q/v projections."
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    dataset: str | None = Field(None, description="madapt: this adapter's training data (CSV/JSONL/Parquet).")
    eval_dataset: str | None = Field(None, description="madapt: held-out data; default: carved off `dataset`.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must name at least one module, or be left out for the default")
        return value


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
    strategy: Strategy = Field("ddp", description="Default: fsdp with several workers, ddp with one.")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Default: 1 GPU per worker with use_gpu, else a CPU share that fits the machine."
    )
    deepspeed_stage: Literal[2, 3] = 2
    storage_path: str | None = Field(None, description="Ray Train checkpoints; must be shared across nodes.")
    max_failures: int = Field(2, ge=0, description="Worker failures survived by restarting from a checkpoint.")
    checkpoint_every: int = Field(20, ge=1, description="Optimizer steps between checkpoints.")

    @model_validator(mode="before")
    @classmethod
    def _default_strategy(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("strategy") is None:
            workers = data.get("num_workers", 1)
            data = {**data, "strategy": "fsdp" if isinstance(workers, int) and workers > 1 else "ddp"}
        return data


class BackendConfig(Strict):
    type: Literal["ray", "local"] = "ray"
    trainer: RayTrainerConfig = Field(default_factory=RayTrainerConfig)


class Config(Strict):
    model_type: Literal["llm"] = "llm"
    base_model: str = Field(description="Hugging Face id, local directory, or an embedded name (see models.py).")
    trust_remote_code: bool = False
    input_features: list[Feature] = Field(default_factory=lambda: [Feature(name="prompt")], min_length=1, max_length=1)
    output_features: list[Feature] = Field(
        default_factory=lambda: [Feature(name="response")], min_length=1, max_length=1
    )
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    quantization: QuantizationConfig | None = None
    adapter: LoraAdapterConfig | None = None
    adapters: AdaptersConfig | None = None
    dataset: str | None = Field(None, description="madapt: data for adapters that name none of their own.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)

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
        return self.input_features[0].name

    @property
    def output_column(self) -> str:
        return self.output_features[0].name

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


def _yaml_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path or "(top level)"


def format_validation_error(error: ValidationError) -> list[str]:
    """One 'yaml.path: message' line per pydantic error, with pydantic's prefixes removed."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if item["type"] == "extra_forbidden":
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
        problems.append("adapters: declare an adapter: either `adapter:` or `adapters: {adapters: {...}}`")
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


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate an already-parsed YAML document, reporting every problem at once."""
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping of keys, got {type(data).__name__}"], source)
    problems = cross_reference_problems(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        problems += format_validation_error(error)
    if problems:
        raise ConfigError(problems, source)
    return config


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
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML: {error}"], str(path)) from None
    config = parse_config(data, str(path))
    return _resolve_paths(config, path.parent.resolve())


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(value: str | None) -> str | None:
        if value is None or "://" in value or Path(value).is_absolute():
            return value
        return str(base / value)

    config.dataset = resolve(config.dataset)
    for adapter in config.named_adapters.values():
        adapter.dataset = resolve(adapter.dataset)
        adapter.eval_dataset = resolve(adapter.eval_dataset)
    if config.base_model.startswith(("./", "../")):
        config.base_model = str(base / config.base_model)
    return config
