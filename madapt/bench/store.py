"""`madapt bench store`: publish and open on the local store vs a loopback S3 server, and name resolution
before and after the resolver's TTL cache, all in one run.

The adapter is r=16 on every attention and MLP projection of Llama-3.1-8B's shape (32 layers), in bf16 as
a GPU-trained adapter is saved (~84 MB). The S3 server is moto's (madapt.s3local), started here on
loopback: it measures the S3 protocol's round trips and the store's conditional-write path, not a real
bucket's network. Resolution is `Resolver.resolve("coding")` on a store where `coding` has a few versions
and a `prod` label: with `ttl_s=0` every request reads the store (one listing and two small records),
with the cache warm it reads nothing. Each timing is the median of --repeat runs (the best is kept too).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow
import torch

from madapt.bench import save_report
from madapt.bench.merge import LLAMA_8B, SMALL, random_adapter
from madapt.charts import pyplot
from madapt.store import AdapterStore, releases
from madapt.store.releases import Resolver

RESULTS = Path("benchmarks/results")
VERSIONS = 3  # of `coding` in the resolution store


def timings(function: Callable[[], Any], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float], size_bytes: int | None = None) -> dict[str, float]:
    row = {"median_s": statistics.median(times), "best_s": min(times), "runs": len(times)}
    if size_bytes is not None:
        row["mb_per_s"] = size_bytes / 1e6 / row["median_s"]
    return row


def publish_and_open(store: AdapterStore, adapter, repeat: int) -> dict[str, dict[str, float]]:
    """Publish `adapter` `repeat` times (a new version each), then open the newest `repeat` times."""

    def publish() -> None:
        store.publish("bench", adapter.config, adapter.tensors, base_model="llama-8b-shaped", base_fingerprint="random")

    published = timings(publish, repeat)
    size = store.manifest("bench").size_bytes
    opened = timings(lambda: store.open("bench"), repeat)
    return {"publish": summary(published, size), "open": summary(opened, size)}


def resolution(store: AdapterStore, adapter, requests: int) -> dict[str, dict[str, float]]:
    """Per-request cost of resolving `coding`, uncached (ttl 0) and with a warm cache, and store reads."""
    for _ in range(VERSIONS):
        store.publish("coding", adapter.config, adapter.tensors, base_model="small", base_fingerprint="random")
    releases.promote(store, f"coding@{VERSIONS - 1}")
    rows = {}
    for label, ttl_s, count in (("uncached", 0.0, requests), ("cached", 3600.0, requests * 100)):
        resolver = Resolver(store, ttl_s=ttl_s)
        assert resolver.resolve("coding").ref == f"coding@{VERSIONS - 1}"  # the rule, and a warm cache
        before = sum(resolver.reads.values())
        started = time.perf_counter()
        for _ in range(count):
            resolver.resolve("coding")
        seconds = time.perf_counter() - started
        reads = sum(resolver.reads.values()) - before
        rows[label] = {"per_request_s": seconds / count, "store_reads_per_request": reads / count, "requests": count}
    return rows


def measure(root: str, adapter, small_adapter, *, repeat: int, requests: int) -> dict[str, Any]:
    bench = publish_and_open(AdapterStore(f"{root}/io"), adapter, repeat)
    return {**bench, "resolve": resolution(AdapterStore(f"{root}/releases"), small_adapter, requests)}


def ratios(local: dict[str, Any], s3: dict[str, Any]) -> dict[str, float]:
    return {
        "publish": s3["publish"]["median_s"] / local["publish"]["median_s"],
        "open": s3["open"]["median_s"] / local["open"]["median_s"],
        "resolve_uncached": s3["resolve"]["uncached"]["per_request_s"] / local["resolve"]["uncached"]["per_request_s"],
        "resolve_cached": s3["resolve"]["cached"]["per_request_s"] / local["resolve"]["cached"]["per_request_s"],
    }


def markdown(report: dict[str, Any]) -> str:
    local, s3, ratio = report["local"], report["s3"], report["s3_over_local"]
    mb = local["publish"]["mb_per_s"] * local["publish"]["median_s"]
    lines = [
        f"{report['adapter']} ({mb:.1f} MB); {report['machine']['cpus']} CPUs (load average "
        f"{report['load_average_1_5_15']['before'][0]:.0f} before, {report['load_average_1_5_15']['after'][0]:.0f} "
        f"after), {report['date']}. Medians of "
        f"{report['repeat']} runs; S3 is moto's server on loopback, started by the bench; ratios are from this run.",
        "",
        "| operation | local | S3 (loopback) | S3 / local |",
        "|---|---:|---:|---:|",
    ]
    for op in ("publish", "open"):
        lines.append(
            f"| {op} | {local[op]['median_s']:.3f} s ({local[op]['mb_per_s']:.0f} MB/s) "
            f"| {s3[op]['median_s']:.3f} s ({s3[op]['mb_per_s']:.0f} MB/s) | {ratio[op]:.1f}x |"
        )
    for mode in ("uncached", "cached"):
        cells = [
            f"{r['per_request_s'] * 1e6:,.1f} us, {r['store_reads_per_request']:g} state reads"
            for r in (local["resolve"][mode], s3["resolve"][mode])
        ]
        lines.append(f"| resolve `coding` ({mode}) | {cells[0]} | {cells[1]} | {ratio['resolve_' + mode]:.1f}x |")
    cached = {w: report[w]["resolve"]["uncached"]["per_request_s"] / report[w]["resolve"]["cached"]["per_request_s"]
              for w in ("local", "s3")}  # fmt: skip
    lines += [
        "",
        f"The TTL cache makes resolving {cached['local']:,.0f}x cheaper on the local store and {cached['s3']:,.0f}x "
        "on S3. A state read is one listing of the adapter's versions and two small records (labels, split): "
        "4 HTTP requests on S3.",
    ]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    figure, (io, resolve) = plt.subplots(1, 2, figsize=(11, 4))
    labels, width = ["publish", "open"], 0.38
    for offset, where in ((-width / 2, "local"), (width / 2, "s3")):
        values = [report[where][op]["median_s"] for op in labels]
        io.bar([i + offset for i in range(2)], values, width, label="S3 (loopback)" if where == "s3" else where)
    io.set_xticks(range(2), labels)
    io.set_ylabel("seconds (median)")
    io.set_title(f"{report['adapter']}")
    io.legend()
    modes = ["uncached", "cached"]
    for offset, where in ((-width / 2, "local"), (width / 2, "s3")):
        values = [report[where]["resolve"][m]["per_request_s"] * 1e6 for m in modes]
        resolve.bar([i + offset for i in range(2)], values, width, label="S3 (loopback)" if where == "s3" else where)
    resolve.set_xticks(range(2), ["ttl 0 (no cache)", "TTL cache, warm"])
    resolve.set_yscale("log")
    resolve.set_ylabel("microseconds per request (log)")
    resolve.set_title("resolving `coding` to a version")
    resolve.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    from madapt.s3local import BUCKET, applied, serve_s3

    parser = argparse.ArgumentParser(prog="madapt bench store", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny Llama shape (seconds; for tests)")
    parser.add_argument("--repeat", type=int, default=5, help="publishes and opens per store")
    parser.add_argument("--requests", type=int, default=50, help="uncached resolutions (cached: 100x as many)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    shape = SMALL if args.small else LLAMA_8B
    adapter = random_adapter(shape, "all", name="bench", r=16, layers=shape.layers, seed=0)
    adapter.tensors = {k: v.to(torch.bfloat16) for k, v in adapter.tensors.items()}
    small = random_adapter(SMALL, "qv", name="coding", r=4, layers=1, seed=1)
    name = "store-small" if args.small else "store"
    with tempfile.TemporaryDirectory(prefix="madapt-bench-store-") as directory:
        local = measure(directory, adapter, small, repeat=args.repeat, requests=args.requests)
    with serve_s3() as env, applied(env):
        s3 = measure(
            f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", adapter, small, repeat=args.repeat, requests=args.requests
        )
    report = {
        "adapter": f"r=16 LoRA on q,k,v,o,gate,up,down x {shape.layers} layers of "
        f"{'a tiny Llama' if args.small else 'Llama-3.1-8B'}, bf16",
        "shape": shape.__dict__,
        "repeat": args.repeat,
        "local": local,
        "s3": s3,
        "s3_over_local": ratios(local, s3),
        "note": "S3 is moto's server in this process on loopback; the machine may be shared, so compare ratios",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},  # a shared machine's noise
        "versions": {"torch": torch.__version__, "pyarrow": pyarrow.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    save_report(args.out, name, report, [markdown(report)])
    chart(report, args.out / f"{name}.png")
    return 0
