"""`madapt bench serve`: throughput and latency of mixed-adapter batches against base-only and naive switching.

Measured in-process on the engine the Serve replica runs (no HTTP, no Ray Serve routing), so the ratios
isolate the adapter maths: (a) the base model alone, through madapt's engine and through plain
transformers `generate`, (b) madapt's batched mixed-adapter forward, through the static batch
(`Engine.generate`) and through the continuous batcher's running batch (`DecodeBatch`), (b0) PEFT's mixed
batch (`adapter_names=`), (c) naive one-request-at-a-time `set_adapter` switching, all in the same run on
the same base. Also the cold load of one adapter from the store and from Ray's
object store. Adapters are random (PEFT `init_lora_weights=False`): speed does not depend on training.

Per served adapter type (`--types`: rsLoRA and rank_pattern on the gathered path; DoRA, IA3, OFT, ... on the
per-adapter path, `madapt.serve.tuners`), loaded into the same engine after the runs above: a batch whose
rows all use that type's adapter and a batch mixing it half and half with plain LoRA rows, each against
base-only batches interleaved in the same rounds, so the cost of each path is known.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.functional import pad

from madapt.bench import percentile, save_report
from madapt.bench.typed import KINDS, publish_typed
from madapt.charts import pyplot
from madapt.lora import publish_random
from madapt.models import LoadedBase, load_base
from madapt.serve.multilora import AdapterMatrices
from madapt.store import AdapterStore

RESULTS = Path("benchmarks/results")


def publish_random_adapters(
    store: AdapterStore, base: LoadedBase, names: list[str], *, r: int = 8, targets: list[str] | None = None
) -> None:
    """Publish one random adapter per name (seeded by position) on `base` into `store`."""
    for i, name in enumerate(names):
        publish_random(store, base, name, r=r, seed=1000 + i, targets=targets or ["q_proj", "v_proj"])


PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "Summarise the plot of Hamlet in two sentences.",
    "Give me three tips for writing clean code.",
    "Translate 'good morning' into Spanish.",
    "Explain what a hash map is.",
    "List the planets of the solar system.",
    "How do I sort a list of dictionaries by a key?",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="madapt bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m", help="base model (embedded name, directory or HF id)")
    p.add_argument("--adapters", default="1,8,32", help="numbers of distinct adapters to spread requests over")
    p.add_argument(
        "--popularity",
        default="uniform,skewed",
        help="uniform, skewed (Zipf s=1.2) and/or distinct (no adapter twice in a batch while there are enough)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight = rows per batch")
    p.add_argument("--rounds", type=int, default=3, help="interleaved base/madapt/PEFT batches per configuration")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument(
        "--types", default=",".join(KINDS), help=f"served adapter types timed per row ('' for none): {', '.join(KINDS)}"
    )
    p.add_argument(
        "--merge-sources",
        type=int,
        default=8,
        help=f"rank-mix runs: rank-{MIX_RANK} rows beside a merge of this many of them (0: none)",
    )
    p.add_argument("--naive-requests", type=int, default=8, help="requests timed for the one-at-a-time baseline")
    p.add_argument("--no-ray", action="store_true", help="skip the object-store cold load (needs Ray)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=str(RESULTS), help="directory for serve.json, serve.md and serve.png")
    return p.parse_args(argv)


def assign(n_adapters: int, requests: int, popularity: str, seed: int = 0, batch: int = 1) -> list[int]:
    """Which adapter each request uses: uniform, Zipf-skewed (a few adapters get most requests), or
    distinct (each `batch` of requests uses as many different adapters as there are)."""
    generator = torch.Generator().manual_seed(seed)
    if popularity == "distinct":
        picks: list[int] = []
        while len(picks) < requests:
            batch_picks: list[int] = []
            while len(batch_picks) < batch:  # each pass over the adapters a new random order
                batch_picks += torch.randperm(n_adapters, generator=generator).tolist()
            picks += batch_picks[:batch]
        return picks[:requests]
    weights = torch.ones(n_adapters)
    if popularity == "skewed":
        weights = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float) ** 1.2
    return torch.multinomial(weights, requests, replacement=True, generator=generator).tolist()


@dataclass
class Batches:
    """Per-batch measurements of one mode; throughput is the median over batches (robust to a noisy
    shared machine), latencies are pooled over requests."""

    tok_per_s: list[float] = field(default_factory=list)
    req_per_s: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    def add(self, tokens: int, seconds: float, latencies: list[float], ttfts: list[float]) -> None:
        self.tok_per_s.append(tokens / seconds)
        self.req_per_s.append(len(latencies) / seconds)
        self.latencies += latencies
        self.ttfts += ttfts

    def summary(self) -> dict:
        return {
            "tok_per_s": statistics.median(self.tok_per_s),
            "req_per_s": statistics.median(self.req_per_s),
            "p50_s": percentile(self.latencies, 0.5),
            "p99_s": percentile(self.latencies, 0.99),
            "ttft_p50_s": percentile(self.ttfts, 0.5),
            "batches": len(self.tok_per_s),
        }


def paired(mode: Batches, reference: Batches) -> float:
    """`mode`'s throughput over `reference`'s: the median of the ratios of batches run side by side in the
    same round. A shared 2-core VM drifts by 20% or more between rounds; a ratio of two medians carries
    that drift, a median of paired ratios cancels it."""
    return statistics.median(m / r for m, r in zip(mode.tok_per_s, reference.tok_per_s, strict=True))


def engine_batch(out: Batches, engine, prompt_ids: list[list[int]], slots: list[int], new_tokens: int) -> None:
    """One batch of simultaneous requests through the serving engine (what a replica runs)."""
    from madapt.serve.engine import Row

    rows = [Row(prompt_ids=prompt_ids[i % len(prompt_ids)], slot=s, max_tokens=new_tokens) for i, s in enumerate(slots)]
    start = time.perf_counter()
    engine.generate(rows, clock=time.perf_counter)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.ids) + (r.finish_reason == "stop") for r in rows)
    out.add(tokens, seconds, [seconds] * len(rows), [(r.first_token_s or start) - start for r in rows])


def continuous_batch(
    out: Batches, engine, prompt_ids: list[list[int]], slots: list[int], new_tokens: int, counted_from: int = 0
) -> None:
    """The same batch through the continuous batcher's running batch: admitted together, stepped to the end
    (tokens and latencies of the rows from `counted_from` on)."""
    from madapt.serve.engine import DecodeBatch, Row

    rows = [Row(prompt_ids=prompt_ids[i % len(prompt_ids)], slot=s, max_tokens=new_tokens) for i, s in enumerate(slots)]
    batch = DecodeBatch(engine, clock=time.perf_counter)
    start = time.perf_counter()
    batch.admit(rows)
    while batch.rows:
        batch.step()
    seconds = time.perf_counter() - start
    counted = rows[counted_from:]
    tokens = sum(len(r.ids) + (r.finish_reason == "stop") for r in counted)
    out.add(tokens, seconds, [seconds] * len(counted), [(r.first_token_s or start) - start for r in counted])


@torch.inference_mode()
def hf_batch(out: Batches, model, tokenizer, prompts: list[str], n: int, new_tokens: int) -> None:
    """Plain transformers `generate` on the base model alone (no adapters, no madapt): the reference."""
    inputs = tokenizer(
        [prompts[i % len(prompts)] for i in range(n)], return_tensors="pt", padding=True, add_special_tokens=False
    )
    start = time.perf_counter()
    generated = model.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    seconds = time.perf_counter() - start
    tokens = int((generated[:, inputs["input_ids"].shape[1] :] != tokenizer.pad_token_id).sum())
    out.add(tokens, seconds, [seconds] * n, [seconds] * n)


@torch.inference_mode()
def peft_batch(out: Batches, peft, tokenizer, prompts: list[str], names: list[str], new_tokens: int) -> None:
    """PEFT's own mixed batch: `generate(adapter_names=[...])` over left-padded rows (no TTFT: it is not
    streamed, so the batch latency stands in)."""
    inputs = tokenizer(
        [prompts[i % len(prompts)] for i in range(len(names))],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    start = time.perf_counter()
    generated = peft.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=False, adapter_names=names, pad_token_id=tokenizer.pad_token_id
    )
    seconds = time.perf_counter() - start
    tokens = int((generated[:, inputs["input_ids"].shape[1] :] != tokenizer.pad_token_id).sum())
    out.add(tokens, seconds, [seconds] * len(names), [seconds] * len(names))


@torch.inference_mode()
def naive(peft, tokenizer, prompts: list[str], names: list[str], concurrency: int, new_tokens: int) -> dict:
    """One request at a time, `set_adapter` before each. Latency under `concurrency` simultaneous arrivals
    is the queue of measured service times (request k waits for the k-1 before it)."""
    tokens, service = 0, []
    for i, name in enumerate(names):
        start = time.perf_counter()
        peft.set_adapter(name)
        inputs = tokenizer(prompts[i % len(prompts)], return_tensors="pt", add_special_tokens=False)
        generated = peft.generate(
            **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        tokens += generated.shape[1] - inputs["input_ids"].shape[1]
        service.append(time.perf_counter() - start)
    result = Batches()
    waits = [sum(service[j % len(service)] for j in range(k + 1)) for k in range(concurrency)]
    result.add(tokens, sum(service), waits, [w - service[k % len(service)] for k, w in enumerate(waits)])
    result.req_per_s = [len(names) / sum(service)]
    return result.summary()


def type_runs(engine, store: AdapterStore, base: LoadedBase, prompt_ids: list[list[int]], args) -> list[dict]:
    """Per adapter type: tok/s of batches of that type alone and mixed half and half with plain LoRA rows,
    each beside base-only batches in the same interleaved rounds (see the module docstring). `base`: an
    unwrapped copy of the engine's base, to make the adapters on."""
    from madapt.serve.multilora import served_adapter

    kinds = [k for k in args.types.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"--types: unknown {unknown}; choose from {', '.join(KINDS)}")
    targets = args.targets.split(",")
    slots = {}
    for i, kind in enumerate(dict.fromkeys(["lora", *kinds])):  # plain LoRA: the mixed batches' other half
        stored = store.open(publish_typed(store, base, f"type_{kind}", kind, seed=2000 + i, targets=targets).ref)
        slots[kind] = engine.lora.load(served_adapter(stored.ref, stored.config, stored.tensors))
    rows = []
    for kind in kinds:
        modes = {"base": Batches(), "alone": Batches(), "with_lora": Batches()}
        mixed = [slots[kind] if i % 2 else slots["lora"] for i in range(args.concurrency)]
        for _ in range(args.rounds):
            engine_batch(modes["base"], engine, prompt_ids, [0] * args.concurrency, args.new_tokens)
            engine_batch(modes["alone"], engine, prompt_ids, [slots[kind]] * args.concurrency, args.new_tokens)
            engine_batch(modes["with_lora"], engine, prompt_ids, mixed, args.new_tokens)
        tok = {mode: batches.summary()["tok_per_s"] for mode, batches in modes.items()}
        ratios = {f"{m}_vs_base": paired(modes[m], modes["base"]) for m in ("alone", "with_lora")}
        path = "per-adapter" if slots[kind] in engine.lora.tuned else "gathered"
        rows.append({"type": kind, "path": path, **{f"{m}_tok_per_s": t for m, t in tok.items()}})
        rows[-1] |= ratios
        print(f"type {kind} ({path}): tok/s {tok}", file=sys.stderr, flush=True)
    return rows


