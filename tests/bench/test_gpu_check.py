"""scripts/gpu_check.sh --dry-run: the GPU check's every step on CPU with tiny sizes, so it cannot rot
between the times a GPU is available. Marked `slow` (about 1-2 minutes: its own Ray cluster, two training
runs and a serving benchmark, each step of which `make test` covers on its own); CI runs it with
`make test-slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ray
@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["setup"]["dry_run"] is True
    bf16, qlora = report["train"]
    assert (bf16["run"], qlora["run"]) == ("fp32", "qlora")
    for run in (bf16, qlora):
        assert run["tokens_per_s"] > 0 and run["final_loss"] == run["final_loss"]  # finite, not NaN
    assert qlora["tokens_per_s_vs_bf16"] > 0
    assert report["serve"]["runs"] and (tmp_path / "serve.md").exists()
    assert "| qlora |" in (tmp_path / "gpu.md").read_text()
    quantized = report["quantized_serving"]  # a 4-bit base: every row as PEFT's generate on it (fp32 CPU)
    assert quantized["rows_equal_to_peft"] == quantized["rows"] == 8 and quantized["tokens_per_s"] > 0
