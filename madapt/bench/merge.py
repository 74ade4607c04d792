"""`madapt bench merge`: merge time of two r=16 adapters on an 8B-shaped Llama, PEFT vs madapt, one run.

Pairs, each timed end to end (adapter tensors in, merged tensors out) on the same random LoRA weights:
  svd:    PEFT's `svd` (dense SVD of every d_out x d_in delta) vs madapt's low-rank SVD (QR of the factors)
  linear: PEFT's `linear` (inexact: cross terms) vs madapt's `exact_linear` (exact weighted delta sum)
for q,v and for every linear layer. No base weights are needed: the adapters' shapes are those of
Llama-3.1-8B (4096 hidden, 14336 intermediate, 8 KV heads of 128). PEFT's dense SVD takes seconds to
minutes per module on a CPU, so it is timed on one module of each distinct shape and extrapolated to all
modules; the output says so. Singular values are compared on the modules both ran.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import peft
import torch

from madapt.bench import save_report
from madapt.config import CombinationType
from madapt.lora import PEFT_PREFIX
from madapt.lowrank import truncated_svd
from madapt.merge import Engine, MergeSpec, merge_adapters
from madapt.store import Manifest, StoredAdapter

RESULTS = Path("benchmarks/results")


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Llama that matter to LoRA: (d_out, d_in) of every projection."""

    hidden: int
    intermediate: int
    kv_dim: int
    layers: int

    def modules(self, which: str) -> dict[str, tuple[int, int]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        attention = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
        mlp = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        if which == "qv":
            return {"q_proj": attention["q_proj"], "v_proj": attention["v_proj"]}
        return attention | mlp

    def samples(self, which: str) -> dict[str, int]:
        """One module per distinct (d_out, d_in), with how many modules of a layer have that shape."""
        counts: dict[tuple[int, int], list[str]] = {}
        for module, dims in self.modules(which).items():
            counts.setdefault(dims, []).append(module)
        return {names[0]: len(names) for names in counts.values()}


LLAMA_8B = Shape(hidden=4096, intermediate=14336, kv_dim=1024, layers=32)
SMALL = Shape(hidden=128, intermediate=320, kv_dim=32, layers=2)


def _block(module: str) -> str:
    return "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"


def random_adapter(shape: Shape, which: str, *, name: str, r: int, layers: int, seed: int) -> StoredAdapter:
    """Random A and B (as after training, B is not zero), keyed as PEFT saves a Llama adapter."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, (d_out, d_in) in shape.modules(which).items():
            prefix = f"{PEFT_PREFIX}model.layers.{layer}.{_block(module)}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, d_in, generator=generator) / d_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, r, generator=generator) / r**0.5
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": sorted(shape.modules(which)),
        "base_model_name_or_path": "llama-8b-shaped",
    }
    modules = sorted(shape.modules(which))
    manifest = Manifest(name, 1, "llama-8b-shaped", "random", r, 2 * r, modules, files={})
    return StoredAdapter(manifest=manifest, config=config, tensors=tensors)


def one_module(adapter: StoredAdapter, module: str) -> StoredAdapter:
    """The same adapter restricted to `module` of layer 0."""
    prefix = f"{PEFT_PREFIX}model.layers.0.{_block(module)}.{module}."
    tensors = {k: v for k, v in adapter.tensors.items() if k.startswith(prefix)}
    return StoredAdapter(adapter.manifest, {**adapter.config, "target_modules": [module]}, tensors)


def factors(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(B, scale * A) per module in float64, so B @ A is the module's delta W."""
    scale = config["lora_alpha"] / config["r"]
    return {
        k.removesuffix(".lora_A.weight"): (tensors[k.replace("lora_A", "lora_B")].double(), scale * v.double())
        for k, v in tensors.items()
        if k.endswith(".lora_A.weight")
    }


def singular_values(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each module's top-r singular values of delta W, from the factors (exact, no dense matrix)."""
    return {m: truncated_svd(b, a, config["r"])[2][: config["r"]] for m, (b, a) in factors(config, tensors).items()}


def relative_error(merged: tuple[dict, dict], sources: list[StoredAdapter], weights: tuple[float, ...]) -> float:
    """Worst module's ||delta W_merged - sum_i w_i delta W_i||_F / ||sum_i w_i delta W_i||_F, from factors:
    ||B A||_F^2 = sum((B^T B) * (A A^T)), so no d_out x d_in matrix is formed."""

    def fro(b, a):
        return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())

    per_source = [factors(s.config, s.tensors) for s in sources]
    worst = 0.0
    for module, (b, a) in factors(*merged).items():
        ref_b = torch.cat([f[module][0] for f in per_source], dim=1)
        ref_a = torch.cat([w * f[module][1] for w, f in zip(weights, per_source, strict=True)], dim=0)
        diff = fro(torch.cat([b, -ref_b], dim=1), torch.cat([a, ref_a], dim=0))
        worst = max(worst, diff / fro(ref_b, ref_a))
    return worst


def timed(function, repeat: int = 1):
    """(result, best wall time of `repeat` calls): the best run is the least disturbed by other load."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return result, min(times)


def run(shape: Shape, which: str, *, r: int, layers: int, repeat: int, weights=(0.7, 0.3)) -> list[dict]:
    """Both pairs for one module set. PEFT's dense svd is timed once on one module of each distinct shape
    and scaled by how many modules of all layers share that shape; the rest is timed on every layer."""
    sources = [random_adapter(shape, which, name=n, r=r, layers=layers, seed=i) for i, n in enumerate("ab")]

    def spec(combination_type: CombinationType, engine: Engine = "madapt") -> MergeSpec:
        return MergeSpec("merged", ("a", "b"), weights, combination_type, engine=engine)

    fast, fast_s = timed(lambda: merge_adapters(sources, spec("svd")), repeat)
    fast_values = singular_values(*fast)
    peft_svd_s, abs_error, rel_error = 0.0, 0.0, 0.0
    for module, count in shape.samples(which).items():
        sample = [one_module(s, module) for s in sources]
        dense, dense_s = timed(lambda sample=sample: merge_adapters(sample, spec("svd", "peft")))
        peft_svd_s += dense_s * count * layers
        for name, values in singular_values(*dense).items():
            abs_error = max(abs_error, float((fast_values[name] - values).abs().max()))
            rel_error = max(rel_error, float((fast_values[name] - values).abs().max() / values[0]))

    linear, linear_s = timed(lambda: merge_adapters(sources, spec("linear", "peft")), repeat)
    exact, exact_s = timed(lambda: merge_adapters(sources, spec("exact_linear")), repeat)
    modules = ",".join(m.removesuffix("_proj") for m in shape.modules(which))
    return [
        {
            "modules": modules,
            "merge": "svd",
            "peft": "svd (dense SVD)",
            "madapt": "svd (low-rank SVD)",
            "peft_s": peft_svd_s,
            "peft_timed_on": [f"layers.0.{m}" for m in shape.samples(which)],
            "madapt_s": fast_s,
            "speedup": peft_svd_s / fast_s,
            "max_singular_value_abs_error": abs_error,
            "max_singular_value_rel_error": rel_error,
        },
        {
            "modules": modules,
            "merge": "linear",
            "peft": "linear",
            "madapt": "exact_linear",
            "peft_s": linear_s,
            "peft_timed_on": "all",
            "madapt_s": exact_s,
            "speedup": linear_s / exact_s,
            "peft_rel_error": relative_error(linear, sources, weights),
            "madapt_rel_error": relative_error(exact, sources, weights),
        },
    ]


NOTE = (
    "PEFT svd (default full_matrices SVD) is timed once on one module of each distinct shape (layer 0) and "
    "extrapolated by the number of modules of that shape in all layers; every other time is the best of "
    "--repeat runs over all layers."
)


def markdown(rows: list[dict], *, r: int, layers: int) -> str:
    lines = [
        f"Two r={r} adapters, weights 0.7/0.3, {layers} layers; merge time end to end (adapter tensors in, "
        f"merged tensors out). {NOTE}",
        "",
        "| modules | PEFT | madapt | PEFT s | madapt s | speedup | accuracy |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        if row["merge"] == "svd":
            accuracy = f"singular values: max error {row['max_singular_value_rel_error']:.1e} (relative to the top one)"
            peft_s = f"{row['peft_s']:.1f} (extrapolated)"
        else:
            accuracy = f"delta W error: PEFT {row['peft_rel_error']:.2f}, madapt {row['madapt_rel_error']:.1e}"
            peft_s = f"{row['peft_s']:.3f}"
        lines.append(
            f"| {row['modules']} | {row['peft']} | {row['madapt']} | {peft_s} | {row['madapt_s']:.3f} "
            f"| {row['speedup']:,.0f}x | {accuracy} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="madapt bench merge", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny Llama shape (seconds; for tests)")
    parser.add_argument("--layers", type=int, help="layers to merge (default: all of the shape)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modules", choices=["qv", "all", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing except PEFT svd; the best counts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    shape = SMALL if args.small else LLAMA_8B
    layers = args.layers or shape.layers
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():  # scoped: a caller in the same process (a test run) keeps autograd
        run(SMALL, "qv", r=args.rank, layers=1, repeat=1)  # warm-up: LAPACK and PEFT first-call costs
        for which in ["qv", "all"] if args.modules == "both" else [args.modules]:
            rows += run(shape, which, r=args.rank, layers=layers, repeat=args.repeat)
            print(markdown(rows[-2:], r=args.rank, layers=layers), flush=True)
    name = "-".join(["merge", *(["small"] if args.small else []), *([args.modules] if args.modules != "both" else [])])
    result = {
        "shape": {**shape.__dict__, "layers": layers},
        "rank": args.rank,
        "rows": rows,
        "note": NOTE,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "peft": peft.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    save_report(args.out, name, result, [markdown(rows, r=args.rank, layers=layers)])
    return 0
