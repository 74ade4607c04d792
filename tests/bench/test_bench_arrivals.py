"""`madapt bench arrivals` end to end at tiny sizes (seconds): its report, table and chart."""

from __future__ import annotations

import json

from madapt.bench.arrivals import main


def test_bench_arrivals_smoke(tiny_model, tmp_path):
    argv = ["--base", tiny_model, "--rates", "50", "--requests", "4", "--adapters", "1", "--new-tokens", "2,4"]
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
    for name in ("continuous", "static", "peft"):
        run = rate[name]
        assert run["tok_per_s"] > 0 and 0 < run["ttft_p50_s"] <= run["ttft_p99_s"] <= run["e2e_p99_s"]
    for name in ("continuous", "static"):
        probe = report["probes"][name]
        assert probe["short_vs_streams"] == probe["short_s"] / probe["streams_s"]
    assert rate["ttft_p99_vs_static"] == rate["continuous"]["ttft_p99_s"] / rate["static"]["ttft_p99_s"]
    assert rate["tok_per_s_vs_peft"] == rate["continuous"]["tok_per_s"] / rate["peft"]["tok_per_s"]
    table = (tmp_path / "arrivals.md").read_text()
    assert "| 50 | continuous |" in table and "| 50 | peft |" in table
    assert (tmp_path / "arrivals.png").stat().st_size > 1000


def test_peft_baseline_answers_as_madapt(tiny_model, store, base):
    """The PEFT batcher is a fair baseline: its greedy tokens per row (base and adapter rows in one batch)
    are madapt's engine's."""
    from madapt.bench.arrivals import peft_engine
    from madapt.lora import publish_random
    from madapt.serve.args import ServeArgs
    from madapt.serve.engine import Row
    from madapt.serve.loading import load_engine
    from madapt.serve.multilora import BASE_SLOT, adapter_matrices

    publish_random(store, base, "noisy", seed=3)
    _, engine = load_engine(ServeArgs(base_model=tiny_model, store=store.uri, device="cpu"))
    stored = store.open("noisy")
    slots = [BASE_SLOT, engine.lora.load(adapter_matrices("noisy", stored.config, stored.tensors))]
    peft = peft_engine(tiny_model, store, ["noisy"], slots)
    prompts = [[5, 9, 2, 7], [11, 3], [5, 9, 2, 7]]

    def rows() -> list[Row]:
        return [
            Row(prompt_ids=p, slot=s, max_tokens=n)
            for p, s, n in zip(prompts, [0, slots[1], slots[1]], [6, 3, 6], strict=True)
        ]

    ours, theirs = engine.generate(rows()), peft.generate(rows())
    assert [r.ids for r in theirs] == [r.ids for r in ours]
    assert len(theirs[1].ids) <= 3
    assert theirs[0].ids != theirs[2].ids  # the adapter row ran with its adapter
