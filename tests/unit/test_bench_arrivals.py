"""`madapt bench arrivals` end to end at tiny sizes (seconds): its report, table and chart."""

from __future__ import annotations

import json

from madapt.bench.arrivals import main


def test_bench_arrivals_smoke(tiny_model, tmp_path):
    argv = ["--base", tiny_model, "--rates", "50", "--requests", "4", "--adapters", "0", "--new-tokens", "2,4"]
    argv += [
        "--prompt-words",
        "2,8",
        "--probe-tokens",
        "6",
        "--probe-repeats",
        "1",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "arrivals.json").read_text())
    (rate,) = report["rates"]
    for name in ("continuous", "static"):
        run = rate[name]
        assert run["tok_per_s"] > 0 and 0 < run["ttft_p50_s"] <= run["ttft_p99_s"] <= run["e2e_p99_s"]
        probe = report["probes"][name]
        assert probe["short_vs_streams"] == probe["short_s"] / probe["streams_s"]
    assert rate["ttft_p99_vs_static"] == rate["continuous"]["ttft_p99_s"] / rate["static"]["ttft_p99_s"]
    assert "| 50 | continuous |" in (tmp_path / "arrivals.md").read_text()
    assert (tmp_path / "arrivals.png").stat().st_size > 1000