MIX_RANK = 8
"""The rank of the rows in the rank-mix runs (the goal: rank-8 rows beside one rank-64 merge)."""


def padded(matrices: AdapterMatrices, rank: int) -> AdapterMatrices:
    """The same adapter with every module zero-padded to `rank`: the same maths, at the cost every row paid
    when slot tables were padded to the largest rank loaded (before rows were grouped by rank)."""
    modules = {
        path: (pad(a, (0, rank - a.shape[1])), pad(b, (0, 0, 0, rank - b.shape[0])))
        for path, (a, b) in matrices.modules.items()
    }
    return AdapterMatrices(ref=f"{matrices.ref}-padded{rank}", modules=modules)


def held_bytes(lora, slot: int) -> int:
    """Bytes of the factors one slot holds on the engine's modules."""
    return sum(t.numel() * t.element_size() for layer in lora.layers.values() for t in layer.factors.get(slot, ()))


def rank_runs(engine, store: AdapterStore, base: LoadedBase, prompt_ids: list[list[int]], args) -> dict | None:
    """Rank-8 rows (over `--merge-sources` adapters) with the first row on their exact merge (rank 8 x
    sources, as a per-request merge builds it), through the continuous batcher: the rank-8 rows' tok/s
    against the same rows without the merge, and against the same batch with every rank-8 adapter padded
    to the merge's rank (what serving computed before), in the same interleaved rounds."""
    from madapt.lowrank import exact_merge
    from madapt.serve.multilora import adapter_matrices

    if not args.merge_sources:
        return None
    names = [f"rank{MIX_RANK}_{i}" for i in range(args.merge_sources)]
    publish_random_adapters(store, base, names, r=MIX_RANK, targets=args.targets.split(","))
    sources = [(stored.config, stored.tensors) for stored in map(store.open, names)]
    merge = adapter_matrices("merge", *exact_merge(sources, [1 / len(names)] * len(names)))
    merge_rank = max(a.shape[1] for a, _ in merge.modules.values())
    own = [adapter_matrices(name, *source) for name, source in zip(names, sources, strict=True)]
    slots = {
        "own": [engine.lora.load(m) for m in own],
        "padded": [engine.lora.load(padded(m, merge_rank)) for m in own],
        "merge": [engine.lora.load(merge)],
    }
    rows = range(1, args.concurrency)
    batches = {  # row 0 is not counted: a rank-8 row in the first batch, the merge's row in the others
        "alone": [slots["own"][i % len(names)] for i in range(args.concurrency)],
        "with_merge": slots["merge"] + [slots["own"][i % len(names)] for i in rows],
        "padded": slots["merge"] + [slots["padded"][i % len(names)] for i in rows],
    }
    modes = {mode: Batches() for mode in batches}
    for round_ in range(args.rounds):  # every other round in reverse: a machine that drifts favours no mode
        for mode in list(batches)[:: 1 if round_ % 2 == 0 else -1]:
            continuous_batch(modes[mode], engine, prompt_ids, batches[mode], args.new_tokens, counted_from=1)
    tok = {f"{mode}_tok_per_s": batches.summary()["tok_per_s"] for mode, batches in modes.items()}
    print(f"rank {MIX_RANK} rows beside a rank {merge_rank} merge: tok/s {tok}", file=sys.stderr, flush=True)
    return {
        "rank": MIX_RANK,
        "merge_rank": merge_rank,
        "merge_sources": len(names),
        "counted_rows": len(rows),
        **tok,
        "with_merge_vs_alone": paired(modes["with_merge"], modes["alone"]),
        "padded_vs_alone": paired(modes["padded"], modes["alone"]),
        "bytes": {kind: held_bytes(engine.lora, chosen[0]) for kind, chosen in slots.items()},
    }


