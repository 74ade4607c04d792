"""`madapt bench load`: the Serve application under load over HTTP on loopback, then a replica killed under load.

Phase 1 (load): `--requests` completions at `--concurrency` spread over `--adapters` published adapters,
every `--stream-every`-th one streamed; every request must get a 200 (a stream: one that ends in [DONE]);
a 4xx, a 5xx or a dropped connection is counted against the server.
Phase 2 (`--kill`): the same load keeps running while one `AdapterServer` replica is SIGKILLed; requests
in flight on it must end in a retryable 503 (not a hang, not a 500), Serve must replace the replica, and
every request sent after the replacement is running must succeed. Writes load.json, load.md and load.png.
Phase 3 (`--probes`, one replica): issue 15's two probes over HTTP, each the median of `--probe-repeats`:
a 2-token completion sent once 8 streams of `--probe-tokens` tokens are decoding (its time over the
streams' time), and a 16-token completion sent right after 8 such streams hung up on their first chunk
(the connection closed; Serve must cancel their rows) over the same completion on the idle replica.
Exits 1 when a guarantee did not hold, so the numbers in the README come from a run that kept them.

The replica is killed by PID, so the application runs on a local Ray cluster (started here, or the one
this process is already connected to).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from madapt.bench import save_report
from madapt.charts import pyplot
from madapt.serve.openai.errors import status_for

RESULTS = Path("benchmarks/results")
APP = "madapt-load"
SERVER = "AdapterServer"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="madapt bench load", description=__doc__.splitlines()[0])
    p.add_argument("--base", default="tiny", help="'tiny' (a 2-layer random Llama built here) or any base_model")
    p.add_argument("--requests", type=int, default=2000, help="requests in the load phase")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--adapters", type=int, default=8, help="published adapters the requests are spread over")
    p.add_argument("--max-tokens", type=int, default=8, help="new tokens per request")
    p.add_argument("--replicas", type=int, default=2, help="AdapterServer replicas")
    p.add_argument("--stream-every", type=int, default=4, help="every Nth request streams (SSE); 0: none")
    p.add_argument("--kill", action="store_true", help="then SIGKILL a replica under load (phase 2)")
    p.add_argument("--kill-after", type=float, default=3.0, help="seconds of load before the kill")
    p.add_argument("--after-recovery", type=int, default=200, help="requests sent once the replacement runs")
    p.add_argument("--probes", action="store_true", help="then the two latency probes (needs --replicas 1)")
    p.add_argument("--probe-tokens", type=int, default=128, help="length of the probes' 8 long streams")
    p.add_argument("--probe-repeats", type=int, default=7)
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (a hang is a drop)")
    p.add_argument("--out", default=str(RESULTS), help="directory for load.json, load.md and load.png")
    return p.parse_args(argv)


@dataclass
class Outcome:
    adapter: str
    sent: float  # seconds since the phase started
    seconds: float
    status: int | str  # an HTTP status, or "dropped" (no HTTP answer within the timeout)
    tokens: int = 0
    error: str = ""


PROMPT = "Write a function that adds two numbers."


def completion_request(url: str, adapter: str, max_tokens: int, *, stream: bool) -> urllib.request.Request:
    body = {"model": adapter, "prompt": PROMPT, "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )


@contextmanager
def recorded(outcome: Outcome) -> Iterator[None]:
    """An HTTP error answer or a lost connection inside, written into `outcome` instead of raised."""
    try:
        yield
    except urllib.error.HTTPError as error:
        outcome.status, outcome.error = error.code, error.read().decode(errors="replace")[:300]
    except (OSError, ValueError) as error:  # refused, reset, timed out, truncated: the request was dropped
        outcome.error = f"{type(error).__name__}: {error}"[:300]


def send(url: str, adapter: str, max_tokens: int, timeout: float, origin: float, stream: bool = False) -> Outcome:
    request = completion_request(url, adapter, max_tokens, stream=stream)
    start = time.monotonic()
    outcome = Outcome(adapter, start - origin, 0.0, "dropped")
    with recorded(outcome), urllib.request.urlopen(request, timeout=timeout) as response:
        if stream:
            read_stream(response, outcome)
        else:
            outcome.status = response.status
            outcome.tokens = json.loads(response.read())["usage"]["completion_tokens"]
    outcome.seconds = time.monotonic() - start
    return outcome


def read_stream(response, outcome: Outcome) -> None:
    """A streamed answer: its status is 200 only once `[DONE]` arrives; an error event carries its own code."""
    for line in response:
        data = line.decode().removeprefix("data: ").strip()
        if data == "[DONE]":
            if outcome.status == "dropped":
                outcome.status = 200
            return
        chunk = json.loads(data) if data else {}
        if "error" in chunk:
            outcome.status, outcome.error = status_for(chunk["error"]["code"]), chunk["error"]["message"][:300]
        elif chunk.get("usage"):
            outcome.tokens = chunk["usage"]["completion_tokens"]
    outcome.error = "the stream ended without [DONE]"


def latency(outcomes: list[Outcome]) -> dict[str, float]:
    seconds = sorted(o.seconds for o in outcomes if o.status == 200)
    if not seconds:
        return {}

    def pct(q: float) -> float:
        return seconds[min(len(seconds) - 1, int(q * len(seconds)))]

    return {
        "p50_s": pct(0.50),
        "p90_s": pct(0.90),
        "p99_s": pct(0.99),
        "max_s": seconds[-1],
        "mean_s": statistics.fmean(seconds),
    }


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {"ok": 0, "4xx": 0, "503": 0, "5xx": 0, "dropped": 0}
    for o in outcomes:
        counts[outcome_kind(o.status)] += 1
    return counts


def outcome_kind(status: int | str) -> str:
    if isinstance(status, str):
        return "dropped"
    if status == 200:
        return "ok"
    if status == 503:
        return "503"
    return "4xx" if status < 500 else "5xx"


def load_phase(url: str, adapters: list[str], args: argparse.Namespace) -> dict:
    origin = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        outcomes = list(pool.map(lambda i: request(url, adapters, i, args, origin), range(args.requests)))
    wall = time.monotonic() - origin
    counts = tally(outcomes)
    return {
        "requests": len(outcomes),
        "concurrency": args.concurrency,
        "adapters": len(adapters),
        "streamed": sum(1 for i in range(args.requests) if streams(i, args)),
        "wall_s": wall,
        "req_per_s": len(outcomes) / wall,
        "tok_per_s": sum(o.tokens for o in outcomes) / wall,
        "counts": counts,
        "latency": latency(outcomes),
        "errors": sorted({o.error for o in outcomes if o.status != 200})[:5],
        "held": counts["ok"] == len(outcomes),
        "timeline": [(o.sent, o.seconds, o.status) for o in outcomes],
    }


def streams(i: int, args: argparse.Namespace) -> bool:
    return bool(args.stream_every) and i % args.stream_every == args.stream_every - 1


def request(url: str, adapters: list[str], i: int, args: argparse.Namespace, origin: float) -> Outcome:
    """The i-th request of a phase: adapters in turn, every `stream_every`-th one streamed."""
    return send(url, adapters[i % len(adapters)], args.max_tokens, args.timeout, origin, stream=streams(i, args))


def replicas() -> dict[str, Any]:
    """This app's live AdapterServer replica actors, by name."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{SERVER}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return {name: ray.get_actor(name, namespace="serve") for name in names}


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[SERVER]
    return deployment.replica_states.get("RUNNING", 0)


