"""`madapt bench gpu` (what scripts/gpu_check.sh runs): the figures only a GPU gives, in one short run.

1. Train one adapter through Ray Train (1 GPU worker, NCCL, bf16) on a Llama-3.2-1B-shaped model with
   random weights: tokens/s and model FLOPs utilisation.
2. The same with `quantization: {bits: 4}` (QLoRA, bitsandbytes NF4): tokens/s and peak GPU memory vs bf16.
3. Serve 8 and 32 adapters from one engine (`madapt bench serve`): base vs mixed adapters vs naive switching.
4. Serve on a 4-bit base (`quantization: {bits: 4}`, the replica's `load_engine`): a batch of adapter rows
   and base rows, token for token against PEFT's own `generate` on the same 4-bit base, and its tokens/s.
5. Write gpu.json and gpu.md with the GPU name, versions and date.

`--dry-run` runs every step on the CPU with a tiny model, so the test suite keeps the script from rotting.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from madapt.bench import save_report
from madapt.config import parse_config
from madapt.store import AdapterStore

RESULTS = Path("benchmarks/results/gpu")
DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "coding.jsonl"
LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}
"""Dense bf16 tensor-core peaks from the vendors' data sheets, by a substring of the device name."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="madapt bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few steps: checks the script only")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 200; dry 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", default=None, help=f"results directory (default {RESULTS}; dry run: a temp dir)")
    return p.parse_args(argv)


def build_random_llama(target: Path, shape: dict, device: str) -> int:
    """Save a Llama of the given shape with random weights and the embedded SmolLM2 tokenizer (bf16
    safetensors) to `target`; return its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from madapt.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def train_run(model_dir: Path, workdir: Path, args: argparse.Namespace, *, bits: int | None, gpu: bool) -> dict:
    from madapt.train.distributed import train_ray

    name = "qlora" if bits else "bf16" if gpu else "fp32"
    config = parse_config(
        {
            "base_model": str(model_dir),
            "adapters": {"adapters": {name: {"r": 16, "alpha": 32, "dropout": 0.0, "dataset": str(DATA)}}},
            "trainer": {"batch_size": args.batch_size, "max_steps": args.steps, "max_length": args.max_length},
            **({"quantization": {"bits": bits}} if bits else {}),
            "storage": {"uri": str(workdir / "store")},
            "backend": {
                "trainer": {
                    "num_workers": 1,
                    "use_gpu": gpu,
                    "strategy": "ddp",
                    "storage_path": str(workdir / "runs"),
                    "checkpoint_every": args.steps,
                }
            },
        }
    )
    metrics = train_ray(config, name, AdapterStore(str(workdir / "store"))).metrics
    return {
        "run": name,
        "tokens_per_s": metrics["tokens_per_s"],
        "wall_s": metrics["wall_s"],
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "peak_gpu_gb": metrics.get("peak_gpu_bytes", 0) / 1e9 or None,
    }


def model_flops_utilisation(tokens_per_s: float, params: int, device_name: str) -> float | None:
    """LoRA training costs ~4N FLOPs a token (forward 2N + activation gradients 2N; the frozen base needs
    no weight gradients); MFU is that over the GPU's dense bf16 peak."""
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)
    return tokens_per_s * 4 * params / peak if peak else None


