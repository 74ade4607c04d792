"""Ludwig's whole LLM config schema: every key is honoured or accepted with one warning line; only keys
Ludwig's schema lacks are errors (with the closest key); config-only rules are refused at validate time."""

from __future__ import annotations

import copy
import logging

import pytest
import yaml

from madapt.cli import main
from madapt.config import ADAPTER_TYPE_KEYS, ConfigError, data_problems, load_config, parse_config

FULL_LUDWIG = """
model_type: llm
ludwig_version: "0.11"
base_model: meta-llama/Llama-3.1-8B
trust_remote_code: false
is_multimodal: false
input_features:
  - {name: question, type: text, column: q, active: true, tied: null, proc_column: q_proc,
     preprocessing: {max_sequence_length: 128}, encoder: {type: passthrough}}
output_features:
  - {name: answer, type: text, column: a, reduce_input: null, default_validation_metric: loss,
     dependencies: [], reduce_dependencies: sum, input_size: null, num_classes: null,
     decoder: {type: text_extractor}, preprocessing: {}, loss: {type: next_token_softmax_cross_entropy},
     metrics: []}
preprocessing:
  sample_ratio: 1.0
  sample_size: null
  oversample_minority: null
  undersample_majority: null
  global_max_sequence_length: 512
  split: {type: random, probabilities: [0.8, 0.1, 0.1]}
defaults: {text: {preprocessing: {lowercase: false}}}
hyperopt:
  output_feature: answer
  goal: minimize
  metric: loss
  split: validation
  eval_split: validation
  search_alg: {type: variant_generator}
  executor: {type: ray, num_samples: 2}
  parameters: {trainer.learning_rate: {space: loguniform, lower: 0.0001, upper: 0.01}}
prompt:
  template: "{__task__}: {q}"
  task: "Answer the question"
  retrieval: {type: null, index_name: null, model_name: null, k: 0}
model_parameters:
  rope_scaling: {rope_type: dynamic, factor: 2.0}
  neftune_noise_alpha: 5
generation:
  {max_new_tokens: 64, min_new_tokens: 1, max_length: 512, min_length: 0, early_stopping: false, max_time: 10,
   do_sample: true, num_beams: 1, num_beam_groups: 1, penalty_alpha: 0.0, use_cache: true,
   prompt_lookup_num_tokens: 0, temperature: 0.7, top_k: 50, top_p: 0.9, typical_p: 1.0, epsilon_cutoff: 0.0,
   eta_cutoff: 0.0, diversity_penalty: 0.0, repetition_penalty: 1.1, encoder_repetition_penalty: 1.0,
   length_penalty: 1.0, no_repeat_ngram_size: 0, bad_words_ids: [[13]], force_words_ids: null,
   renormalize_logits: false, forced_bos_token_id: null, forced_eos_token_id: null, remove_invalid_values: false,
   exponential_decay_length_penalty: null, suppress_tokens: null, begin_suppress_tokens: null,
   forced_decoder_ids: null, sequence_bias: null, guidance_scale: null, pad_token_id: null, bos_token_id: null,
   eos_token_id: null}
quantization:
  {backend: bitsandbytes, mode: null, qat: false, bits: 4, llm_int8_threshold: 6.0, llm_int8_has_fp16_weight: false,
   bnb_4bit_compute_dtype: bfloat16, bnb_4bit_use_double_quant: true, bnb_4bit_quant_type: nf4}
adapter:
  type: lora
  r: 16
  alpha: 32
  dropout: 0.1
  bias_type: none
  target_modules: [q_proj, v_proj]
  use_rslora: true
  use_dora: false
  loraplus_lr_ratio: null
  init_lora_weights: gaussian
  eva_config: null
  loftq_config: null
  rank_pattern: {q_proj: 8}
  alpha_pattern: {q_proj: 16}
  layer_replication: null
  pretrained_adapter_weights: null
  postprocessor: {merge_adapter_into_base_model: false, progressbar: false}
dataset: data.jsonl
trainer:
  type: finetune
  learning_rate: 0.0001
  base_learning_rate: 0.0
  learning_rate_scaling: linear
  learning_rate_scheduler:
    {decay: cosine, decay_rate: 0.96, decay_steps: 10000, staircase: false, reduce_on_plateau: 0,
     reduce_on_plateau_patience: 10, reduce_on_plateau_rate: 0.1, warmup_evaluations: 0, warmup_fraction: 0.03,
     reduce_eval_metric: loss, reduce_eval_split: training, t_0: null, t_mult: 1, eta_min: 0.0, max_lr: null,
     pct_start: 0.3, div_factor: 25.0, final_div_factor: 10000.0, inverse_sqrt_warmup_steps: 0,
     polynomial_power: 1.0, polynomial_end_lr: 0.0, wsd_warmup_fraction: 0.1, wsd_stable_fraction: 0.8,
     wsd_decay_fraction: 0.1}
  optimizer: {type: adamw, betas: [0.9, 0.95], eps: 1.0e-08, weight_decay: 0.01, amsgrad: false}
  gradient_clipping: {clipglobalnorm: 1.0, clipnorm: null, clipvalue: null}
  epochs: 3
  train_steps: 100
  eval_steps: null
  steps_per_checkpoint: 50
  checkpoints_per_epoch: 0
  effective_batch_size: auto
  batch_size: 2
  max_batch_size: 1099511627776
  eval_batch_size: 4
  gradient_accumulation_steps: 8
  early_stop: -1  # Ludwig's default 5 is refused on a quantized base (see test_early_stop_needs_...)
  evaluate_training_set: false
  validation_field: answer
  validation_metric: loss
  skip_all_evaluation: false
  enable_profiling: false
  profiler: {wait: 1}
  regularization_type: l2
  regularization_lambda: 0.0
  should_shuffle: true
  increase_batch_size_on_plateau: 0
  increase_batch_size_on_plateau_patience: 5
  increase_batch_size_on_plateau_rate: 2.0
  increase_batch_size_eval_metric: loss
  increase_batch_size_eval_split: training
  bucketing_field: null
  use_mixed_precision: false
  compile: false
  enable_gradient_checkpointing: true
  layers_to_freeze_regex: null
  loss_balancing: none
  model_soup: null
backend:
  type: ray
  cache_dir: /tmp/cache
  processor: {type: dask}
  loader: {fully_executed: true}
  preprocessor_kwargs: {}
  trainer: {strategy: ddp, num_workers: 2, use_gpu: true, resources_per_worker: {CPU: 4, GPU: 1}, nics: null}
"""
"""Written for this test from Ludwig's schema sources: every section and most keys of the LLM config."""