def kill_phase(url: str, adapters: list[str], args: argparse.Namespace) -> dict:
    """Load at `concurrency` while one replica is SIGKILLed; then `after_recovery` requests once it is replaced."""
    import ray

    before = replicas()
    victim = sorted(before)[0]
    pid = ray.get(before[victim].__ray_call__.remote(lambda _: os.getpid()))
    outcomes: list[Outcome] = []
    stop = threading.Event()
    origin = time.monotonic()

    def worker(k: int) -> None:
        i = k
        while not stop.is_set():
            outcomes.append(request(url, adapters, i, args, origin))
            i += args.concurrency

    with ThreadPoolExecutor(args.concurrency) as pool:
        for k in range(args.concurrency):
            pool.submit(worker, k)
        time.sleep(args.kill_after)
        killed_at = time.monotonic() - origin
        os.kill(pid, signal.SIGKILL)
        recovered_at = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            now = replicas()
            if victim not in now and len(now) == len(before) and running_replicas() == len(before):
                recovered_at = time.monotonic() - origin
                break
            time.sleep(0.2)
        stop.set()
    during = list(outcomes)
    after_origin = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        after = list(pool.map(lambda i: request(url, adapters, i, args, after_origin), range(args.after_recovery)))
    counts, after_counts = tally(during), tally(after)
    survivors = set(before) - {victim}
    return {
        "killed_at_s": killed_at,
        "recovery_s": None if recovered_at is None else recovered_at - killed_at,
        "replicas": len(before),
        "survivors_kept": survivors <= set(replicas()),
        "during": {"requests": len(during), "counts": counts, "latency": latency(during)},
        "max_s_during": max((o.seconds for o in during), default=0.0),
        "unavailable_errors": sorted({o.error for o in during if o.status == 503})[:3],
        "other_errors": sorted({o.error for o in during if o.status not in (200, 503)})[:5],
        "after": {"requests": len(after), "counts": after_counts, "latency": latency(after)},
        "held": recovered_at is not None
        and counts["5xx"] == counts["4xx"] == counts["dropped"] == 0
        and after_counts["ok"] == len(after)
        and survivors <= set(replicas()),
        "timeline": [(o.sent, o.seconds, o.status) for o in during],
    }


