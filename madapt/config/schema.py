"""`Config`, the root of the schema: one typed, validated madapt config. Its sections are in features.py,
trainer.py, adapters.py and backend.py."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr

from madapt.config.adapters import AdaptersConfig, LoraAdapterConfig, MergeConfig
from madapt.config.backend import BackendConfig, StorageConfig, TrackingConfig
from madapt.config.features import Feature, GenerationConfig, OutputFeature, PreprocessingConfig, PromptConfig
from madapt.config.ludwig import Strict
from madapt.config.names import SINGLE_ADAPTER_NAME
from madapt.config.trainer import QuantizationConfig, TrainerConfig


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