def full() -> dict:
    return yaml.safe_load(FULL_LUDWIG)


def problems_of(doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    return caught.value.problems


def test_every_ludwig_key_is_accepted_and_honoured_keys_take_effect(caplog):
    caplog.set_level(logging.WARNING, logger="madapt.config")
    config = parse_config(full())
    assert config.input_column == "q" and config.output_column == "a"  # feature `column`
    assert config.trainer.max_steps == 100  # train_steps
    assert config.trainer.max_length == 512  # global_max_sequence_length
    assert config.trainer.eval_fraction == pytest.approx(0.2)  # 1 - train share of the random split
    assert config.trainer.optimizer.params() == {
        "amsgrad": False,
        "betas": (0.9, 0.95),
        "eps": 1e-08,
        "weight_decay": 0.01,
    }
    assert config.trainer.learning_rate_scheduler.decay == "cosine"
    assert config.trainer.enable_gradient_checkpointing is True
    assert config.generation.kwargs()["temperature"] == 0.7
    assert config.quantization.bnb_options()["bnb_4bit_compute_dtype"] == "bfloat16"
    adapter = config.adapter
    assert (adapter.use_rslora, adapter.init_lora_weights, adapter.rank_pattern) == (True, "gaussian", {"q_proj": 8})
    # Ignored Ludwig keys: one line each, naming the key's path and what madapt does instead.
    assert (config.trainer.early_stop, config.trainer.eval_batch_size, config.trainer.steps_per_checkpoint) == (
        -1,
        4,
        50,
    )
    for key in ("trainer.eval_steps", "hyperopt", "model_parameters", "adapter.postprocessor", "backend.cache_dir"):
        assert key in config.notes, key
    assert "trainer.learning_rate_scheduler.reduce_on_plateau" in config.notes
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(config.notes) == len(set(lines))
    assert any("trainer.eval_steps: madapt evaluates the held-out loss only" in line for line in lines)
    for honoured in (
        "trainer.batch_size",
        "trainer.early_stop",
        "trainer.eval_batch_size",
        "trainer.steps_per_checkpoint",
    ):
        assert honoured not in config.notes  # honoured keys are silent


def test_early_stop_needs_heldout_data_and_an_unquantized_base():
    quantized = full()
    quantized["trainer"]["early_stop"] = 5
    (problem,) = [p for p in problems_of(quantized) if p.startswith("trainer.early_stop")]
    assert "quantized base" in problem and "early_stop: -1" in problem
    # held-out data is data: the config validates, training without held-out rows is refused before it starts
    doc = {"base_model": "x", "adapter": {}, "dataset": "d.csv", "trainer": {"early_stop": 3, "eval_fraction": 0}}
    config = parse_config(doc)
    assert data_problems(config, ["default"]) == [
        "trainer.early_stop: adapter 'default' has no held-out data to watch; give --eval-dataset, "
        "adapter.eval_dataset or trainer.eval_fraction > 0"
    ]
    assert data_problems(config, ["default"], given_eval=["default"]) == []  # --eval-dataset brings them
    doc["adapter"]["eval_dataset"] = "held_out.csv"
    assert data_problems(parse_config(doc), ["default"]) == []
    auto = parse_config({**doc, "trainer": {"eval_batch_size": "auto", "batch_size": 2}})
    assert auto.trainer.held_out_batch_size == 2 and "trainer.eval_batch_size" in auto.notes


def test_multi_adapter_form_accepts_ludwig_keys_per_adapter():
    doc = full()
    adapter = doc.pop("adapter")
    doc["adapters"] = {"adapters": {"a": adapter, "b": {**adapter, "r": 8}}, "active": "a"}
    config = parse_config(doc)
    assert "adapters.adapters.b.postprocessor" in config.notes
    assert config.named_adapters["b"].use_rslora


def test_unknown_keys_are_errors_with_a_suggestion():
    doc = full()
    doc["trainer"]["learnig_rate"] = 0.1
    doc["adapter"]["lora_alpha"] = 3
    doc["generation"]["temprature"] = 1.0
    doc["preprocessing"]["split"]["probabilites"] = [1, 0, 0]
    doc["bogus_section"] = {}
    found = problems_of(doc)
    assert (
        "trainer.learnig_rate: unknown key (not part of Ludwig's LLM config schema; did you mean 'learning_rate'?)"
        in found
    )
    assert any(p.startswith("adapter.lora_alpha: unknown key") and "'alpha'" in p for p in found)
    assert any(p.startswith("generation.temprature: unknown key") and "'temperature'" in p for p in found)
    assert any(p.startswith("preprocessing.split.probabilites: unknown key") for p in found)
    assert any(p.startswith("bogus_section: unknown key") for p in found)


@pytest.mark.parametrize("kind", sorted(set(ADAPTER_TYPE_KEYS) - {"lora"}))
def test_every_other_adapter_type_of_ludwig_is_accepted(kind):
    config = parse_config({"base_model": "x", "adapter": {"type": kind, "target_modules": ["q_proj"]}})
    assert config.adapter is not None and config.adapter.type == kind and config.notes == {}


def test_other_adapter_type_keeps_its_own_keys():
    config = parse_config({"base_model": "x", "adapter": {"type": "oft", "oft_block_size": 4, "coft": True}})
    assert config.adapter is not None
    assert config.adapter.type_options == {"oft_block_size": 4, "coft": True}


@pytest.mark.parametrize("init", ["loftq", "orthogonal"])
def test_base_changing_inits_are_refused_with_the_reason(init):
    (problem,) = problems_of({"base_model": "x", "adapter": {"init_lora_weights": init}})
    assert problem.startswith(f"adapter.init_lora_weights: {init!r} is refused:")
    assert "original base" in problem


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"type": "grpo"}, "trainer.type: trainer type 'grpo' is not run by madapt yet"),
        ({"optimizer": {"type": "lion"}}, "trainer.optimizer.type: optimizer 'lion' is not run by madapt yet"),
        ({"optimizer": {"type": "adamw", "momentum": 0.9}}, "trainer.optimizer.momentum: not a parameter of 'adamw'"),
        ({"optimizer": {"type": "adamm"}}, "unknown optimizer 'adamm'; did you mean 'adam'"),
        ({"learning_rate_scheduler": {"decay": "wsd"}}, "decay: 'wsd' is not run by madapt yet"),
        ({"train_steps": 5, "max_steps": 6}, "trainer.train_steps: disagrees with trainer.max_steps"),
    ],
)
def test_trainer_rules(trainer, message):
    found = problems_of({"base_model": "x", "adapter": {}, "dataset": "d.jsonl", "trainer": trainer})
    assert any(message in p for p in found), found