class Stream(threading.Thread):
    """One streamed completion read on its own thread; `first` is set at its first chunk, where a client
    that `hangs_up` closes the connection."""

    def __init__(self, url: str, adapter: str, tokens: int, timeout: float, *, hangs_up: bool = False):
        super().__init__(daemon=True)
        self.url, self.adapter, self.tokens, self.timeout, self.hangs_up = url, adapter, tokens, timeout, hangs_up
        self.first = threading.Event()
        self.outcome = Outcome(adapter, 0.0, 0.0, "dropped")

    def run(self) -> None:
        request = completion_request(self.url, self.adapter, self.tokens, stream=True)
        try:
            with recorded(self.outcome), urllib.request.urlopen(request, timeout=self.timeout) as response:
                first = response.readline()  # its first chunk: it is decoding
                if not first:
                    self.outcome.error = "the stream ended before its first chunk"
                elif self.hangs_up:
                    self.outcome.status = 200  # and the connection closes here: the client went away
                else:
                    self.first.set()
                    read_stream([first, *response], self.outcome)
        finally:
            self.first.set()


def probe_phase(url: str, adapter: str, args: argparse.Namespace) -> dict:
    """Issue 15's probes over HTTP (see the module docstring), the median of `probe_repeats` each."""

    outcomes: list[Outcome] = []

    def completion(tokens: int) -> Outcome:
        outcome = send(url, adapter, tokens, args.timeout, time.monotonic())
        outcomes.append(outcome)
        return outcome

    runs = []
    for _ in range(args.probe_repeats):
        idle = completion(16).seconds
        streams = [Stream(url, adapter, args.probe_tokens, args.timeout) for _ in range(8)]
        started = time.monotonic()
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.first.wait(args.timeout)
        short = completion(2).seconds
        for stream in streams:
            stream.join(args.timeout)
        streams_s = time.monotonic() - started
        hung = [Stream(url, adapter, args.probe_tokens, args.timeout, hangs_up=True) for _ in range(8)]
        for stream in hung:
            stream.start()
        for stream in hung:
            stream.join(args.timeout)
        after = completion(16).seconds
        outcomes += [s.outcome for s in streams + hung]
        runs.append({"idle_s": idle, "short_s": short, "streams_s": streams_s, "after_hangup_s": after})
        runs[-1]["stream_tokens"] = statistics.fmean(s.outcome.tokens for s in streams)
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return medians | {
        "short_vs_streams": medians["short_s"] / medians["streams_s"],
        "after_hangup_vs_idle": medians["after_hangup_s"] / medians["idle_s"],
        "counts": tally(outcomes),
        "errors": sorted({o.error for o in outcomes if o.status != 200})[:5],
        "held": all(o.status == 200 for o in outcomes),
        "runs": runs,
    }


