"""`madapt bench scale`: a Zipf stream over 10,000 adapters replayed against 32 simulated replicas that keep
adapters with the replica's own cache code, beside an ideal per-replica LRU on the same stream.

What is real: each replica's device and host tiers are `madapt.serve.adapter_cache.AdapterCache`, the
very class a replica's `AdapterTiers` runs, with the same costs (one serving path: cost per byte equal, so
eviction is LRU by bytes), the same inclusive host tier (a store load keeps a host copy) and the same rule
for what leaves Serve's table (an evicted id stops routing to that replica at once). The load latencies
are drawn from real loads measured first in this run: adapters of exactly the scenario's stored size,
published to a local `AdapterStore` and loaded by `AdapterTiers` into a `MultiLora`, from the store
(read, verify, convert, copy into a slot) and from the host tier (copy into a slot), on a model with
Llama-3.1-8B's widths (hidden 4096, q 4096, v 1024) and 2 layers at rank 256 in place of 32 layers at
rank 16: the same bytes in fewer, larger tensors. Loads are on this machine's CPU (no host-to-GPU copy).

What is simulated: routing is Serve 2.60's for multiplexed ids (`PowerOfTwoChoicesRequestRouter` with
`MultiplexMixin.apply_multiplex_routing`): a request goes to a replica holding its id, picked by power of
two choices among those; with none, to one of the replicas holding the fewest ids. Queues are not
modelled: every replica accepts at once, so the router never takes its time-out fallbacks (fewest ids,
then any replica) for an id that is held, and power of two choices between holders is a random pick. Ids
are pushed to the router at once (Serve pushes every 0.1 s). Requests run one at a time, so nothing is
pinned. The ideal LRU gives each adapter one replica (its id modulo the replicas) and each replica an LRU
of the same byte budget, without a host tier: no adapter ever loaded twice at once, every miss a store load.

A cold load is a request whose adapter is not in the device tier of the replica that serves it; the
figures are over the stream after a warm-up (`--warmup`, a share of the requests), so a cache's first fill
is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from madapt.bench import percentile, save_report
from madapt.serve.adapter_cache import AdapterCache

RESULTS = Path("benchmarks/results/scale")
GB = 10**9
LLAMA_8B_PARAMS = 8_030_261_248  # Llama-3.1-8B, tied nothing: embeddings and lm_head both counted
ADAPTER_BYTES = 13_631_488  # r=16 on q_proj (4096->4096) and v_proj (4096->1024) x 32 layers, bf16
GOAL_BUDGET = 80 * GB - 2 * LLAMA_8B_PARAMS  # what 80 GB leaves beside the bf16 weights
MEASURE_SHAPE = {"hidden": 4096, "kv_dim": 1024, "layers": 2, "rank": 256}  # same bytes as the r=16 adapter
SMALL_SHAPE = {"hidden": 128, "kv_dim": 32, "layers": 2, "rank": 8}  # --small: seconds, for tests


@dataclass
class Replica:
    device: AdapterCache[None]
    host: AdapterCache[None]


@dataclass
class Tally:
    requests: int = 0
    loads: dict[str, list[float]] = field(default_factory=lambda: {"host": [], "store": []})
    bytes_moved: int = 0
    first_requests: int = 0  # cold loads of an adapter's first request in the stream: no cache could hold it

    def row(self) -> dict[str, Any]:
        cold = self.loads["host"] + self.loads["store"]
        return {
            "requests": self.requests,
            "cold_loads": len(cold),
            "cold_share": len(cold) / self.requests,
            "first_request_share": self.first_requests / self.requests,
            "store_loads": len(self.loads["store"]),
            "host_loads": len(self.loads["host"]),
            "cold_p99_ms": percentile(cold, 0.99) * 1e3,
            "host_p99_ms": percentile(self.loads["host"], 0.99) * 1e3,
            "store_p99_ms": percentile(self.loads["store"], 0.99) * 1e3,
            "bytes_moved_per_request": self.bytes_moved / self.requests,
        }


def zipf_stream(adapters: int, requests: int, s: float, seed: int) -> list[int]:
    """`requests` adapter ids, id k drawn with probability proportional to 1 / (k + 1)^s."""
    weights = [1.0 / (k + 1) ** s for k in range(adapters)]
    return random.Random(seed).choices(range(adapters), weights=weights, k=requests)


class Simulation:
    """Replicas with the replica's caches, routed as Serve routes multiplexed ids (module docstring)."""

    def __init__(self, replicas: int, budget: int, host_budget: int, size: int, latency: dict[str, list[float]]):
        self.replicas = [Replica(AdapterCache(budget), AdapterCache(host_budget)) for _ in range(replicas)]
        self.holders: dict[int, set[int]] = {}  # the router's table: adapter id -> replicas holding it
        self.size, self.latency, self.rng = size, latency, random.Random(0)

    def route(self, adapter: int) -> int:
        held = self.holders.get(adapter)
        if held:
            return self.rng.choice(sorted(held))
        counts = [len(replica.device) for replica in self.replicas]
        fewest = min(counts)
        return self.rng.choice([i for i, count in enumerate(counts) if count == fewest])

    def serve(self, adapter: int, tally: Tally | None, first: bool) -> None:
        index = self.route(adapter)
        replica, key = self.replicas[index], str(adapter)
        if key in replica.device:
            replica.device.get(key)  # a hit: refreshed
            if tally:
                tally.requests += 1
            return
        tier = "host" if key in replica.host else "store"
        replica.host.get(key)
        for evicted, _ in replica.device.admit(key, self.size, float(self.size), None):
            self.holders[int(evicted)].discard(index)  # forget_multiplexed: out of the router's table
        self.holders.setdefault(adapter, set()).add(index)
        if tier == "store":
            replica.host.admit(key, self.size, float(self.size), None)
        if tally:
            tally.requests += 1
            tally.loads[tier].append(self.rng.choice(self.latency[tier]))
            tally.bytes_moved += self.size
            tally.first_requests += first