def test_auto_values_fall_back_to_madapt_defaults_with_a_note():
    config = parse_config({"base_model": "x", "adapter": {}, "dataset": "d.csv", "trainer": {"batch_size": "auto"}})
    assert config.trainer.batch_size == 4
    assert "'auto'" in config.notes["trainer.batch_size"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"template": "Q: {"}, "prompt.template: broken placeholder"),
        ({"template": "Q: {response}"}, "prompt.template: {response} is the output feature's column"),
        ({"template": "Q: {} {0}"}, "prompt.template: {} names no column"),
        ({"template": "Q: {row.text}"}, "prompt.template: {row.text} names no column"),
        ({"template": "Q: {prompt}", "task": "t"}, "the template must contain {__task__}"),
        ({"template": "{__task__} only", "task": "t"}, "must contain {__sample__} or at least one dataset column"),
        ({"template": "{__context__} {prompt}"}, "{__context__} needs prompt.retrieval"),
    ],
)
def test_template_rules(prompt, message):
    found = problems_of({"base_model": "x", "adapter": {}, "prompt": prompt})
    assert any(p.startswith(message) or message in p for p in found), found


def test_template_placeholders_are_dataset_columns_not_input_features():
    """Ludwig's rule: {instruction} and {input} are columns of the data, whichever the input feature is."""
    template = "### Instruction: {instruction}\n### Input: {input}\n### Response:"
    config = parse_config({"base_model": "x", "adapter": {}, "prompt": {"template": template}})
    assert config.prompt.template == template