def main(argv: list[str]) -> int:
    import ray
    import torch
    from ray import serve

    from madapt.bench.serve import publish_random_adapters
    from madapt.config import model_cache
    from madapt.models import build_tiny_llama, load_base
    from madapt.serve.app import application
    from madapt.serve.args import ServeArgs
    from madapt.serve.local import wait_ready
    from madapt.store import AdapterStore

    args = parse_args(argv)
    if args.probes and args.replicas != 1:
        raise SystemExit("--probes needs --replicas 1 (with more, Serve would send the probe to an idle replica)")
    base_model = args.base
    if base_model == "tiny":
        target = model_cache() / "tiny-llama"
        if not (target / "config.json").exists():
            build_tiny_llama(target)
        base_model = str(target)
    store = AdapterStore(tempfile.mkdtemp(prefix="madapt-load-store-"))
    adapters = [f"load{i}" for i in range(args.adapters)]
    publish_random_adapters(store, load_base(base_model), adapters, r=8)

    if not ray.is_initialized():
        ray.init(num_cpus=max(4, args.replicas + 2), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    settings = ServeArgs(
        base_model=base_model,
        store=store.uri,
        max_adapters_per_replica=args.adapters,
        max_batch_size=args.concurrency,
        torch_threads=1,
        registry_detached=False,
    )
    serve.run(application(settings, replicas=args.replicas), name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, timeout_s=600)
        for adapter in adapters:  # warm: every adapter loaded once, so phase 1 measures steady state
            send(url, adapter, 1, args.timeout, time.monotonic())
        print(f"load: {args.requests} requests, concurrency {args.concurrency}", file=sys.stderr, flush=True)
        report = {"load": load_phase(url, adapters, args)}
        if args.probes:
            print(f"probes: 8 streams of {args.probe_tokens} tokens", file=sys.stderr, flush=True)
            report["probes"] = probe_phase(url, adapters[0], args)
        if args.kill:
            print("kill: SIGKILL one replica under load", file=sys.stderr, flush=True)
            report["kill"] = kill_phase(url, adapters, args)
    finally:
        serve.delete(APP)
    report["setup"] = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "base_model": "tiny (2-layer random Llama, hidden 64)" if args.base == "tiny" else args.base,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_results(report, Path(args.out))
    held = all(report[phase]["held"] for phase in ("load", "probes", "kill") if phase in report)
    return 0 if held else 1


def write_results(report: dict, out: Path) -> None:
    setup, load = report["setup"], report["load"]
    lat, counts = load["latency"], load["counts"]
    lines = [
        f"# madapt bench load ({setup['date']}, {setup['machine']})",
        "",
        f"{setup['base_model']}, {setup['replicas']} AdapterServer replicas, {load['adapters']} adapters, "
        f"{setup['max_tokens']} new tokens per request ({load['streamed']} of {load['requests']} streamed as SSE), "
        "HTTP on loopback.",
        "",
        "| phase | requests | 200 | 503 | other 5xx | 4xx | dropped | p50 / p99 / max s | req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
        _row(f"load, concurrency {load['concurrency']}", load["requests"], counts, lat, f"{load['req_per_s']:.1f}"),
    ]
    if "kill" in report:
        kill = report["kill"]
        recovery = "never" if kill["recovery_s"] is None else f"{kill['recovery_s']:.1f} s"
        during, after = kill["during"], kill["after"]
        lines.append(_row("replica SIGKILLed under load", during["requests"], during["counts"], during["latency"], ""))
        lines.append(_row("after the replacement runs", after["requests"], after["counts"], after["latency"], ""))
        kept = "kept serving" if kill["survivors_kept"] else "were LOST"
        lines += ["", f"The replacement replica was running {recovery} after the kill; the other replicas {kept}."]
    if "probes" in report:
        probes = report["probes"]
        lines += [
            "",
            f"Probes over HTTP (one replica, median of {setup['probe_repeats']}; 8 streams of "
            f"{setup['probe_tokens']} tokens, {probes['stream_tokens']:.0f} tokens each on average):",
            "",
            "| probe | seconds | ratio | goal |",
            "|---|---:|---:|---|",
            f"| 2-token completion while the 8 stream, over the streams' {probes['streams_s']:.2f} s "
            f"| {probes['short_s']:.3f} | {probes['short_vs_streams']:.1%} | < 10% |",
            f"| 16-token completion after the 8 hung up, over the same on the idle replica "
            f"({probes['idle_s']:.3f} s) | {probes['after_hangup_s']:.3f} | {probes['after_hangup_vs_idle']:.2f}x "
            "| within 1.25x |",
        ]
    save_report(out, "load", report, lines)
    chart(report, out / "load.png")


def _row(phase: str, requests: int, counts: dict, lat: dict, rate: str) -> str:
    spread = f"{lat['p50_s']:.2f} / {lat['p99_s']:.2f} / {lat['max_s']:.2f}" if lat else "-"
    return (
        f"| {phase} | {requests} | {counts['ok']} | {counts['503']} | {counts['5xx']} | {counts['4xx']} "
        f"| {counts['dropped']} | {spread} | {rate} |"
    )


def chart(report: dict, path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    panels = [("load", report["load"]["timeline"])]
    if "kill" in report:
        panels.append(("replica killed", report["kill"]["timeline"]))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (title, timeline) in zip(axes[0], panels, strict=True):
        for status, colour in ((200, "tab:blue"), (503, "tab:orange")):
            points = [(sent, seconds) for sent, seconds, s in timeline if s == status]
            if points:
                axis.scatter(*zip(*points, strict=True), s=4, color=colour, label=str(status))
        others = [(sent, seconds) for sent, seconds, s in timeline if s not in (200, 503)]
        if others:
            axis.scatter(*zip(*others, strict=True), s=12, color="tab:red", marker="x", label="other")
        if title == "replica killed":
            axis.axvline(report["kill"]["killed_at_s"], color="black", linestyle="--", label="SIGKILL")
            if report["kill"]["recovery_s"] is not None:
                replaced = report["kill"]["killed_at_s"] + report["kill"]["recovery_s"]
                axis.axvline(replaced, color="green", linestyle=":", label="replacement running")
        axis.set_title(title)
        axis.set_xlabel("request sent at (s)")
        axis.set_ylabel("latency (s)")
        axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
