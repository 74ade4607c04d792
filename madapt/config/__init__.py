"""The madapt YAML config: a Ludwig-compatible LLM config, validated once at load.

Every rule lives in this package and every error names its YAML path: `load_config` reports all problems
in a file together as one `ConfigError`, so a user fixes a config in one pass. The modules, lowest first:

- names.py: adapter names (`check_adapter_name`) and closed sets (combination types, strategies).
- paths.py: madapt's home, the model cache and `locate_base_model`.
- errors.py: `ConfigError` and the formatter of pydantic's errors into 'yaml.path: message' lines.
- merge_rules.py: the merge rules the schema and the merge actor share.
- ludwig.py: `Strict`, every section's base, and the triage of Ludwig keys in the raw document.
- features.py, trainer.py, adapters.py, backend.py: the typed sections; schema.py: `Config`, their root.
- rules.py: every rule that needs only the config, beyond the sections' types.
- load.py: `parse_config` and `load_config`.

What it may import: the standard library, pydantic, PyYAML, madapt.errors and madapt.adapter_types (which
imports PEFT only inside the functions that build a PEFT config). Nothing from training, serving or the
store; torch, transformers, PEFT and Ray are not loaded by `import madapt.config`, only by rules that a
config's contents call for (another adapter type than lora, eva_config, a json_schema to enforce).
"""

from madapt.config.adapters import (
    ADAPTER_TYPE_KEYS,
    AdaptersConfig,
    EnsembleConfig,
    LoraAdapterConfig,
    MergeConfig,
)
from madapt.config.backend import (
    BackendConfig,
    MlflowConfig,
    RayTrainerConfig,
    StorageConfig,
    TrackingConfig,
    WandbConfig,
)
from madapt.config.errors import ConfigError, format_validation_error
from madapt.config.features import (
    DEFAULT_TASK_TEMPLATE,
    Decoder,
    Feature,
    GenerationConfig,
    OutputFeature,
    PreprocessingConfig,
    PromptConfig,
    SplitConfig,
)
from madapt.config.load import load_config, parse_config
from madapt.config.ludwig import Strict
from madapt.config.merge_rules import merge_problems, merge_type_problems
from madapt.config.names import (
    ADAPTER_NAME,
    COMBINATION_TYPES,
    DENSITY_TYPES,
    MAX_ENSEMBLE_MEMBERS,
    SINGLE_ADAPTER_NAME,
    CombinationType,
    InvalidName,
    MajoritySignMethod,
    Strategy,
    check_adapter_name,
    member_name,
)
from madapt.config.paths import EMBEDDED_MODELS, locate_base_model, madapt_home, model_cache
from madapt.config.rules import data_problems, qlora_strategy_problems, report_problems
from madapt.config.schema import Config
from madapt.config.trainer import (
    TORCH_OPTIMIZERS,
    GradientClippingConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    QuantizationConfig,
    TrainerConfig,
)

__all__ = [
    "ADAPTER_NAME",
    "ADAPTER_TYPE_KEYS",
    "COMBINATION_TYPES",
    "DEFAULT_TASK_TEMPLATE",
    "DENSITY_TYPES",
    "EMBEDDED_MODELS",
    "MAX_ENSEMBLE_MEMBERS",
    "SINGLE_ADAPTER_NAME",
    "TORCH_OPTIMIZERS",
    "AdaptersConfig",
    "BackendConfig",
    "CombinationType",
    "Config",
    "ConfigError",
    "Decoder",
    "EnsembleConfig",
    "Feature",
    "GenerationConfig",
    "GradientClippingConfig",
    "InvalidName",
    "LRSchedulerConfig",
    "LoraAdapterConfig",
    "MajoritySignMethod",
    "MergeConfig",
    "MlflowConfig",
    "OptimizerConfig",
    "OutputFeature",
    "PreprocessingConfig",
    "PromptConfig",
    "QuantizationConfig",
    "RayTrainerConfig",
    "SplitConfig",
    "StorageConfig",
    "Strategy",
    "Strict",
    "TrackingConfig",
    "TrainerConfig",
    "WandbConfig",
    "check_adapter_name",
    "data_problems",
    "format_validation_error",
    "load_config",
    "locate_base_model",
    "madapt_home",
    "member_name",
    "merge_problems",
    "merge_type_problems",
    "model_cache",
    "parse_config",
    "qlora_strategy_problems",
    "report_problems",
]
