"""`madapt bench train --pack`: k adapters trained as one pack vs one run per adapter, measured in the same run.

For k = 1, 2, 4, 8 adapters of the demo's shape (examples/multi_adapter.yaml: LoRA r 16 / r 8 alternating on
q_proj, v_proj of SmolLM2-135M, batch 8, max_length 128, the demo's two datasets cycled), three ways:

- sequential: one process trains the k adapters one after another (`backend: local`, `madapt train`);
- packed: one process trains them as one pack (`madapt train --pack`); a pack of one is an ordinary run, so
  k = 1 is the sequential row;
- parallel: k processes at once, one adapter each (what `--parallel` runs side by side, without Ray's start-up);
  and one row of Ray Train runs side by side (`backend: ray`, `madapt train --parallel`) for `--ray-k`;
- packed at the largest k with other row caps (`--caps`; `backend.trainer.pack_max_rows`): what the default
  cap of 4 lane batches trades between speed and memory.

Rows are written as they finish; `--append` adds rows to an earlier run's report (setup kept, `appended` says
what was added), so a run cut short by its time budget can be completed.

Each mode runs in fresh processes; wall-clock is from their start to the last one's exit (imports and model
loading included), tokens/s is every published adapter's trained tokens over it, and peak memory is the
largest sum of the resident set sizes (RSS, /proc) of the processes and all their descendants (Ray's raylet,
GCS and workers included), sampled every 0.2 s. Every process uses `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from madapt.bench import save_report

RESULTS = Path("benchmarks/results")
DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
SHAPES = (("coding", 16, 32), ("chat", 8, 16))
"""The demo's two adapters: (dataset and name stem, r, alpha)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="madapt bench train --pack", description=__doc__.splitlines()[0])
    p.add_argument("--pack", action="store_true", help="(the flag that selects this bench)")
    p.add_argument("--model", default="smollm2-135m", help="base model (embedded name, directory or HF id)")
    p.add_argument("--ks", default="1,2,4,8", help="adapter counts to measure")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per adapter")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--parallel-max-k", type=int, default=8, help="largest k of the parallel rows (memory: k bases)")
    p.add_argument("--ray-k", type=int, default=2, help="k of the Ray Train --parallel row (0: none)")
    p.add_argument("--caps", default="8,64", help="row caps of extra packed rows at the largest k (default cap: 32)")
    p.add_argument("--out", default=str(RESULTS), help="directory for train-pack.{json,md,png}")
    p.add_argument("--append", action="store_true", help="add the rows to --out's train-pack.json (a run resumed)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measured process, a JSON job
    return p.parse_args(argv)


def bench_document(args: argparse.Namespace, k: int, workdir: Path, backend: str) -> dict:
    """The demo's config with k adapters (its two shapes and datasets, cycled)."""
    adapters = {}
    for i in range(k):
        stem, r, alpha = SHAPES[i % 2]
        adapters[f"{stem}{i // 2 or ''}"] = {
            "type": "lora",
            "r": r,
            "alpha": alpha,
            "dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
            "dataset": str(DATA / f"{stem}.jsonl"),
        }
    trainer = {"batch_size": args.batch_size, "max_steps": args.steps, "max_length": args.max_length}
    ray = {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "checkpoint_every": args.steps}
    return {
        "base_model": args.model,
        "adapters": {"adapters": adapters},
        "trainer": {**trainer, "eval_fraction": 0.0},
        "storage": {"uri": str(workdir / "store")},
        "backend": {"type": backend, "trainer": {**ray, "storage_path": str(workdir / "runs")}},
    }


def child(job: dict) -> None:
    """One measured process: train `job`'s adapters as it says and write their trained tokens to its file."""
    import torch

    torch.set_num_threads(job["threads"])
    from madapt.api import Model
    from madapt.cluster import configure
    from madapt.config import parse_config

    configure()
    # each pack is measured whole: a worker of the host's total memory (api's split has its own test)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    job["document"]["backend"]["trainer"].setdefault("pack_memory", f"{total / 1e9:.1f}GB")
    if job["document"]["backend"]["type"] == "ray":
        import ray

        ray.init(num_cpus=len(job["adapters"]) + 1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    model = Model(parse_config(job["document"]))
    manifests = model.train(adapters=job["adapters"], progress=False, pack=job["pack"], parallel=job["parallel"])
    tokens = {name: manifest.metrics["tokens"] for name, manifest in manifests.items()}
    Path(job["result"]).write_text(json.dumps(tokens))


def descendants_rss(roots: list[int]) -> int:
    """Bytes resident in `roots` and every process below them, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(rss.get(pid, 0) for pid in tree)


def measure(jobs: list[dict], workdir: Path) -> dict:
    """Run `jobs` as processes at once; wall-clock to the last exit, peak RSS of their trees, tokens trained."""
    processes = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    for i, job in enumerate(jobs):
        job = {**job, "result": str(workdir / f"result-{i}.json")}
        command = [sys.executable, "-m", "madapt.bench.pack", "--child", json.dumps(job)]
        env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "HF_HUB_OFFLINE": "1"}
        processes.append((subprocess.Popen(command, env=env), job["result"]))
    peak = 0
    while any(process.poll() is None for process, _ in processes):
        peak = max(peak, descendants_rss([process.pid for process, _ in processes]))
        time.sleep(0.2)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    failed = [process.args for process, _ in processes if process.returncode != 0]
    if failed:
        raise RuntimeError(f"bench processes failed: {failed}")
    tokens = sum(sum(json.loads(Path(result).read_text()).values()) for _, result in processes)
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "tok_per_s": tokens / wall, "peak_rss_gb": peak / 1e9}


def run_mode(args: argparse.Namespace, mode: str, k: int, root: Path) -> dict:
    """Measure one (mode, k) in a fresh work directory."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{mode}-{k}-", dir=root))
    backend = "ray" if mode == "ray parallel" else "local"
    document = bench_document(args, k, workdir, backend)
    names = list(document["adapters"]["adapters"])
    job = {"document": document, "threads": args.threads, "pack": mode.startswith("packed"), "parallel": False}
    if mode == "parallel":
        jobs = [{**job, "adapters": [name]} for name in names]
    else:
        jobs = [{**job, "adapters": names, "parallel": mode == "ray parallel"}]
    if mode.startswith("packed, cap"):  # "packed, cap N rows"
        document["backend"]["trainer"]["pack_max_rows"] = int(mode.split()[2])
    row = {"mode": mode, "k": k, **measure(jobs, workdir)}
    print(f"{mode:20} k={k}: {row['wall_s']:.1f} s, {row['tok_per_s']:.0f} tok/s, {row['peak_rss_gb']:.2f} GB")
    return row


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    ks = [int(k) for k in args.ks.split(",") if k]
    caps = [int(cap) for cap in args.caps.split(",") if cap]
    root = Path(tempfile.mkdtemp(prefix="madapt-bench-pack-"))
    runs = []
    for k in ks:  # in the order given: the rows that matter most can come first
        runs += [("sequential", k)] + [("packed", k)] * (k > 1)  # a pack of one is an ordinary run
        runs += [("parallel", k)] * (k <= args.parallel_max_k)
        runs += [(f"packed, cap {cap} rows", k) for cap in caps] * (k == max(ks))
    runs += [("ray parallel", args.ray_k)] * (args.ray_k > 0)
    previous = json.loads((Path(args.out) / "train-pack.json").read_text()) if args.append else None
    rows: list[dict] = previous["rows"] if previous else []
    info = {**previous["setup"], "appended": setup(args)} if previous else setup(args)
    for mode, k in runs:  # the results so far are written after each row
        rows.append(run_mode(args, mode, k, root))
        write_results({"setup": info, "rows": rows, "ratios": ratios(rows)}, Path(args.out))
    return 0


