"""Quality report on the tiny model: exact loss accounting, every model scored on every split, files written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from madapt.data import collate, tokenize_example
from madapt.evaluate import eval_splits, evaluate_config, format_table, heldout_loss, write_report
from madapt.lora import publish_random
from madapt.merge import MergeSpec, merge_and_publish
from madapt.store import AdapterStore


def test_heldout_loss_is_the_models_token_mean_across_batches(base, tiny_cfg):
    examples = eval_splits(tiny_cfg, ["coding"], max_examples=3)["coding"]
    rows = [tokenize_example(base.tokenizer, e, 64) for e in examples]
    batched, tokens = heldout_loss(base.model, rows, base.tokenizer.pad_token_id, batch_size=2)
    one_batch = base.model(**collate(rows, base.tokenizer.pad_token_id))
    assert tokens == sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    assert batched == pytest.approx(one_batch.loss.item(), rel=1e-5)


def test_report_scores_base_sources_and_merge_on_each_split(base, tiny_cfg, tmp_path):
    store = AdapterStore(tiny_cfg.storage.uri)
    publish_random(store, base, "coding", r=8, alpha=16, seed=1)
    publish_random(store, base, "chat", r=4, alpha=8, seed=2)
    merged = merge_and_publish(store, MergeSpec.from_config(tiny_cfg.merge))

    report = evaluate_config(tiny_cfg, base, store, max_examples=4)
    assert report.title == merged.ref == "both@1"
    assert report.models == ["base", "coding@1", "chat@1", "both@1"] and report.splits == ["coding", "chat"]
    assert all(math.isfinite(report.losses[m][s]) for m in report.models for s in report.splits)
    assert report.losses["coding@1"]["coding"] != report.losses["base"]["coding"]  # adapters were applied
    assert not hasattr(base.model, "peft_config")  # the base is handed back bare

    # trainer.eval_batch_size batches the held-out rows (default: batch_size, 8 here); the losses stay
    sizes: list[int] = []

    def record(module, args, output):
        if type(module).__name__ == "LlamaForCausalLM":
            sizes.append(output.logits.shape[0])

    tiny_cfg.trainer.eval_batch_size = 3
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        rebatched = evaluate_config(tiny_cfg, base, store, max_examples=4)
    finally:
        hook.remove()
    assert sizes == [3, 1] * 8  # 4 rows per split, for each of 4 models on 2 splits
    for model in report.models:
        assert rebatched.losses[model] == pytest.approx(report.losses[model], rel=1e-5)

    table = format_table(report)
    assert "both@1" in table and "chat loss" in table
    json_path, png_path = write_report(report, tmp_path / "report")
    assert json.loads(json_path.read_text())["losses"]["both@1"]["chat"] == report.losses["both@1"]["chat"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
