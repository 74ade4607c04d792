"""Ludwig trainer/adapter/prompt/generation keys change what madapt does: on the tiny model, local backend."""

from __future__ import annotations

import contextlib
import io
import json
import math
import types
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
import yaml

from madapt.api import Model
from madapt.cli import main
from madapt.config import Config, parse_config
from madapt.data import IGNORE_INDEX, Example, format_prompt, tokenize_example
from madapt.evaluate import heldout_loss
from madapt.lora import add_trainable_adapter, attach
from madapt.models import load_base
from madapt.predict import Predictor
from madapt.splits import load_splits
from madapt.store import AdapterStore, Manifest
from madapt.train.local import train_local
from madapt.train.loop import TorchSteps, Trainer, build_optimizer, micro_batches
from madapt.train.settings import settings_for
from tests.helpers import tensorboard_scalars, tiny_config, write_conflicting_data

ROWS = 8


def document_with(tiny_model, tmp_path, *, adapter=None, **sections) -> dict:
    """A singular-adapter config document on the example coding data, with sections overridden."""
    document = tiny_config(tiny_model, str(tmp_path / "store"))
    del document["adapters"]
    document["adapter"] = {"r": 4, "dropout": 0.0, **(adapter or {})}
    document["dataset"] = tiny_config(tiny_model, "")["adapters"]["adapters"]["coding"]["dataset"]
    for key, value in sections.items():
        document[key] = {**document.get(key, {}), **value}
    return document


def config_with(tiny_model, tmp_path, *, adapter=None, **sections):
    return parse_config(document_with(tiny_model, tmp_path, adapter=adapter, **sections))


def run_steps(tiny_model, config, steps_cls=TorchSteps):
    """Train the singular adapter for its max_steps; return (losses, lr per step, the steps object)."""
    torch.manual_seed(0)
    base = load_base(tiny_model)
    train, _ = load_splits(config, "default")
    rows = [tokenize_example(base.tokenizer, e, config.trainer.max_length) for e in train[:ROWS]]
    settings = settings_for(config.trainer, len(rows))
    model = add_trainable_adapter(
        base.model, config.adapter, "default", quantized=False, gradient_checkpointing=settings.gradient_checkpointing
    )
    steps = steps_cls(build_optimizer(model, settings))
    trainer = Trainer(model, settings, steps=steps)
    result = trainer.run(micro_batches(rows, settings.batch_size, base.tokenizer.pad_token_id, settings.seed))
    return result.losses, steps


class Toy(torch.nn.Module):
    """A one-weight 'model' with the causal-LM call signature: the schedule test runs the real Trainer fast."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids, labels, attention_mask):
        return types.SimpleNamespace(loss=(self.weight * input_ids.float().mean()) ** 2)


class Recording(TorchSteps):
    """Records the learning rate and the gradient norm each optimizer step runs with."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.norms: list[float] = []
        self.lrs: list[float] = []

    def optimizer_step(self) -> None:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        super().optimizer_step()


def expected_lrs(lr, total, warmup, decay):
    out = []
    for step in range(total):
        if step < warmup:
            out.append(lr * step / warmup)
            continue
        after, remaining = step - warmup, total - warmup
        factor = {
            None: 1.0,
            "linear": (remaining - after) / remaining,
            "cosine": (1 + math.cos(math.pi * after / remaining)) / 2,
            "exponential": 0.5 ** (1 + after / 2),
        }[decay]
        out.append(lr * factor)
    return out


@pytest.mark.parametrize("decay", [None, "linear", "cosine", "exponential"])
def test_learning_rate_follows_ludwigs_schedule(tiny_model, tmp_path, decay):
    schedule = {"decay": decay, "warmup_fraction": 0.25, "decay_rate": 0.5, "decay_steps": 2}
    trainer = {"max_steps": 8, "batch_size": 4, "learning_rate": 0.01, "learning_rate_scheduler": schedule}
    settings = settings_for(config_with(tiny_model, tmp_path, trainer=trainer).trainer, 32)
    model = Toy()
    steps = Recording(build_optimizer(model, settings))
    batches = micro_batches([{"input_ids": [1, 2], "labels": [1, 2]}] * 4, 4, 0, 0)
    Trainer(model, settings, steps=steps).run(batches)
    assert steps.lrs == pytest.approx(expected_lrs(0.01, 8, 2, decay))


def test_warmup_evaluations_count_checkpoint_intervals(tiny_model, tmp_path):
    schedule = {"warmup_evaluations": 2}
    trainer = {"max_steps": 8, "learning_rate_scheduler": schedule, "steps_per_checkpoint": 3}
    settings = settings_for(config_with(tiny_model, tmp_path, trainer=trainer).trainer, 100)
    assert settings.warmup_steps == 6
    assert [settings.learning_rate_at(s) for s in (0, 3, 6, 7)] == pytest.approx([0, 0.025, 0.05, 0.05])


