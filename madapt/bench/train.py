"""`madapt bench train`: what Ray Train costs and what a second worker buys, measured in the same run.

Three runs of one adapter on the same model, data and step count: (a) a bare single-process PyTorch+PEFT
loop (madapt's Trainer, no Ray; run before and after the Ray runs, the faster counts), (b) Ray Train with
1 worker, (c) Ray Train with 2 workers. Reported:
loop tokens/s (tokens over the training loop's own wall time, as each run measures it) and end-to-end wall
time including model loading and, for Ray, the fixed start-up of `fit()`. Each process uses one torch thread
so that 1 vs 2 workers compares the same per-worker compute.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from madapt.bench import save_report
from madapt.config import Config, parse_config
from madapt.data import tokenize_example
from madapt.lora import add_trainable_adapter
from madapt.models import load_base
from madapt.splits import load_splits
from madapt.store import AdapterStore
from madapt.train.loop import Trainer, micro_batches
from madapt.train.settings import settings_for

RESULTS = Path("benchmarks/results")
DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "coding.jsonl"
ADAPTER = "bench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="madapt bench train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="base model (embedded name, directory or HF id)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to measure")
    p.add_argument("--strategy", default="fsdp", choices=["fsdp", "ddp"], help="strategy with several workers")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(RESULTS), help="directory for train.json and train.md")
    p.add_argument("--pack", action="store_true", help="packed vs sequential vs parallel runs: see --pack --help")
    return p.parse_args(argv)


def bench_config(args: argparse.Namespace, workdir: Path, workers: int) -> Config:
    strategy = "ddp" if workers == 1 else args.strategy
    return parse_config(
        {
            "base_model": args.model,
            "adapters": {"adapters": {ADAPTER: {"r": 8, "alpha": 16, "dropout": 0.0, "dataset": args.data}}},
            "trainer": {"batch_size": args.batch_size, "max_steps": args.steps, "max_length": args.max_length},
            "storage": {"uri": str(workdir / "store")},
            "backend": {
                "type": "ray",
                "trainer": {
                    "num_workers": workers,
                    "strategy": strategy,
                    "resources_per_worker": {"CPU": 1},
                    "storage_path": str(workdir / f"runs-{workers}"),
                    "checkpoint_every": args.steps,
                },
            },
        }
    )


def bare_loop(config: Config) -> dict:
    """The baseline: load, wrap with PEFT and train in this process, exactly as a worker's shard would."""
    started = time.perf_counter()
    torch.manual_seed(config.trainer.seed)
    examples, _ = load_splits(config, ADAPTER)
    base = load_base(config.base_model)
    model = add_trainable_adapter(base.model, config.named_adapters[ADAPTER], ADAPTER, quantized=False)
    rows = [tokenize_example(base.tokenizer, e, config.trainer.max_length) for e in examples]
    settings = settings_for(config.trainer, len(rows))
    batches = micro_batches(rows, settings.batch_size, base.tokenizer.pad_token_id, settings.seed)
    result = Trainer(model, settings).run(batches)
    metrics = result.metrics()
    return {
        "tokens": metrics["tokens"],
        "tok_per_s": metrics["tokens_per_s"],
        "end_to_end_s": time.perf_counter() - started,
    }


def ray_run(config: Config, workdir: Path, workers: int) -> dict:
    from madapt.train.distributed import train_ray

    started = time.perf_counter()
    metrics = train_ray(config, ADAPTER, AdapterStore(str(workdir / "store"))).metrics
    return {
        "workers": workers,
        "strategy": config.backend.trainer.strategy,
        "tokens": metrics["tokens"],
        "tok_per_s": metrics["tokens_per_s"],
        "end_to_end_s": time.perf_counter() - started,
    }


def main(argv: list[str]) -> int:
    if "--pack" in argv:  # packed vs one run per adapter: its own bench
        from madapt.bench import pack

        return pack.main(argv)
    import ray

    args = parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="madapt-bench-train-"))
    torch.set_num_threads(1)
    if not ray.is_initialized():  # logical CPUs: room for the controller and data tasks beside the workers
        ray.init(num_cpus=max(counts) + 2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    before = bare_loop(bench_config(args, workdir, 1))
    runs = [ray_run(bench_config(args, workdir, n), workdir, n) for n in counts]
    after = bare_loop(bench_config(args, workdir, 1))
    # the baseline runs before and after the Ray runs; the faster one is the least disturbed by other load
    bare = {
        **max(before, after, key=lambda run: run["tok_per_s"]),
        "tok_per_s_runs": [before["tok_per_s"], after["tok_per_s"]],
    }
    for run in runs:
        run["vs_bare"] = run["tok_per_s"] / bare["tok_per_s"]
        run["vs_1_worker"] = run["tok_per_s"] / runs[0]["tok_per_s"] if counts[0] == 1 else None
    report = {
        "setup": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "data")},
            "data": Path(args.data).name,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, 1 torch thread per process",
            "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "bare": bare,
        "ray": runs,
    }
    write_results(report, Path(args.out))
    return 0


def write_results(report: dict, out: Path) -> None:
    setup, bare = report["setup"], report["bare"]
    lines = [
        f"# madapt bench train ({setup['date']}, {setup['machine']})",
        "",
        f"{setup['model']}, {setup['steps']} steps x batch {setup['batch_size']}, max_length {setup['max_length']}.",
        "",
        "| run | loop tok/s | x bare loop | x 1 worker | end-to-end s |",
        "|---|---:|---:|---:|---:|",
        f"| bare PyTorch+PEFT, 1 process (best of 2) | {bare['tok_per_s']:.0f} | 1.00 | - "
        f"| {bare['end_to_end_s']:.1f} |",
    ]
    for run in report["ray"]:
        scaling = f"{run['vs_1_worker']:.2f}" if run["vs_1_worker"] is not None else "-"
        lines.append(
            f"| Ray Train, {run['workers']} worker(s), {run['strategy']} | {run['tok_per_s']:.0f} "
            f"| {run['vs_bare']:.2f} | {scaling} | {run['end_to_end_s']:.1f} |"
        )
    lines += ["", "End-to-end includes model loading and, for Ray, the fixed start-up of `fit()`.", ""]
    save_report(out, "train", report, lines)