def ideal_lru(stream: list[int], warmup: int, replicas: int, budget: int, size: int, store: list[float]) -> Tally:
    """Each adapter on one replica (id modulo replicas), each replica an LRU of `budget` bytes."""
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
    fits, tally, rng, seen = max(1, budget // size), Tally(), random.Random(1), set[int]()
    for n, adapter in enumerate(stream):
        cache = caches[adapter % replicas]
        hit = adapter in cache
        if hit:
            cache.move_to_end(adapter)
        else:
            cache[adapter] = None
            if len(cache) > fits:
                cache.popitem(last=False)
        if n >= warmup:
            tally.requests += 1
            if not hit:
                tally.loads["store"].append(rng.choice(store))
                tally.bytes_moved += size
                tally.first_requests += adapter not in seen
        seen.add(adapter)
    return tally


def replay(stream: list[int], warmup: int, simulation: Simulation) -> Tally:
    tally, seen = Tally(), set[int]()
    for n, adapter in enumerate(stream):
        simulation.serve(adapter, tally if n >= warmup else None, adapter not in seen)
        seen.add(adapter)
    return tally


def measure_loads(repeat: int, shape: dict[str, int], adapters: int = 4, cycles: int = 6) -> dict[str, Any]:
    """Real load times of `AdapterTiers`, from the store and from the host tier (module docstring): per
    round, `adapters` store loads then `cycles - 1` host-tier re-loads of each."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from madapt.lora import random_adapter
    from madapt.serve.adapter_tiers import AdapterTiers, HostCopy, tensor_bytes
    from madapt.serve.multilora import MultiLora, served_adapter
    from madapt.store import AdapterStore

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=shape["hidden"],
        intermediate_size=64,
        num_hidden_layers=shape["layers"],
        num_attention_heads=32,
        num_key_value_heads=32 * shape["kv_dim"] // shape["hidden"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    samples: dict[str, list[float]] = {"store": [], "host": []}
    with tempfile.TemporaryDirectory(prefix="madapt-bench-scale-") as root:
        store = AdapterStore(root)
        refs = []
        for i in range(adapters):
            peft_config, tensors = random_adapter(model, r=shape["rank"], seed=i, targets=["q_proj", "v_proj"])
            tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
            refs.append(
                store.publish(f"a{i}", peft_config, tensors, base_model="llama-8b-wide", base_fingerprint="x").ref
            )
        stored_bytes = store.manifest(refs[0]).size_bytes

        async def fetch(ref: str) -> HostCopy:
            opened = store.open(ref, expected_fingerprint="x")
            return HostCopy(opened.ref, served_adapter(ref, opened.config, opened.tensors), None, "store")

        lora = MultiLora(model)
        for _ in range(repeat):  # each round: a fresh host tier; one slot's budget, so every load evicts
            first = asyncio.run(fetch(refs[0]))
            tiers = AdapterTiers(
                lora, device_budget=tensor_bytes(first.adapter), host_budget=100 * GB, max_adapters=None,
                fetch=fetch, forget=lambda ref: None,
            )  # fmt: skip
            for ref in refs * cycles:
                load = asyncio.run(tiers.load(ref))
                samples[load.tier].append(load.seconds)
            for ref in refs:
                lora.unload(ref)
    return {"stored_bytes": stored_bytes, "seconds": samples, "shape": shape, "repeat": repeat}


def scenario(args: argparse.Namespace, stream: list[int], budget: int, latency: dict[str, list[float]]) -> dict:
    warmup = int(len(stream) * args.warmup)
    simulation = Simulation(args.replicas, budget, args.host_budget, args.adapter_bytes, latency)
    ours = replay(stream, warmup, simulation).row()
    ideal = ideal_lru(stream, warmup, args.replicas, budget, args.adapter_bytes, latency["store"]).row()
    copies = sum(len(r.device) for r in simulation.replicas)
    held = sum(bool(h) for h in simulation.holders.values())
    return {"budget_bytes": budget, "madapt": ours, "ideal_lru": ideal, "copies_per_held_adapter": copies / held}


def markdown(report: dict[str, Any]) -> str:
    load = report["measured_loads"]
    lines = [
        f"{report['requests']:,} requests, Zipf s={report['zipf_s']} over {report['adapters']:,} adapters of "
        f"{report['adapter_bytes'] / 1e6:.1f} MB, {report['replicas']} replicas; figures after a warm-up of "
        f"{report['warmup']:.0%} of the stream; {report['date']}. Load latencies drawn from "
        f"{len(load['seconds']['store'])} store and {len(load['seconds']['host'])} host-tier loads measured in "
        f"this run (medians {load['median_ms']['store']:.1f} ms and {load['median_ms']['host']:.1f} ms for "
        f"{load['stored_bytes'] / 1e6:.1f} MB, CPU).",
        "",
        "| budget / replica | cache | cold loads | of which first requests | host / store loads | cold p99 "
        "| host-tier p99 | MB moved / request |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["scenarios"].items():
        for cache, label in (("madapt", "madapt (Serve routing, GDS, host tier)"), ("ideal_lru", "ideal LRU")):
            r = row[cache]
            lines.append(
                f"| {name}: {row['budget_bytes'] / GB:.1f} GB | {label} | {r['cold_share']:.2%} "
                f"| {r['first_request_share']:.2%} "
                f"| {r['host_loads']:,} / {r['store_loads']:,} | {r['cold_p99_ms']:.1f} ms | {r['host_p99_ms']:.1f} ms "
                f"| {r['bytes_moved_per_request'] / 1e6:.3f} |"
            )
    goal, host_p99 = report["scenarios"]["goal"]["madapt"], report["host_tier_p99_ms"]
    lines += [
        "",
        f"Goal (<= 5% cold loads; cold-load p99 <= 100 ms from the host tier): {goal['cold_share']:.2%} cold, of "
        f"which {goal['first_request_share']:.2%} of requests are an adapter's first request (always a store "
        f"read); host-tier loads p99 {host_p99:.1f} ms: {'met' if report['goal_met'] else 'NOT met'}. The cold "
        f"p99 over all cold loads ({goal['cold_p99_ms']:.0f} ms) is the store's: first requests.",
    ]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    from madapt.charts import pyplot

    plt = pyplot(path)
    if plt is None:
        return
    names = list(report["scenarios"])
    figure, (share, p99) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for offset, cache, label in ((-width / 2, "madapt", "madapt"), (width / 2, "ideal_lru", "ideal LRU")):
        rows = [report["scenarios"][n][cache] for n in names]
        share.bar([i + offset for i in range(len(names))], [100 * r["cold_share"] for r in rows], width, label=label)
        p99.bar([i + offset for i in range(len(names))], [r["cold_p99_ms"] for r in rows], width, label=label)
    labels = [f"{n}\n{report['scenarios'][n]['budget_bytes'] / GB:.1f} GB/replica" for n in names]
    share.set_xticks(range(len(names)), labels)
    share.set_ylabel("% of requests paying a cold load")
    share.axhline(5, color="grey", linestyle="--", linewidth=1)
    p99.set_xticks(range(len(names)), labels)
    p99.set_ylabel("cold-load p99 (ms)")
    for axis in (share, p99):
        axis.legend()
    figure.suptitle(f"{report['adapters']:,} adapters, {report['replicas']} replicas, Zipf s={report['zipf_s']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="madapt bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--replicas", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--zipf-s", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0, help="of the request stream")
    parser.add_argument("--warmup", type=float, default=0.5, help="share of the stream not counted")
    parser.add_argument("--adapter-bytes", type=int, default=ADAPTER_BYTES, help="r=16 on q,v of Llama-3.1-8B")
    parser.add_argument("--budget", type=int, default=GOAL_BUDGET, help="goal scenario: 80 GB - 8.03B params x 2 B")
    parser.add_argument("--tight-budget", type=int, default=2 * GB, help="second scenario: the catalogue does not fit")
    parser.add_argument("--host-budget", type=int, default=32 * GB, help="host tier per replica")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of real loads measured (4 store, 20 host each)")
    parser.add_argument("--small", action="store_true", help="measure loads on a tiny shape (seconds; for tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="scale")
    args = parser.parse_args(argv)

    measured = measure_loads(args.repeat, SMALL_SHAPE if args.small else MEASURE_SHAPE)
    scale = args.adapter_bytes / measured["stored_bytes"]  # latency in proportion to bytes
    latency = {tier: [s * scale for s in samples] for tier, samples in measured["seconds"].items()}
    measured["median_ms"] = {tier: statistics.median(s) * 1e3 for tier, s in measured["seconds"].items()}
    started = time.perf_counter()
    stream = zipf_stream(args.adapters, args.requests, args.zipf_s, args.seed)
    scenarios = {name: scenario(args, stream, budget, latency) for name, budget in
                 (("goal", args.budget), ("tight", args.tight_budget))}  # fmt: skip
    goal = scenarios["goal"]["madapt"]
    host_p99 = goal["host_p99_ms"] if goal["host_loads"] else percentile(latency["host"], 0.99) * 1e3  # measured
    report = {
        "adapters": args.adapters,
        "replicas": args.replicas,
        "requests": args.requests,
        "zipf_s": args.zipf_s,
        "seed": args.seed,
        "warmup": args.warmup,
        "adapter_bytes": args.adapter_bytes,
        "budget_arithmetic": f"80 GB - {LLAMA_8B_PARAMS:,} params x 2 bytes (bf16) = {GOAL_BUDGET:,} bytes",
        "host_budget_bytes": args.host_budget,
        "latency_scale": scale,
        "measured_loads": measured,
        "scenarios": scenarios,
        "host_tier_p99_ms": host_p99,
        "goal_met": goal["cold_share"] <= 0.05 and host_p99 <= 100,
        "simulation_s": time.perf_counter() - started,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    save_report(args.out, args.name, report, [markdown(report)])
    chart(report, args.out / f"{args.name}.png")
    return 0
