"""`madapt bench load` on the shared Ray cluster: 8 adapters on the tiny model over HTTP, then one of two
replicas SIGKILLed under load. CI runs the short version; `-m slow` runs the issue's 2,000 requests at
concurrency 32 (the figures in the README come from `madapt bench load --kill`)."""

from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest

from madapt.bench.load import main

pytestmark = pytest.mark.ray


def run(serve_url: str, tmp_path, *argv: str) -> dict:
    port = str(urlparse(serve_url).port)
    code = main([*argv, "--adapters", "8", "--kill", "--port", port, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "load.json").read_text())
    assert (tmp_path / "load.md").read_text().count("|") > 20 and (tmp_path / "load.png").stat().st_size > 1000
    return {"code": code, **report}


def assert_held(report: dict, requests: int) -> None:
    load, kill = report["load"], report["kill"]
    assert load["counts"] == {"ok": requests, "4xx": 0, "503": 0, "5xx": 0, "dropped": 0}, load["errors"]
    assert load["streamed"] == requests // 4  # every 4th request is an SSE stream, counted OK only at [DONE]
    assert load["latency"]["p99_s"] >= load["latency"]["p50_s"] > 0
    # the kill: in-flight requests may end in a retryable 503, never a 500, a 4xx or a hang
    during = kill["during"]["counts"]
    assert during["5xx"] == during["4xx"] == during["dropped"] == 0, kill["other_errors"]
    assert during["ok"] > 0 and kill["max_s_during"] < 60
    assert all("retry" in error for error in kill["unavailable_errors"])
    assert kill["recovery_s"] is not None and kill["survivors_kept"]
    assert kill["after"]["counts"]["ok"] == kill["after"]["requests"]
    assert report["code"] == 0


@pytest.mark.slow  # ~80 s, mostly the replacement replica's start-up; CI runs it with the 2,000-request one
def test_short_load_and_a_replica_killed_under_load(serve_url, tmp_path):
    report = run(serve_url, tmp_path, "--requests", "200", "--concurrency", "16", "--after-recovery", "50")
    assert_held(report, 200)


@pytest.mark.slow
def test_two_thousand_requests_at_concurrency_32(serve_url, tmp_path):
    report = run(serve_url, tmp_path, "--requests", "2000", "--concurrency", "32")
    assert_held(report, 2000)


@pytest.mark.slow  # ~40 s: a one-replica app and 3 rounds of 16 streams
def test_probes_over_http_a_short_request_does_not_wait_and_hung_up_streams_stop(serve_url, tmp_path):
    """Issue 15's probes through Serve's proxy: a 2-token completion sent while 8 long streams decode is
    not held until they end, and streams whose clients closed the connection stop decoding (a completion
    right after them is not queued behind 8 x 128 tokens). Bounds are loose (a shared 2-core machine); the
    static batcher or a lost disconnect misses them by far (97% and several times)."""
    port = str(urlparse(serve_url).port)
    argv = ["--replicas", "1", "--requests", "16", "--adapters", "2", "--probes", "--probe-repeats", "3"]
    code = main([*argv, "--port", port, "--out", str(tmp_path)])
    probes = json.loads((tmp_path / "load.json").read_text())["probes"]
    assert code == 0 and probes["held"], probes["errors"]
    assert probes["stream_tokens"] > 32  # the streams were long enough to tell
    assert probes["short_vs_streams"] < 0.5
    assert probes["after_hangup_vs_idle"] < 3
    assert "Probes over HTTP" in (tmp_path / "load.md").read_text()
