"""Helpers shared by test modules (fixtures live in conftest.py; plain functions and constants live here)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

LUDWIG_EXAMPLE = """
model_type: llm
base_model: meta-llama/Llama-3.1-8B
adapters:
  adapters:
    coding: {type: lora, r: 16, alpha: 32, target_modules: ["q_proj", "v_proj"]}
    chat: {type: lora, r: 8, alpha: 16, target_modules: ["q_proj", "v_proj"]}
  merge:
    name: coding_chat
    sources: [coding, chat]
    weights: [0.7, 0.3]
    combination_type: ties
    density: 0.7
  active: coding_chat
"""
"""The multi-adapter example of Ludwig's documentation, as written there."""


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 1},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
"""A JSON Schema bounded everywhere, so even a random tiny model closes it within a few dozen tokens."""


def ludwig_example() -> dict:
    return yaml.safe_load(LUDWIG_EXAMPLE)


def tiny_config(base_model: str, store_uri: str, **overrides) -> dict:
    """A two-adapter config document on the tiny model and the example data."""
    document = {
        "model_type": "llm",
        "base_model": base_model,
        "adapters": {
            "adapters": {
                "coding": {"r": 8, "alpha": 16, "dataset": str(EXAMPLES / "data" / "coding.jsonl")},
                "chat": {"r": 4, "alpha": 8, "dataset": str(EXAMPLES / "data" / "chat.jsonl")},
            },
            "merge": {"name": "both", "sources": ["coding", "chat"], "combination_type": "ties", "density": 0.7},
        },
        "trainer": {"batch_size": 8, "max_steps": 6, "learning_rate": 0.05, "max_length": 64},
        "storage": {"uri": store_uri},
        "backend": {"type": "local"},
    }
    document.update(overrides)
    return document


def write_conflicting_data(directory: Path) -> tuple[str, str]:
    """Training rows that answer "yes" and held-out rows that answer the same prompts "no": at a high
    learning rate the held-out loss rises after the first steps (what early-stop tests need).
    Returns the two JSONL paths (train, held-out)."""
    paths = directory / "answers_yes.jsonl", directory / "answers_no.jsonl"
    for path, answer, count in zip(paths, ("yes", "no"), (64, 8), strict=True):
        rows = [{"prompt": f"Question {i}?", "response": f"{answer} " * 16} for i in range(count)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(paths[0]), str(paths[1])


def write_foreign_heldout(directory: Path) -> str:
    """Held-out rows in scripts the example data never uses: training on the example data moves probability
    onto English and code, so their loss rises after the first steps. Returns the JSONL path."""
    path = directory / "foreign_heldout.jsonl"
    rows = [{"prompt": f"§{i}", "response": "ЖЖЖ ŽŽŽ " * 6} for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def tensorboard_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run's TensorBoard events hold: tag -> [(step, value)] in logging order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(f"{run_dir}/tensorboard")
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STORE_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["v_proj", "q_proj"]}
"""A small PEFT LoRA config for store tests, which need an adapter but no model."""


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two small LoRA tensors, different for each seed (so tests can tell publishers apart)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 2, generator=g),
    }


def publish(store, name: str = "coding", seed: int = 0, **kwargs):
    """Publish `tensors(seed)` as `name` on base 'tiny' (fingerprint 'fp1')."""
    return store.publish(
        name,
        STORE_CONFIG,
        tensors(seed),
        base_model="tiny",
        base_fingerprint="fp1",
        metrics={"final_loss": 1.5},
        **kwargs,
    )


def decode_joining(engine, rows: list, joins_at: list[int], steps: int):
    """Run `steps` decode steps of one continuous batch that each row joins at its step in `joins_at`;
    returns the batch (rows that have not ended are still in it)."""
    from madapt.serve.engine import DecodeBatch

    batch = DecodeBatch(engine)
    for step in range(steps):
        joining = [r for r, at in zip(rows, joins_at, strict=True) if at == step]
        if joining:
            batch.admit(joining)
        batch.step()
    return batch


def small_llama(**overrides):
    """A 2-layer Llama built in code (seed 0, eval mode): grouped-query attention (4 heads on 2), head dim 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    return LlamaForCausalLM(LlamaConfig(**{**shape, **heads, **overrides})).eval()