def test_config_only_rules_all_reported_at_once_with_paths():
    doc = {
        "base_model": "x",
        "adapters": {"adapters": {"a": {"type": "ia3"}, "b": {"dataset": "b.jsonl"}}},
        "trainer": {"epochs": 1},
        "quantization": {"bits": 4},
        "backend": {"trainer": {"num_workers": 2}},
        "prompt": {"template": "{response}"},
        "preprocessing": {"split": {"probabilities": [0.5, 0.6, 0.1]}},
    }
    found = problems_of(doc)
    assert any(p.startswith("preprocessing.split.probabilities:") for p in found), found
    doc["preprocessing"]["split"]["probabilities"] = [0.5, 0.4, 0.1]
    found = problems_of(doc)
    expected = [
        "adapters.adapters.a.type: madapt trains ia3 adapters on an unquantised base only",
        "backend.trainer.strategy: 'fsdp' cannot shard 4-bit quantised weights",
        "prompt.template: {response} is the output feature's column",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)
    assert not any(".dataset" in p for p in found)  # data comes at train time


def test_strategy_as_a_string_or_a_dict():
    base = {"base_model": "x", "adapter": {}}
    deepspeed = {
        "type": "deepspeed",
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "bf16": {"enabled": True},
    }
    trainer = parse_config({**base, "backend": {"trainer": {"strategy": deepspeed}}}).backend.trainer
    assert (trainer.strategy, trainer.deepspeed_stage) == ("deepspeed", 3)
    assert trainer.deepspeed_config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert trainer.deepspeed_config["bf16"] == {"enabled": True}
    config = parse_config({**base, "backend": {"trainer": {"strategy": {"type": "fsdp", "cpu_offload": True}}}})
    assert config.backend.trainer.strategy == "fsdp"
    assert "cpu_offload" in config.notes["backend.trainer.strategy"]
    assert (
        parse_config({**base, "backend": {"trainer": {"strategy": "deepspeed"}}}).backend.trainer.deepspeed_stage == 2
    )
    assert parse_config({**base, "backend": "local"}).backend.type == "local"