def cold_loads(store: AdapterStore, base: LoadedBase, lora, refs: list[str], use_ray: bool) -> dict:
    """Milliseconds from a ref to weights in a batch slot: from the store (read, verify) and from the
    registry's hot copy in Ray's object store (what a second replica pays)."""
    from madapt.serve.multilora import adapter_matrices

    def install(ref: str, config: dict, tensors: dict) -> None:
        lora.load(adapter_matrices(ref, config, tensors))
        lora.unload(ref)

    from_store = []
    for ref in refs:
        start = time.perf_counter()
        stored = store.open(ref, expected_fingerprint=base.fingerprint)
        install(ref, stored.config, stored.tensors)
        from_store.append((time.perf_counter() - start) * 1000)
    result = {"store_ms": statistics.median(from_store)}
    if use_ray:
        import ray

        from madapt.serve.registry import AdapterRegistry

        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        registry = AdapterRegistry.remote(store.uri)  # type: ignore[attr-defined]  # added by @ray.remote
        for ref in refs:
            ray.get(registry.fetch.remote(ref, base.fingerprint))  # the first replica's load puts it
        from_objects = []
        for ref in refs:
            start = time.perf_counter()
            found = ray.get(registry.fetch.remote(ref, base.fingerprint))
            config, tensors = ray.get(found["object"][0])
            install(ref, config, tensors)
            from_objects.append((time.perf_counter() - start) * 1000)
        result["object_store_ms"] = statistics.median(from_objects)
        ray.kill(registry)
    return result


