"""`madapt bench arrivals`: a replica's scheduler under open-loop Poisson arrivals, continuous vs static
vs PEFT's mixed batch.

In-process on the engine a replica builds (`madapt.serve.loading`), without HTTP or Serve's routing, so
the figures isolate the scheduler. At each rate, requests arrive at exponential gaps whether or not the
earlier ones finished (open loop), with mixed prompt lengths, answer lengths and adapters (the base
included); each batcher gets the same arrivals. The third batcher is what one would build from PEFT alone:
the static batcher's collection of arrivals, each batch run by PEFT's own mixed-adapter
`generate(adapter_names=...)` on a second copy of the base with the same adapters attached (not streamed:
its first token arrives with its last). Per rate and batcher: time to first token (the first text event)
p50/p99, end-to-end p50/p99, output tokens/s. Then the two probes of issue 15 for madapt's two batchers,
each the median of `--probe-repeats`: a 2-token request arriving while 8 long streams decode (its time over
the streams' time), and a request right after 8 streams hung up over the same request on an idle replica.

`--anchor vllm`: the same arrivals over HTTP to `madapt serve` and to vLLM's OpenAI server instead (`arrivals_http`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import torch

from madapt.bench import save_report
from madapt.bench.poisson import Answer, Request, open_loop, plot_rate_panels, workload
from madapt.bench.vllm_anchor import VENV_PYTHON
from madapt.charts import pyplot

RESULTS = Path("benchmarks/results")
PROBED = ("continuous", "static")
"""The batchers the two probes run on: madapt's (PEFT's mixed batch cannot drop a row that hung up)."""


ANCHOR_DEFAULTS = {"base": "smollm2-135m", "rates": "0.5,1,2,4,8", "threads": 2, "out": str(RESULTS / "vllm")}
"""With --anchor vllm: the model vLLM runs as madapt does, rates from well within to beyond what 2 cores
decode (~26 output tokens a request), the anchor's threads and results folder."""
DEFAULTS = {"base": "tiny", "rates": "2,4,8,16,32", "threads": None, "out": str(RESULTS)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="madapt bench arrivals", description=__doc__.splitlines()[0])
    p.add_argument(
        "--base",
        help="'tiny' (a 2-layer random Llama built here) or any base_model (default: tiny; smollm2-135m with --anchor)",
    )
    p.add_argument("--rates", help="arrival rates to run, requests/s (default: 2,4,8,16,32; 0.5,1,2,4,8 with --anchor)")
    p.add_argument("--requests", type=int, default=48, help="requests per rate and batcher")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs per rate and batcher, the order alternated (mean); --anchor: passes per server",
    )
    p.add_argument("--adapters", type=int, default=4, help="random adapters the requests are spread over (+ base)")
    p.add_argument("--prompt-words", default="4,60", help="prompt length range in words (uniform)")
    p.add_argument("--new-tokens", default="4,48", help="answer length range in tokens (uniform)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--probe-tokens", type=int, default=128, help="length of the 8 long streams of the probes")
    p.add_argument("--probe-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 2 with --anchor, each server)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--anchor",
        choices=["vllm"],
        help="instead: `madapt serve`, then vLLM's OpenAI server, over HTTP on the same arrivals (arrivals_http)",
    )
    p.add_argument("--python", default=str(VENV_PYTHON), help="--anchor: vLLM's venv's python")
    p.add_argument("--preload", action="store_true", help="--anchor: vLLM with LD_PRELOAD of tcmalloc and iomp5")
    p.add_argument("--port", type=int, default=8731, help="--anchor: the servers' port on 127.0.0.1")
    p.add_argument(
        "--out",
        help="directory for arrivals.json, arrivals.md and arrivals.png (default: "
        f"{RESULTS}; {ANCHOR_DEFAULTS['out']} with --anchor)",
    )
    args = p.parse_args(argv)
    for key, value in (ANCHOR_DEFAULTS if args.anchor else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def batcher_answer(batcher: Any) -> Answer:
    """Requests submitted to a batcher in this process as engine rows."""
    from madapt.serve.engine import Row

    async def answer(request: Request, mark: Callable[[], None]) -> int:
        row = Row(prompt_ids=request.prompt_ids, slot=request.slot, max_tokens=request.new_tokens)
        async with aclosing(batcher.submit(row)) as events:
            async for _ in events:
                mark()
        return len(row.ids)

    return answer


async def probes(batcher: Any, prompt_ids: list[int], long_tokens: int) -> dict[str, float]:
    """A 2-token request beside 8 long streams (its e2e / the streams' e2e); a 16-token request after 8
    streams hung up on their first event / the same request on the idle batcher."""
    from madapt.serve.engine import Row

    async def one(tokens: int) -> float:
        started = time.perf_counter()
        async with aclosing(batcher.submit(Row(prompt_ids=prompt_ids, slot=0, max_tokens=tokens))) as events:
            async for _ in events:
                pass
        return time.perf_counter() - started

    idle = await one(16)
    streams = [batcher.submit(Row(prompt_ids=prompt_ids, slot=0, max_tokens=long_tokens)) for _ in range(8)]
    started = time.perf_counter()
    for stream in streams:
        await anext(stream)  # every stream has its first token: all 8 are decoding
    short = await one(2)
    for stream in streams:
        async for _ in stream:
            pass
    streams_s = time.perf_counter() - started
    hung = [batcher.submit(Row(prompt_ids=prompt_ids, slot=0, max_tokens=long_tokens)) for _ in range(8)]
    for stream in hung:
        await anext(stream)
        await stream.aclose()  # the client hangs up: its row is cancelled
    after = await one(16)
    return {"short_s": short, "streams_s": streams_s, "idle_s": idle, "after_hangup_s": after}


class PeftEngine:
    """`Engine.generate`'s part for the static batcher, done by PEFT: one greedy mixed-adapter `generate`
    over the left-padded batch (`adapter_names`, PEFT's "__base__" for the base; with no adapters, the bare
    base's), each row then cut to its own budget and EOS and handed out as one text event."""

    def __init__(self, model: Any, tokenizer: Any, names: dict[int, str]):
        self.model, self.tokenizer, self.names = model, tokenizer, names

    @torch.inference_mode()
    def generate(self, rows: list[Any]) -> list[Any]:
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
        mask = (torch.arange(width) >= torch.tensor([[width - len(r.prompt_ids)] for r in rows])).long()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_tokens for r in rows),
            do_sample=False,
            pad_token_id=pad,
            **({"adapter_names": [self.names[r.slot] for r in rows]} if len(self.names) > 1 else {}),
        )
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos])
        for row, tokens in zip(rows, out[:, width:].tolist(), strict=True):
            ended = next((i for i, t in enumerate(tokens) if t in stops), None)
            row.ids = tokens[: min(row.max_tokens, len(tokens) if ended is None else ended)]
            row.finish_reason = "length" if ended is None or ended >= row.max_tokens else "stop"
            if row.on_text is not None:
                row.on_text(self.tokenizer.decode(row.ids, skip_special_tokens=True))
        return rows