def setup(args: argparse.Namespace) -> dict:
    import torch

    return {
        **{k: v for k, v in vars(args).items() if k not in ("out", "child", "pack", "append")},
        "data": "coding.jsonl, chat.jsonl (cycled)",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {args.threads} torch thread(s) per process",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def ratios(rows: list[dict]) -> dict:
    """Per k: packed vs sequential wall-clock (speed-up) and packed peak RSS vs one adapter's run."""
    by = {(row["mode"], row["k"]): row for row in rows}
    single = by[("sequential", 1)]["peak_rss_gb"] if ("sequential", 1) in by else None
    out = {}
    for (mode, k), row in by.items():
        if mode != "packed":
            continue
        sequential, parallel = by.get(("sequential", k)), by.get(("parallel", k))
        out[str(k)] = {
            "speedup_vs_sequential": sequential["wall_s"] / row["wall_s"] if sequential else None,
            "speedup_vs_parallel": parallel["wall_s"] / row["wall_s"] if parallel else None,
            "peak_vs_one_adapter": row["peak_rss_gb"] / single if single else None,
        }
    return out


def write_results(report: dict, out: Path) -> None:
    setup, rows = report["setup"], report["rows"]
    lines = [
        f"# madapt bench train --pack ({setup['date']}, {setup['machine']})",
        "",
        f"{setup['model']}, k adapters of the demo's shape (r 16/8 on q_proj, v_proj), {setup['steps']} steps "
        f"x batch {setup['batch_size']} each, max_length {setup['max_length']}.",
        "",
        "| mode | k | wall-clock s | CPU s | tok/s | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['mode']} | {row['k']} | {row['wall_s']:.1f} | {cpu_text(row)} | {row['tok_per_s']:.0f} "
        f"| {row['peak_rss_gb']:.2f} |"
        for row in rows
    ]
    lines += ["", "| k | packed vs sequential (wall) | packed vs parallel (wall) | packed peak RSS / one adapter's |"]
    lines.append("|---:|---:|---:|---:|")
    for k, ratio in report["ratios"].items():
        cells = [ratio[key] for key in ("speedup_vs_sequential", "speedup_vs_parallel", "peak_vs_one_adapter")]
        lines.append(f"| {k} | " + " | ".join(f"{cell:.2f}x" if cell else "-" for cell in cells) + " |")
    lines += [
        "",
        "Wall-clock: from the processes' start to the last exit (imports and model loading included). Peak RSS: "
        "the largest sum over the processes and their descendants (Ray's included), sampled every 0.2 s. CPU s: "
        "user + system time of the processes and the descendants they waited for (getrusage). "
        f"packed: the default row cap on CPU (one lane batch, {setup['batch_size']} rows a forward).",
        "",
    ]
    save_report(out, "train-pack", report, lines)
    chart(rows, out / "train-pack.png")


def cpu_text(row: dict) -> str:
    """CPU seconds of a row ("-" for rows of a report written before they were measured)."""
    return f"{row['cpu_s']:.0f}" if "cpu_s" in row else "-"


def chart(rows: list[dict], path: Path) -> None:
    """Wall-clock per k, one line per mode (a row measured again: its latest, as `ratios` takes it)."""
    from madapt.charts import pyplot

    plt = pyplot(path)
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    rows = list({(row["mode"], row["k"]): row for row in rows}.values())
    for mode in ("sequential", "packed", "parallel"):
        # a pack of one is the sequential run
        points = sorted(
            (r["k"], r["wall_s"])
            for r in rows
            if r["mode"] == mode or (mode, r["mode"], r["k"]) == ("packed", "sequential", 1)
        )
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=mode)
    axis.set(xlabel="adapters (k)", ylabel="wall-clock s", title="madapt bench train --pack")
    axis.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
