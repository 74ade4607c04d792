"""LLM configs copied verbatim from Ludwig's repository (tests/config/ludwig_corpus/, each naming its source):
every one validates without a dataset, or is refused with madapt's own sentences, each naming the YAML key,
what madapt does instead and why; never pydantic's raw wording."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from madapt.config import (
    AdaptersConfig,
    Config,
    ConfigError,
    Decoder,
    Feature,
    GenerationConfig,
    GradientClippingConfig,
    LoraAdapterConfig,
    LRSchedulerConfig,
    MergeConfig,
    OptimizerConfig,
    OutputFeature,
    PreprocessingConfig,
    PromptConfig,
    QuantizationConfig,
    SplitConfig,
    Strict,
    TrainerConfig,
    load_config,
)

CORPUS = Path(__file__).parent / "ludwig_corpus"
VALID = "valid"
NO_ADAPTER = "adapters: declare an adapter"
CATEGORY_OUTPUT = "output_features[0].type: 'category' output feature: madapt's answer is the generated text"
CATEGORY_DECODER = "output_features[0].decoder.type: decoder 'category_extractor': madapt decodes with text_extractor"

EXPECTED = {
    "alignment_dpo": VALID,
    "alignment_grpo": "trainer.type: trainer type 'grpo' is not run by madapt yet",
    "alignment_kto": VALID,
    "alignment_orpo": VALID,
    "alpaca_ray_deepspeed": VALID,
    "check_grpo_category_output": CATEGORY_OUTPUT,
    "check_qlora_without_adapter": NO_ADAPTER,
    "check_retrieval_none": NO_ADAPTER,
    "check_retrieval_random": NO_ADAPTER,
    "check_retrieval_semantic": NO_ADAPTER,
    "check_two_input_features": "input_features: madapt's LLM takes exactly one input feature",
    "few_shot_semantic_retrieval": CATEGORY_DECODER,
    "llama2_7b_4bit": VALID,
    "llm_adalora_modified_defaults": VALID,
    "llm_batch_size_tuning": VALID,
    "llm_few_shot_classification": CATEGORY_OUTPUT,
    "llm_gradient_checkpointing": VALID,
    "llm_ia3_modified_defaults": VALID,
    "llm_lora_merged": VALID,
    "llm_lora_modified_defaults": VALID,
    "llm_lora_rslora_dora": VALID,
    "llm_lora_target_modules": VALID,
    "llm_multi_adapter_ties_merge": VALID,
    "llm_pretrained_adapter_weights": VALID,
    "llm_qat_torchao": "quantization.backend: madapt quantises with bitsandbytes only",
    "llm_qlora_8bit": VALID,
    "llm_rope_scaling": NO_ADAPTER,
    # Ludwig's test helper gives the text_extractor a generator's vocab_size/max_len, which Ludwig drops
    "llm_text_to_text": "output_features[0].decoder.vocab_size: unknown key",
    "llm_zero_shot_classification": CATEGORY_DECODER,
    "peft_corda": VALID,  # no backend named: local, as in Ludwig
    "peft_eva": VALID,  # no backend named: local, as in Ludwig
    "peft_example_adalora": VALID,
    "peft_example_dora": VALID,
    "peft_example_hra": VALID,
    "peft_example_ia3": VALID,
    "peft_example_vera": VALID,
    "peft_ln_tuning": VALID,
    "peft_loftq": "adapter.init_lora_weights: 'loftq' is refused",
    "peft_oft": VALID,
    "peft_pissa": VALID,  # no backend named: local, as in Ludwig
    "peft_tinylora": VALID,
    "peft_vblora": VALID,
    "phi2_dequantization": "trainer.type: trainer type 'none' is not run by madapt yet",
    "readme_alpaca_qlora": VALID,
    "readme_kr_alpaca_qlora": VALID,
    "readme_llama31_lora": VALID,
    "regex_freezing": VALID,
    # not a key of Ludwig's schema either (Ludwig drops it with a warning, so the example is unconstrained)
    "structured_constrained": "output_features[0].decoder.regex: unknown key",
    "structured_json_schema": NO_ADAPTER,
    "structured_logits": NO_ADAPTER,
    "structured_unconstrained": NO_ADAPTER,
    "text_generation_qa": NO_ADAPTER,
    "vlm_qwen2": "input_features: madapt's LLM takes exactly one input feature",
    "zero_shot_category": CATEGORY_DECODER,
}
PYDANTIC_WORDING = (
    "Input should be",
    "List should have at most",
    "Field required",
    "Extra inputs are not permitted",
    "validation error",
)
YAML_PATH = re.compile(r"^[A-Za-z_][\w.\[\]]*(, [A-Za-z_][\w.\[\]]*)*: \S")
SOURCE = re.compile(r"^# source: ludwig-ai/ludwig@[0-9a-f]{7,40} \S+(:\d+)?$")


def test_the_corpus_is_the_table():
    files = sorted(p.stem for p in CORPUS.glob("*.yaml"))
    assert files == sorted(EXPECTED)
    assert len(files) >= 30


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ludwig_config_validates_or_is_refused_with_reasons(name, caplog):
    path = CORPUS / f"{name}.yaml"
    assert SOURCE.match(path.read_text(encoding="utf-8").splitlines()[0])
    expected = EXPECTED[name]
    with caplog.at_level(logging.WARNING):
        try:
            load_config(path)
        except ConfigError as error:
            problems = error.problems
        else:
            problems = []
    if expected == VALID:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems
    for problem in problems:
        assert YAML_PATH.match(problem), problem
        assert not any(words in problem for words in PYDANTIC_WORDING), problem


LUDWIG_KEYS = CORPUS / "ludwig_llm_keys.txt"
"""Generated by scripts/ludwig_llm_keys.py from Ludwig's schema source (its header names the commit)."""
SECTION_MODELS: dict[str, type[Strict]] = {
    ".": Config,
    "input_features[]": Feature,
    "output_features[]": OutputFeature,
    "output_features[].decoder": Decoder,
    "preprocessing": PreprocessingConfig,
    "preprocessing.split": SplitConfig,
    "prompt": PromptConfig,
    "generation": GenerationConfig,
    "quantization": QuantizationConfig,
    "adapters": AdaptersConfig,
    "adapters.merge": MergeConfig,
    "trainer": TrainerConfig,
    "trainer.learning_rate_scheduler": LRSchedulerConfig,
    "trainer.gradient_clipping": GradientClippingConfig,
    "trainer.optimizer": OptimizerConfig,
    "adapter": LoraAdapterConfig,
}


def ludwig_keys() -> list[tuple[str, str | None, str]]:
    """(section, registered type or None, key) for every line of the generated list."""
    rows = []
    for line in LUDWIG_KEYS.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        section, key = line.split()
        kind = None
        if section.endswith("]") and not section.endswith("[]"):
            section, kind = section[:-1].split("[")
        rows.append((section, kind, key))
    return rows


def test_every_key_of_ludwigs_llm_schema_is_known_to_madapt():
    """Each key is a field, a Ludwig key accepted with a note, or a type's own key; never 'unknown key'."""
    rows = ludwig_keys()
    assert len(rows) > 500 and {s for s, _, _ in rows} == set(SECTION_MODELS)
    unknown = []
    for section, kind, key in rows:
        model = SECTION_MODELS[section]
        data = {"type": kind, key: None} if kind else {key: None}
        known = key in model.model_fields or key in model.ignored_keys(data) or key in model.passed_keys(data)
        if not known:
            unknown.append(f"{section}{f'[{kind}]' if kind else ''}.{key}")
    assert unknown == []