def test_optimizer_type_and_params_build_that_optimizer(tiny_model, tmp_path):
    config = config_with(
        tiny_model, tmp_path, trainer={"optimizer": {"type": "sgd", "momentum": 0.9, "nesterov": True}}
    )
    model = add_trainable_adapter(load_base(tiny_model).model, config.adapter, "default", quantized=False)
    optimizer = build_optimizer(model, settings_for(config.trainer, 10))
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["lr"]) == (0.9, True, 0.05)
    config = config_with(
        tiny_model,
        tmp_path,
        trainer={"optimizer": {"type": "adam", "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.1}},
    )
    optimizer = build_optimizer(model, settings_for(config.trainer, 10))
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.Adam
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.9), 1e-6, 0.1)


def test_gradient_clipping_bounds_the_global_norm(tiny_model, tmp_path):
    trainer = {"max_steps": 2, "batch_size": 2, "learning_rate": 0.5}
    _, free = run_steps(tiny_model, config_with(tiny_model, tmp_path, trainer=trainer), Recording)
    clipped_trainer = {**trainer, "gradient_clipping": {"clipglobalnorm": 1e-3}}
    _, clipped = run_steps(tiny_model, config_with(tiny_model, tmp_path, trainer=clipped_trainer), Recording)
    assert max(free.norms) > 1e-2
    assert max(clipped.norms) <= 1e-3 * 1.001


def test_gradient_checkpointing_gives_equal_losses(tiny_model, tmp_path):
    trainer = {"max_steps": 2, "batch_size": 2}
    plain, _ = run_steps(tiny_model, config_with(tiny_model, tmp_path, trainer=trainer))
    trainer["enable_gradient_checkpointing"] = True
    checkpointed, _ = run_steps(tiny_model, config_with(tiny_model, tmp_path, trainer=trainer))
    assert checkpointed == pytest.approx(plain, rel=1e-4)


def test_train_steps_split_and_max_sequence_length_drive_training(tiny_model, tmp_path, store):
    document = tiny_config(tiny_model, str(tmp_path / "store"))
    document["trainer"] = {"batch_size": 8, "train_steps": 2, "learning_rate": 0.05}
    # 56: the longest prompt (52 tokens) still leaves room for an answer; most rows are cut
    document["preprocessing"] = {"global_max_sequence_length": 56, "split": {"probabilities": [0.5, 0.3, 0.2]}}
    short = parse_config(document)
    assert (short.trainer.max_steps, short.trainer.max_length) == (2, 56)
    train, held_out = load_splits(short, "coding")
    default_train, default_held_out = load_splits(config_with(tiny_model, tmp_path), "default")
    assert len(held_out) > len(default_held_out) and len(train) < len(default_train)
    manifest = train_local(short, "coding", store, progress=False)
    assert manifest.metrics["steps"] == 2
    assert manifest.metrics["tokens"] <= 2 * 8 * 56
    assert manifest.metrics["truncated_rows"] > len(train) // 2 and manifest.metrics["truncated_tokens"] > 0


def test_prompt_task_is_formatted_as_ludwig_does(tiny_model, tmp_path):
    config = config_with(tiny_model, tmp_path, prompt={"task": "Answer in Python"})
    train, _ = load_splits(config, "default")
    assert train[0].prompt.startswith("SAMPLE INPUT: ")
    assert train[0].prompt.endswith("USER: Complete the following task: Answer in Python\n\nASSISTANT:\n")
    assert format_prompt({"q": 'say "hi"\nnow'}, input_column="q", template="{__task__} | {__sample__}", task="T") == (
        'T | say \\"hi\\"\\nnow'
    )
    assert format_prompt({"q": "x", "n": "0.25"}, input_column="q", template="{q} {n:.1f}") == "x 0.2"
    templated = config_with(tiny_model, tmp_path, prompt={"task": "Be brief", "template": "{__task__}: {prompt}"})
    assert load_splits(templated, "default")[0][0].prompt.startswith("Be brief: ")


@pytest.mark.parametrize(
    ("adapter", "expected"),
    [
        ({"dropout": 0.2}, {"lora_dropout": 0.2}),
        ({"bias_type": "lora_only"}, {"bias": "lora_only"}),
        ({"bias": "all"}, {"bias": "all"}),
        ({"use_rslora": True}, {"use_rslora": True}),
        ({"use_dora": True}, {"use_dora": True}),
        ({"init_lora_weights": "gaussian"}, {"init_lora_weights": "gaussian"}),
        ({"init_lora_weights": False}, {"init_lora_weights": False}),
        ({"rank_pattern": {"q_proj": 2}}, {"rank_pattern": {"q_proj": 2}}),
    ],
)
def test_adapter_options_reach_peft(tiny_model, tmp_path, base, adapter, expected):
    config = config_with(tiny_model, tmp_path, adapter=adapter)
    model = add_trainable_adapter(base.model, config.adapter, "default", quantized=False)
    try:
        peft_config = model.peft_config["default"]
        for key, value in expected.items():
            assert getattr(peft_config, key) == value
        b = next(p for n, p in model.named_parameters() if "lora_B" in n)
        assert bool(b.abs().sum() > 0) == (adapter.get("init_lora_weights") is False)
        if adapter.get("use_dora"):
            assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    finally:
        model.unload()  # the module-scoped base is shared


