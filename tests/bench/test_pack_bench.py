"""`madapt bench train --pack` without training (the full run takes minutes): its configs are the demo's
shape and validate, the ratios come from one run's rows, and the report and chart are written."""

from __future__ import annotations

import json
import os

from madapt.bench.pack import bench_document, descendants_rss, parse_args, ratios, write_results
from madapt.config import parse_config


def test_k_adapters_cycle_the_demos_two_shapes_and_datasets(tmp_path):
    args = parse_args(["--pack", "--steps", "3"])
    config = parse_config(bench_document(args, 4, tmp_path, "local"))
    adapters = config.named_adapters
    assert list(adapters) == ["coding", "chat", "coding1", "chat1"]
    assert [a.r for a in adapters.values()] == [16, 8, 16, 8]
    assert adapters["chat1"].dataset.endswith("chat.jsonl") and config.trainer.batch_size == 8
    assert config.trainer.max_steps == 3 and config.backend.type == "local"


def test_ratios_and_the_report_come_from_one_runs_rows(tmp_path):
    def row(mode: str, k: int, wall: float, peak: float) -> dict:
        return {"mode": mode, "k": k, "wall_s": wall, "tokens": 100, "tok_per_s": 100 / wall, "peak_rss_gb": peak}

    rows = [row("sequential", 1, 10, 2.0), row("sequential", 2, 20, 2.1), row("packed", 2, 12, 2.4)]
    rows.append(row("parallel", 2, 15, 4.0))
    found = ratios(rows)
    assert found["2"]["speedup_vs_sequential"] == 20 / 12 and found["2"]["speedup_vs_parallel"] == 15 / 12
    assert found["2"]["peak_vs_one_adapter"] == 2.4 / 2.0
    setup = {"date": "today", "machine": "cpu", "model": "m", "steps": 1, "batch_size": 8, "max_length": 16}
    write_results({"setup": setup, "rows": rows, "ratios": found}, tmp_path)
    table = (tmp_path / "train-pack.md").read_text()
    assert "| 2 | 1.67x | 1.25x | 1.20x |" in table and "| packed | 2 | 12.0 | - | 8 | 2.40 |" in table
    assert json.loads((tmp_path / "train-pack.json").read_text())["rows"] == rows
    assert (tmp_path / "train-pack.png").stat().st_size > 0


def test_peak_memory_counts_a_process_and_its_descendants():
    assert descendants_rss([os.getpid()]) > 10e6