def test_deepspeed_dict_reaches_the_deepspeed_config(tmp_path):
    from madapt.train.settings import settings_for
    from madapt.train.spec import RunSpec
    from madapt.train.strategies import deepspeed_config

    doc = {
        "base_model": "x",
        "adapter": {},
        "trainer": {"gradient_clipping": {"clipglobalnorm": 0.3}, "batch_size": 2},
        "dataset": "d.csv",
        "backend": {
            "trainer": {
                "strategy": {
                    "type": "deepspeed",
                    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                }
            }
        },
    }
    config = parse_config(doc)
    trainer = config.backend.trainer
    spec = RunSpec(
        name="a", base_model="x", trust_remote_code=False, quantization_bits=None, adapter={}, columns={},
        eval_fraction=0.1, settings=settings_for(config.trainer, 10), strategy=trainer.strategy,
        deepspeed_stage=trainer.deepspeed_stage, checkpoint_every=5, use_gpu=False, fail_at_step=None,
        deepspeed_extra=dict(trainer.deepspeed_config),
    )  # fmt: skip
    ds = deepspeed_config(spec)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert (ds["gradient_clipping"], ds["train_micro_batch_size_per_gpu"]) == (0.3, 2)


def test_quantization_fields_reach_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    import torch

    from madapt.models import bnb_config

    quantization = {
        "bits": 4,
        "llm_int8_threshold": 5.0,
        "bnb_4bit_compute_dtype": "float16",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_quant_type": "fp4",
    }
    config = parse_config({"base_model": "x", "adapter": {}, "quantization": quantization})
    bnb = bnb_config(config.quantization.bits, torch.float32, **config.quantization.bnb_options())
    assert bnb.load_in_4bit and not bnb.load_in_8bit
    assert (bnb.llm_int8_threshold, bnb.bnb_4bit_compute_dtype) == (5.0, torch.float16)
    assert (bnb.bnb_4bit_use_double_quant, bnb.bnb_4bit_quant_type) == (False, "fp4")
    eight = parse_config(
        {"base_model": "x", "adapter": {}, "quantization": {"bits": 8, "llm_int8_has_fp16_weight": True}}
    )
    bnb = bnb_config(8, torch.float32, **eight.quantization.bnb_options())
    assert bnb.load_in_8bit and bnb.llm_int8_has_fp16_weight
    assert bnb_config(4, torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16  # default: the load dtype
    (problem,) = problems_of({"base_model": "x", "adapter": {}, "quantization": {"backend": "torchao"}})
    assert "bitsandbytes only" in problem


def test_alias_bomb_is_refused_quickly(tmp_path, monkeypatch):
    monkeypatch.setattr("madapt.config.load.MAX_DOCUMENT_NODES", 1000)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nbase_model: x\nadapter: {}\n")
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(path)
    wide = tmp_path / "wide.yaml"
    wide.write_text("base_model: x\nadapter: {}\nhyperopt: [" + ", ".join(["1"] * 1001) + "]\n")
    with pytest.raises(ConfigError, match="YAML nodes"):
        load_config(wide)


def test_cli_validate_warns_once_per_ignored_key(tmp_path, capsys, caplog):
    path = tmp_path / "c.yaml"
    doc = {"base_model": "x", "adapter": {}, "dataset": "d.csv", "trainer": {"eval_steps": 3}, "hyperopt": {}}
    path.write_text(yaml.safe_dump(doc))
    with caplog.at_level(logging.WARNING, logger="madapt.config"):
        assert main(["validate", str(path)]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert sum("trainer.eval_steps" in line for line in lines) == 1
    assert sum("hyperopt" in line for line in lines) == 1


def test_ludwig_defaults_do_not_change_madapt_defaults():
    config = parse_config({"base_model": "x", "adapter": {}})
    assert config.notes == {}
    assert (config.trainer.eval_fraction, config.trainer.max_length, config.trainer.gradient_clipping) == (
        0.1,
        256,
        None,
    )
    assert config.generation.kwargs() == {}
    doc = copy.deepcopy(
        {"base_model": "x", "adapter": {}, "preprocessing": {"split": {"type": "fixed", "column": "s"}}}
    )
    config = parse_config(doc)
    assert config.trainer.eval_fraction == 0.1
    assert "fixed split" in config.notes["preprocessing.split.type"]