def test_generation_section_sets_predict_defaults(tiny_model, tmp_path, store):
    config = config_with(tiny_model, tmp_path, generation={"max_new_tokens": 3, "do_sample": True, "top_k": 1})
    assert config.generation.kwargs() == {"do_sample": True, "max_new_tokens": 3, "top_k": 1}
    base = load_base(tiny_model)
    calls = []
    original = base.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    base.model.generate = spy
    predictor = Predictor(base, store, generation=config.generation.kwargs())
    predictor.generate("hi", "base")
    predictor.generate("hi", "base", max_new_tokens=2)
    assert (calls[0]["max_new_tokens"], calls[0]["do_sample"], calls[0]["top_k"]) == (3, True, 1)
    assert calls[1]["max_new_tokens"] == 2
    Predictor(base, store).generate("hi", "base")
    assert (calls[2]["max_new_tokens"], calls[2]["do_sample"]) == (48, False)
    assert "top_k" not in calls[2]
    # predict formats the input as training formatted rows: prompt.task with Ludwig's template
    tasked = config_with(tiny_model, tmp_path, prompt={"task": "Answer in Python"})
    (prompt,) = Model(tasked).prompts_of(pd.DataFrame({"prompt": ["hi"]}), "prompts")
    Predictor(base, store).generate(prompt, "base", max_new_tokens=1)
    seen = base.tokenizer.decode(calls[3]["input_ids"][0])
    assert "SAMPLE INPUT: hi" in seen and "Complete the following task: Answer in Python" in seen


def test_tokenize_respects_max_length(base):
    row = tokenize_example(base.tokenizer, Example("a prompt", "a long answer " * 20), 48)
    assert len(row["input_ids"]) == len(row["labels"]) == 48 and row["labels"][-1] != IGNORE_INDEX


@dataclass
class Run:
    config: Config
    manifest: Manifest
    eval_batches: list[int]
    """Rows per forward pass of every held-out batch scored during the run."""
    printed: str
    """What `madapt train` printed."""


@pytest.fixture(scope="module")
def early_stopping_runs(tiny_model, tmp_path_factory) -> dict[str, Run]:
    """The same 6-step `madapt train` twice, evaluated every 2 steps on held-out rows whose loss rises after
    step 2: with early_stop 1 (held-out batches of batch_size 8), and with early_stop -1 and eval_batch_size 3."""
    tmp_path = tmp_path_factory.mktemp("early")
    train, heldout = write_conflicting_data(tmp_path)
    trainer = {"max_steps": 6, "steps_per_checkpoint": 2, "batch_size": 8, "learning_rate": 0.05}
    runs = {}
    for name, extra in {"stops": {"early_stop": 1}, "runs_on": {"early_stop": -1, "eval_batch_size": 3}}.items():
        adapter = {"r": 8, "dataset": train, "eval_dataset": heldout}
        document = document_with(tiny_model, tmp_path / name, adapter=adapter, trainer={**trainer, **extra})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document))
        sizes: list[int] = []

        def record(module, args, output, sizes=sizes):
            if type(module).__name__ == "LlamaForCausalLM" and not module.training:
                sizes.append(output.logits.shape[0])

        hook = torch.nn.modules.module.register_module_forward_hook(record)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                assert main(["train", str(path), "--quiet"]) == 0
        finally:
            hook.remove()
        config = parse_config(document)
        runs[name] = Run(config, AdapterStore(config.storage.uri).manifest("default"), sizes, printed.getvalue())
    return runs


