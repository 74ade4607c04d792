"""Config sections about the text: the input and output features, the prompt, generation defaults and the
held-out split (`preprocessing`)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from madapt.config.ludwig import Strict


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
        if schema is None:  # before the import: llguidance loads only for a schema
            return None
        from madapt.json_grammar import schema_problem  # llguidance, as serving compiles it

        problem = schema_problem(schema)
        if problem:
            raise ValueError(f"this JSON Schema cannot be enforced when serving: {problem}")
        return schema


class OutputFeature(Feature):
    decoder: Decoder | None = None
    ludwig_ignored: ClassVar[dict[str, str]] = {k: v for k, v in Feature.ludwig_ignored.items() if k != "decoder"}


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