@torch.inference_mode()
def quantized_serving(model_dir: Path, device: str, dtype: str, new_tokens: int = 16) -> dict:
    """Step 4: the replica's engine on a 4-bit base on `device`, 8 rows (4 on a random adapter, 4 on the
    base) against PEFT's greedy `generate` on its own 4-bit load of the same base, row by row."""
    from madapt.lora import attach, publish_random
    from madapt.models import load_base
    from madapt.serve.args import ServeArgs
    from madapt.serve.engine import Row
    from madapt.serve.loading import load_engine
    from madapt.serve.multilora import BASE_SLOT, adapter_matrices

    store = AdapterStore(tempfile.mkdtemp(prefix="madapt-gpu-q4-"))
    publish_random(store, load_base(str(model_dir)), "q4", r=16, seed=0, targets=["q_proj", "v_proj"])
    settings = ServeArgs(
        base_model=str(model_dir), store=store.uri, device=device, dtype=dtype, quantization={"bits": 4}
    )
    base, engine = load_engine(settings)
    stored = store.open("q4@1")
    slot = engine.lora.load(adapter_matrices(stored.ref, stored.config, stored.tensors))
    ids = base.tokenizer("Write a function that adds two numbers", add_special_tokens=False).input_ids
    engine.generate([Row(ids, slot, max_tokens=2), Row(ids, BASE_SLOT, max_tokens=2)])  # warm-up
    rows = [Row(ids, slot if i % 2 else BASE_SLOT, max_tokens=new_tokens) for i in range(8)]
    start = time.perf_counter()
    engine.generate(rows)
    seconds = time.perf_counter() - start
    peft = attach(
        load_base(str(model_dir), dtype=getattr(torch, dtype), quantization_bits=4, device=device).model, stored
    ).eval()
    inputs = {"input_ids": torch.tensor([ids], device=device), "max_new_tokens": new_tokens, "do_sample": False}
    inputs["pad_token_id"] = base.tokenizer.pad_token_id
    adapted = peft.generate(**inputs)[0, len(ids) :].tolist()
    with peft.disable_adapter():
        plain = peft.generate(**inputs)[0, len(ids) :].tolist()
    expected = {slot: adapted, BASE_SLOT: plain}
    return {
        "rows": len(rows),
        "rows_equal_to_peft": sum(row.ids == expected[row.slot][: len(row.ids)] for row in rows),
        "adapter_changes_tokens": adapted != plain,
        "tokens_per_s": sum(len(row.ids) for row in rows) / seconds,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run")
    args.steps = args.steps or (200 if gpu else 3)
    if args.dry_run:
        args.max_length = min(args.max_length, 64)
    out = Path(args.out or (RESULTS if gpu else tempfile.mkdtemp(prefix="madapt-gpu-dry-")))
    workdir = Path(tempfile.mkdtemp(prefix="madapt-bench-gpu-"))
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({platform.machine()}, dry run)"

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8 if not gpu else None, log_to_driver=False)
    shape = LLAMA_3_2_1B if gpu else TINY
    model_dir = workdir / "model"
    params = build_random_llama(model_dir, shape, "cuda" if gpu else "cpu")
    runs = [train_run(model_dir, workdir, args, bits=bits, gpu=gpu) for bits in (None, 4)]
    for run in runs:
        run["mfu"] = model_flops_utilisation(run["tokens_per_s"], params, device_name)
    runs[1]["tokens_per_s_vs_bf16"] = runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]
    if runs[0]["peak_gpu_gb"] and runs[1]["peak_gpu_gb"]:
        runs[1]["peak_memory_vs_bf16"] = runs[1]["peak_gpu_gb"] / runs[0]["peak_gpu_gb"]

    from madapt.bench import serve as serve_bench

    serve_args = ["--base", "smollm2-135m" if gpu else str(model_dir), "--out", str(out), "--no-ray"]
    serve_args += ["--adapters", "8,32", "--device", "cuda", "--dtype", "bfloat16"] if gpu else ["--adapters", "2"]
    if not gpu:
        serve_args += ["--concurrency", "4", "--new-tokens", "2", "--rounds", "1", "--naive-requests", "2"]
        serve_args += ["--popularity", "uniform"]
    serve_bench.main(serve_args)
    quantized = quantized_serving(model_dir, "cuda" if gpu else "cpu", "bfloat16" if gpu else "float32")
    report = {
        "setup": {
            "device": device_name,
            "dry_run": args.dry_run,
            "train_model": f"Llama-3.2-1B-shaped, random weights, {params / 1e9:.2f} B params" if gpu else "tiny",
            "steps": args.steps,
            "batch": f"{args.batch_size} x {args.max_length} tokens",
            "versions": {"torch": torch.__version__, "ray": ray.__version__, "cuda": torch.version.cuda},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "train": runs,
        "serve": json.loads((out / "serve.json").read_text()),
        "quantized_serving": quantized,
    }
    write_results(report, out)
    print(f"results: {out / 'gpu.json'}, {out / 'gpu.md'}")
    return 0


def write_results(report: dict, out: Path) -> None:
    setup = report["setup"]
    lines = [
        f"GPU check on {setup['device']}, {setup['date']}; {setup['train_model']}, {setup['steps']} steps of "
        f"{setup['batch']}; versions {setup['versions']}.",
        "",
        "| training run | tokens/s | MFU | peak GPU memory | vs bf16 |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for run in report["train"]:
        mfu = f"{run['mfu']:.1%}" if run.get("mfu") else "-"
        memory = f"{run['peak_gpu_gb']:.2f} GB" if run.get("peak_gpu_gb") else "-"
        ratio = ""
        if "tokens_per_s_vs_bf16" in run:
            ratio = f"{run['tokens_per_s_vs_bf16']:.2f}x tokens/s"
            if "peak_memory_vs_bf16" in run:
                ratio += f", {run['peak_memory_vs_bf16']:.2f}x memory"
        lines.append(f"| {run['run']} | {run['tokens_per_s']:.0f} | {mfu} | {memory} | {ratio} |")
    q = report["quantized_serving"]
    lines += [
        "",
        f"Serving on a 4-bit base (bitsandbytes NF4, the replica's `load_engine`): {q['rows_equal_to_peft']} of "
        f"{q['rows']} rows (half on a random adapter, half on the base) token for token PEFT's own greedy "
        f"`generate` on the same 4-bit base (the adapter changes the tokens: {q['adapter_changes_tokens']}); "
        f"{q['tokens_per_s']:.0f} tokens/s for the batch.",
        "",
        "Serving: see serve.md beside this file.",
    ]
    save_report(out, "gpu", report, lines)