def main(argv: list[str]) -> int:
    import tempfile

    from madapt.data import render_prompt
    from madapt.lora import attach
    from madapt.serve.engine import Engine
    from madapt.serve.multilora import MultiLora, adapter_matrices

    args = parse_args(argv)
    counts = [int(n) for n in args.adapters.split(",")]
    unknown = sorted(set(args.popularity.split(",")) - {"uniform", "skewed", "distinct"})
    if unknown:
        raise SystemExit(f"--popularity: unknown {unknown}; choose from uniform, skewed, distinct")

    def load() -> LoadedBase:
        return load_base(args.base, dtype=getattr(torch, args.dtype), device=args.device)

    base = load()
    tokenizer = base.tokenizer
    tokenizer.padding_side = "left"
    prompts = [render_prompt(tokenizer, p) for p in PROMPTS]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    store = AdapterStore(tempfile.mkdtemp(prefix="madapt-bench-store-"))
    names = [f"bench{i}" for i in range(max(counts))]
    publish_random_adapters(store, base, names, r=args.rank, targets=args.targets.split(","))

    lora = MultiLora(base.model)
    engine = Engine(lora, tokenizer, context_length=getattr(base.model.config, "max_position_embeddings", 2048))
    slots = [lora.load(adapter_matrices(n, s.config, s.tensors)) for n in names for s in [store.open(n)]]
    cold = cold_loads(store, base, MultiLora(load().model), names[:4], use_ray=not args.no_ray)
    plain = load().model.eval()
    peft = load().model
    for name in names:
        peft = attach(peft, store.open(name))
    peft.eval()
    engine_batch(Batches(), engine, prompt_ids, [0, slots[0]], 2)  # warm-up

    print(f"setup done: cold load {cold}", file=sys.stderr, flush=True)
    setup = Setup(engine, slots, names, plain, peft, tokenizer, prompts, prompt_ids)
    runs, base_runs = [], Batches()
    for n in counts:
        runs += adapter_count_runs(args, setup, n, base_runs)
    types = type_runs(engine, store, load(), prompt_ids, args)  # after the runs above: those see no such adapters
    ranks = rank_runs(engine, store, load(), prompt_ids, args)
    report = {
        "setup": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "note": "in-process engine, no HTTP; throughput = median over interleaved batches, ratios = median of "
            "the ratios of batches run side by side in one round; "
            "naive latency = queue of measured service times",
        },
        "base_only_tok_per_s": statistics.median(base_runs.tok_per_s),
        "cold_load": cold,
        "runs": runs,
        "types": types,
        "ranks": ranks,
    }
    write_results(report, Path(args.out))
    return 0