def batchers(engine: Any, peft: PeftEngine, args: argparse.Namespace) -> dict[str, Any]:
    from madapt.serve.scheduler import ContinuousBatcher, StaticBatcher

    return {
        "continuous": ContinuousBatcher(engine, args.max_batch, step_tokens=512),
        "static": StaticBatcher(engine, args.max_batch, wait_s=0.01),
        "peft": StaticBatcher(peft, args.max_batch, wait_s=0.01),  # type: ignore[arg-type]
    }


def peft_engine(base_model: str, store: Any, names: list[str], slots: list[int]) -> PeftEngine:
    """PEFT's mixed batch on its own copy of the base, the same adapters attached under their names."""
    from madapt.lora import attach
    from madapt.models import load_base
    from madapt.serve.multilora import BASE_SLOT

    base = load_base(base_model)
    model = base.model
    for name in names:
        model = attach(model, store.open(name))
    model.eval()
    labels = {BASE_SLOT: "__base__", **dict(zip(slots[1:], names, strict=True))}
    return PeftEngine(model, base.tokenizer, labels)


def main(argv: list[str]) -> int:
    from madapt.bench.serve import publish_random_adapters
    from madapt.config import model_cache
    from madapt.models import build_tiny_llama, load_base
    from madapt.serve.args import ServeArgs
    from madapt.serve.loading import load_engine
    from madapt.serve.multilora import BASE_SLOT, adapter_matrices
    from madapt.store import AdapterStore

    args = parse_args(argv)
    if args.anchor:
        from madapt.bench.arrivals_http import run_servers

        return run_servers(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_model = args.base
    if base_model == "tiny":
        base_model = str(model_cache() / "tiny-llama")
        if not (Path(base_model) / "config.json").exists():
            build_tiny_llama(Path(base_model))
    store = AdapterStore(tempfile.mkdtemp(prefix="madapt-arrivals-store-"))
    names = [f"arrivals{i}" for i in range(args.adapters)]
    if names:
        publish_random_adapters(store, load_base(base_model), names, r=8)
    settings = ServeArgs(
        base_model=base_model, store=store.uri, max_adapters_per_replica=max(1, args.adapters), device="cpu"
    )
    base, engine = load_engine(settings)
    slots = [BASE_SLOT] + [
        engine.lora.load(adapter_matrices(n, s.config, s.tensors)) for n in names for s in [store.open(n)]
    ]
    peft = peft_engine(base_model, store, names, slots)
    probe_ids = base.tokenizer("Write a function that adds two numbers", add_special_tokens=False).input_ids
    rates = [float(r) for r in args.rates.split(",")]
    report: dict[str, Any] = {"rates": [], "probes": {}}

    async def run() -> None:
        runners = batchers(engine, peft, args)
        try:
            warm_up = workload(args, rates[0], base.tokenizer, slots)[:4]
            for runner in runners.values():  # first forwards pay one-off costs (allocations, kernel choice)
                await open_loop(batcher_answer(runner), warm_up)
            for rate in rates:
                row: dict[str, Any] = {"rate": rate}
                requests = workload(args, rate, base.tokenizer, slots)
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
                order = list(runners)
                for i in range(args.repeats):  # C S P, P S C, ...: a noisy neighbour hits every batcher alike
                    for name in order if i % 2 == 0 else order[::-1]:
                        runs[name].append(await open_loop(batcher_answer(runners[name]), requests))
                for name, results in runs.items():
                    row[name] = {key: statistics.fmean(r[key] for r in results) for key in results[0]}
                row["ttft_p99_vs_static"] = row["continuous"]["ttft_p99_s"] / row["static"]["ttft_p99_s"]
                row["tok_per_s_vs_static"] = row["continuous"]["tok_per_s"] / row["static"]["tok_per_s"]
                row["ttft_p99_vs_peft"] = row["continuous"]["ttft_p99_s"] / row["peft"]["ttft_p99_s"]
                row["tok_per_s_vs_peft"] = row["continuous"]["tok_per_s"] / row["peft"]["tok_per_s"]
                report["rates"].append(row)
                print(f"rate {rate:g}/s: {row}", file=sys.stderr, flush=True)
            for name in PROBED:
                batcher = runners[name]
                probed = [await probes(batcher, probe_ids, args.probe_tokens) for _ in range(args.probe_repeats)]
                medians = {k: statistics.median(r[k] for r in probed) for k in probed[0]}
                medians["short_vs_streams"] = medians["short_s"] / medians["streams_s"]
                medians["after_hangup_vs_idle"] = medians["after_hangup_s"] / medians["idle_s"]
                report["probes"][name] = medians
        finally:
            runners["continuous"].stop()

    asyncio.run(run())
    report["setup"] = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "base_model": "tiny (2-layer random Llama, hidden 64)" if args.base == "tiny" else args.base,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_results(report, Path(args.out))
    return 0


def write_results(report: dict[str, Any], out: Path) -> None:
    setup = report["setup"]
    lines = [
        f"# madapt bench arrivals ({setup['date']}, {setup['machine']})",
        "",
        f"{setup['base_model']}, {setup['requests']} Poisson arrivals per rate (mean of {setup['repeats']} runs per "
        f"batcher, the order alternated), prompts {setup['prompt_words']} words, "
        f"answers {setup['new_tokens']} tokens, {setup['adapters']} adapters + base, batch <= {setup['max_batch']}; "
        "in-process, no HTTP. Ratios compare batchers in the same run.",
        "",
        "| rate req/s | batcher | TTFT p50 / p99 s | e2e p50 / p99 s | output tok/s |",
        "|---:|---|---|---|---:|",
    ]
    for row in report["rates"]:
        for name in ("continuous", "static", "peft"):
            r = row[name]
            lines.append(
                f"| {row['rate']:g} | {name} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} "
                f"| {r['e2e_p50_s']:.3f} / {r['e2e_p99_s']:.3f} | {r['tok_per_s']:.0f} |"
            )
    lines += [
        "",
        f"| batcher | 2-token request beside 8 streams of {setup['probe_tokens']} | / streams | "
        "after 8 streams hung up | / idle |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, p in report["probes"].items():
        lines.append(
            f"| {name} | {p['short_s']:.3f} s | {p['short_vs_streams']:.1%} | {p['after_hangup_s']:.3f} s "
            f"| {p['after_hangup_vs_idle']:.2f}x |"
        )
    save_report(out, "arrivals", report, lines)
    chart(report, out / "arrivals.png")


def chart(report: dict[str, Any], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    series: dict[str, str | None] = {"continuous": None, "static": None, "peft": None}
    figure, axes = plot_rate_panels(plt, report["rates"], series, height=4)
    for axis in axes:
        axis.legend()
    figure.suptitle(f"{report['setup']['base_model']}: open-loop Poisson arrivals ({report['setup']['date']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