def test_early_stop_stops_and_publishes_the_best_checkpoint(early_stopping_runs, tiny_model):
    stopped, full = early_stopping_runs["stops"].manifest, early_stopping_runs["runs_on"].manifest
    # the held-out loss rose from step 2 to 4: one evaluation without improvement stops at step 4 of 6
    evaluated = dict(tensorboard_scalars(full.metrics["run_dir"])["eval/loss"])
    assert sorted(evaluated) == [2, 4, 6] and evaluated[4] > evaluated[2]
    assert stopped.metrics["steps"] == 4 and stopped.metrics["stopped_early_at"] == 4
    assert stopped.metrics["best_step"] == 2
    assert stopped.metrics["best_eval_loss"] == pytest.approx(evaluated[2], rel=1e-5)
    assert stopped.metrics["eval_loss"] == stopped.metrics["best_eval_loss"]
    best = stopped.metrics["best_eval_loss"]
    assert f"  early stop: stopped early at step 4; published step 2 (held-out loss {best:.4f})\n" in (
        early_stopping_runs["stops"].printed
    )
    # the published adapter is step 2's, not step 4's: scored afresh from the store, it gives the best loss
    config = early_stopping_runs["stops"].config
    base = load_base(tiny_model)
    model = attach(base.model, AdapterStore(config.storage.uri).open(stopped.ref)).eval()
    _, heldout = load_splits(config, "default")
    rows = [tokenize_example(base.tokenizer, e, config.trainer.max_length) for e in heldout]
    loss, _ = heldout_loss(model, rows, base.tokenizer.pad_token_id)
    assert loss == pytest.approx(stopped.metrics["best_eval_loss"], rel=1e-5)
    # early_stop -1: every step, the last one published, no best recorded
    assert full.metrics["steps"] == 6 and "best_step" not in full.metrics


def test_eval_batch_size_batches_the_heldout_rows(early_stopping_runs):
    stopped, full = early_stopping_runs["stops"], early_stopping_runs["runs_on"]
    assert stopped.eval_batches == [8, 8]  # 8 held-out rows at steps 2 and 4, in batches of batch_size
    assert full.eval_batches == [3, 3, 2] * 3  # at steps 2, 4 and 6, in batches of eval_batch_size
    # the same held-out loss, however it is batched (both runs are the same training up to step 4)
    early = dict(tensorboard_scalars(stopped.manifest.metrics["run_dir"])["eval/loss"])
    late = dict(tensorboard_scalars(full.manifest.metrics["run_dir"])["eval/loss"])
    assert [early[2], early[4]] == pytest.approx([late[2], late[4]], rel=1e-5)


LUDWIG_README_QLORA = """
# source: ludwig-ai/ludwig@5d19f3e README.md (the QLoRA fine-tuning example, verbatim)
model_type: llm
base_model: meta-llama/Llama-3.1-8B

quantization:
  bits: 4

adapter:
  type: lora

prompt:
  template: |
    ### Instruction: {instruction}
    ### Input: {input}
    ### Response:

input_features:
  - name: prompt
    type: text

output_features:
  - name: output
    type: text

trainer:
  type: finetune
  learning_rate: 0.0001
  batch_size: 1
  gradient_accumulation_steps: 16
  epochs: 3
  learning_rate_scheduler:
    decay: cosine
    warmup_fraction: 0.01

backend:
  type: local
"""


def test_ludwigs_readme_config_takes_its_data_at_train_time(tiny_model, tmp_path, capsys):
    """Its template names {instruction} and {input}, dataset columns that are not its input feature (prompt):
    it validates without data, trains on data with those columns, and a file without one is refused by name."""
    document = yaml.safe_load(LUDWIG_README_QLORA)
    document["base_model"] = tiny_model  # the test's tiny model, unquantised, for one short epoch
    del document["quantization"]
    document["trainer"].update(epochs=1, batch_size=2, gradient_accumulation_steps=1)
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(document))
    rows = [{"instruction": f"Add {i} and 1", "input": f"{i} + 1", "output": str(i + 1)} for i in range(10)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({k: row[k] for k in ("instruction", "output")}) + "\n" for row in rows))

    assert main(["validate", str(config)]) == 0
    assert "madapt train will need --dataset FILE" in capsys.readouterr().err
    assert main(["validate", str(config), "--dataset", str(data)]) == 0
    assert "10 example(s)" in capsys.readouterr().err
    assert main(["validate", str(config), "--dataset", str(short)]) == 2
    assert "missing column(s) ['input'] that the prompt needs" in capsys.readouterr().err
    assert main(["train", str(config), "--quiet"]) == 2
    assert "adapter 'default' has no training data" in capsys.readouterr().err
    assert main(["train", str(config), "--dataset", str(short), "--quiet"]) == 2
    assert f"{short}: missing column(s) ['input']" in capsys.readouterr().err

    assert main(["train", str(config), "--dataset", str(data), "--quiet"]) == 0
    assert "published default@1" in capsys.readouterr().out
    train, _ = load_splits(parse_config(document), "default", str(data))
    assert train[0].prompt.startswith("### Instruction: Add ") and "\n### Input: " in train[0].prompt

    assert main(["predict", str(config), "--dataset", str(data), "--max-tokens", "2"]) == 0
    assert main(["predict", str(config), "What is 2 + 1?"]) == 2  # a bare prompt fills no {instruction}
    assert "missing column(s) ['instruction', 'input']" in capsys.readouterr().err