@dataclass
class Setup:
    """What every round runs on: the engine and its adapter slots, plain transformers and PEFT's model."""

    engine: Any
    slots: list[int]
    names: list[str]
    plain: Any
    peft: Any
    tokenizer: Any
    prompts: list[str]
    prompt_ids: list[list[int]]


def adapter_count_runs(args: argparse.Namespace, setup: Setup, n: int, base_runs: Batches) -> list[dict]:
    """One row per popularity for `n` adapters: every mode's batches, interleaved round by round, and the
    paired ratios; then the naive one-adapter-at-a-time baseline on the same count."""
    engine, slots, prompt_ids = setup.engine, setup.slots, setup.prompt_ids
    tokenizer, prompts = setup.tokenizer, setup.prompts
    runs = []
    for popularity in args.popularity.split(","):
        picks = assign(n, args.concurrency * args.rounds, popularity, batch=args.concurrency)
        modes = {
            "base": Batches(),
            "hf_generate": Batches(),
            "madapt": Batches(),
            "madapt_continuous": Batches(),
            "peft_mixed": Batches(),
        }
        for r in range(args.rounds):  # interleaved, so load from other processes hits every mode alike
            chunk = picks[r * args.concurrency : (r + 1) * args.concurrency]
            engine_batch(modes["base"], engine, prompt_ids, [0] * len(chunk), args.new_tokens)
            hf_batch(modes["hf_generate"], setup.plain, tokenizer, prompts, len(chunk), args.new_tokens)
            engine_batch(modes["madapt"], engine, prompt_ids, [slots[i] for i in chunk], args.new_tokens)
            chosen = [slots[i] for i in chunk]
            continuous_batch(modes["madapt_continuous"], engine, prompt_ids, chosen, args.new_tokens)
            chosen_names = [setup.names[i] for i in chunk]
            peft_batch(modes["peft_mixed"], setup.peft, tokenizer, prompts, chosen_names, args.new_tokens)
        base_runs.tok_per_s += modes["base"].tok_per_s
        row = {"adapters": n, "popularity": popularity, "distinct": len(set(picks[: args.concurrency]))}
        row |= {mode: batches.summary() for mode, batches in modes.items()}
        hf = modes["hf_generate"]
        row |= {"vs_hf": paired(modes["madapt"], hf), "base_vs_hf": paired(modes["base"], hf)}
        row |= {"continuous_vs_hf": paired(modes["madapt_continuous"], hf)}
        row |= {"vs_base": paired(modes["madapt"], modes["base"])}
        row |= {"peft_vs_base": paired(modes["peft_mixed"], modes["base"])}
        runs.append(row)
        tok = {mode: f"{batches.summary()['tok_per_s']:.1f}" for mode, batches in modes.items()}
        print(f"{n} adapters, {popularity}: tok/s {tok}", file=sys.stderr, flush=True)
    picks = assign(n, args.naive_requests, "uniform")
    chosen_names = [setup.names[i] for i in picks]
    baseline = naive(setup.peft, tokenizer, prompts, chosen_names, args.concurrency, args.new_tokens)
    for row in runs:
        row |= {"naive": baseline, "vs_naive": row["madapt"]["tok_per_s"] / baseline["tok_per_s"]}
    return runs


