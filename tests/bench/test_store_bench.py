"""`madapt bench store --small`: local and loopback-S3 timings from one run, and resolution before and after
the TTL cache, written as JSON, markdown and a chart (the 8B-shaped numbers are in benchmarks/results)."""

from __future__ import annotations

import json
import os

from madapt.cli import main


def test_bench_store_small_writes_its_report(tmp_path):
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    assert main(["bench", "store", "--small", "--repeat", "1", "--requests", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "store-small.json").read_text())
    for where in ("local", "s3"):
        for op in ("publish", "open"):
            assert report[where][op]["median_s"] > 0 and report[where][op]["mb_per_s"] > 0
        resolve = report[where]["resolve"]
        assert resolve["uncached"]["store_reads_per_request"] == 1  # every request reads the store
        assert resolve["cached"]["store_reads_per_request"] == 0 and resolve["cached"]["requests"] == 200
    assert set(report["s3_over_local"]) == {"publish", "open", "resolve_uncached", "resolve_cached"}
    assert "| publish |" in (tmp_path / "store-small.md").read_text()
    assert (tmp_path / "store-small.png").stat().st_size > 0
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint  # the bench's S3 environment does not leak out