def write_results(report: dict, out: Path) -> None:
    setup = report["setup"]
    lines = [
        f"# madapt bench serve ({setup['date']}, {setup['machine']})",
        "",
        f"{setup['base']}, batch {setup['concurrency']}, {setup['new_tokens']} new tokens, random r={setup['rank']} "
        f"adapters on {setup['targets']}. Base only: {report['base_only_tok_per_s']:.1f} tok/s. Cold adapter load: "
        + ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in report["cold_load"].items()),
        "",
        "| adapters (distinct in batch) | popularity | HF generate (base) tok/s | engine base tok/s | x HF "
        "| madapt static tok/s | x HF | madapt continuous tok/s | x HF | x base | x naive | PEFT mixed tok/s "
        "| PEFT x base | naive tok/s | madapt req/s | p50 / p99 s | TTFT p50 s | naive p50 / p99 s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in report["runs"]:
        m, b, v = r["madapt"], r["base"], r["naive"]
        lines.append(
            f"| {r['adapters']} ({r['distinct']}) | {r['popularity']} | {r['hf_generate']['tok_per_s']:.1f} "
            f"| {b['tok_per_s']:.1f} | {r['base_vs_hf']:.2f} | {m['tok_per_s']:.1f} | {r['vs_hf']:.2f} "
            f"| {r['madapt_continuous']['tok_per_s']:.1f} | {r['continuous_vs_hf']:.2f} "
            f"| {r['vs_base']:.2f} | {r['vs_naive']:.1f} | {r['peft_mixed']['tok_per_s']:.1f} "
            f"| {r['peft_vs_base']:.2f} "
            f"| {v['tok_per_s']:.1f} | {m['req_per_s']:.2f} | {m['p50_s']:.2f} / {m['p99_s']:.2f} "
            f"| {m['ttft_p50_s']:.3f} | {v['p50_s']:.1f} / {v['p99_s']:.1f} |"
        )
    if report.get("types"):
        lines += [
            "",
            "Per adapter type (all rows on one adapter of the type; mixed: half its rows, half plain LoRA), "
            "beside base-only batches of the same rounds:",
            "",
            "| type | path | tok/s | x base | mixed with LoRA tok/s | x base | base tok/s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for t in report["types"]:
            lines.append(
                f"| {t['type']} | {t['path']} | {t['alone_tok_per_s']:.1f} | {t['alone_vs_base']:.2f} "
                f"| {t['with_lora_tok_per_s']:.1f} | {t['with_lora_vs_base']:.2f} | {t['base_tok_per_s']:.1f} |"
            )
    if report.get("ranks"):
        lines += ["", *rank_lines(report["ranks"], report["setup"]["concurrency"])]
    lines += ["", report["setup"]["note"], ""]
    save_report(out, "serve", report, lines)
    chart(report, out / "serve.png")


def rank_lines(ranks: dict, concurrency: int) -> list[str]:
    r, m, kib = ranks["rank"], ranks["merge_rank"], {k: v / 1024 for k, v in ranks["bytes"].items()}
    return [
        f"Rank-{r} rows beside one rank-{m} merge of {ranks['merge_sources']} of them (batch {concurrency}, the "
        f"continuous batcher; tok/s of the {ranks['counted_rows']} rank-{r} rows; factors held: a rank-{r} adapter "
        f"{kib['own']:.0f} KiB, padded to rank {m} {kib['padded']:.0f} KiB, the merge {kib['merge']:.0f} KiB):",
        "",
        f"| batch | rank-{r} rows' tok/s | x without the merge |",
        "|---|---:|---:|",
        f"| rank-{r} rows only | {ranks['alone_tok_per_s']:.1f} | 1.00 |",
        f"| with the merge's row, each row at its own rank | {ranks['with_merge_tok_per_s']:.1f} "
        f"| {ranks['with_merge_vs_alone']:.2f} |",
        f"| with the merge's row, every row at rank {m} (padded, as before) | {ranks['padded_tok_per_s']:.1f} "
        f"| {ranks['padded_vs_alone']:.2f} |",
    ]


def chart(report: dict, path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    runs = sorted(
        (r for r in report["runs"] if r["popularity"] == report["runs"][0]["popularity"]), key=lambda r: r["adapters"]
    )
    labels = [str(r["adapters"]) for r in runs]
    series = {
        "madapt mixed batch": [r["madapt"]["tok_per_s"] for r in runs],
        "madapt continuous": [r["madapt_continuous"]["tok_per_s"] for r in runs],
        "PEFT mixed batch": [r["peft_mixed"]["tok_per_s"] for r in runs],
        "naive set_adapter": [r["naive"]["tok_per_s"] for r in runs],
    }
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        axis.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    axis.axhline(report["base_only_tok_per_s"], color="black", linestyle="--", label="base only (engine)")
    hf = statistics.median(r["hf_generate"]["tok_per_s"] for r in runs)
    axis.axhline(hf, color="grey", linestyle=":", label="base only (HF generate)")
    axis.set_xticks([x + width for x in range(len(labels))], labels)
    axis.set_xlabel(f"distinct adapters in the batch ({runs[0]['popularity']} popularity)")
    axis.set_ylabel("output tokens / s")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
