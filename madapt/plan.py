"""How many GPUs of which memory a LoRA training run and a Serve replica need, before renting them.

Memory is counted from the architecture's shape, in decimal GB (1 GB = 1e9 bytes, as model cards
quote sizes): base weights (bf16, or NF4 4-bit as QLoRA loads them), LoRA parameters, their gradients
and Adam state, activations for one micro-batch, and a fixed per-GPU overhead. Shapes come from a
table of known Llama-family bases, or from the `config.json` of a local model directory.

A pack (`madapt train --pack`) is sized the same way with every adapter's LoRA state and the rows of one
pack forward; a pack larger than a worker is split into packs that fit before training (`split_packs`).

The estimates are deliberately simple, and match published figures (tests/test_plan.py): they
size node types, they do not predict the allocator to the megabyte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from madapt.config import Config, LoraAdapterConfig, RayTrainerConfig, TrainerConfig
from madapt.errors import UserError


class PlanError(UserError, ValueError):
    """A base model `plan` cannot size (unknown name, a config.json without the sizes, unknown modules); named.
    Its own error, not models.ModelError: `madapt plan` answers without importing torch or transformers."""


GB = 1e9
BF16 = 2
NF4_LINEAR = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per 4-bit weight with bitsandbytes' double quantisation: 4 bits, an 8-bit absmax per 64
weights, and an fp32 scale per 256 absmax blocks."""
LORA_TRAIN = 4 + 4 + 8
"""Bytes per trainable LoRA parameter: fp32 weight, fp32 gradient, Adam's two fp32 moments."""
LOGITS_PER_VOCAB = 2 + 4 + 4
"""Bytes per token and vocabulary entry: bf16 logits, their fp32 upcast for the loss, its gradient."""
GPU_OVERHEAD = 1.5 * GB
"""CUDA context, cuBLAS/NCCL workspaces and allocator slack on every GPU."""
USABLE = 0.9
"""Share of a GPU's memory a plan may fill; the rest absorbs fragmentation."""
WORKER_COUNTS = (1, 2, 4, 8, 16, 32, 64)

GPUS = {
    "A10G 24GB / L4 24GB": 24 * 2**30,
    "A100 40GB": 40 * 2**30,
    "A100 / H100 80GB": 80 * 2**30,
    "H200 141GB": 141 * GB,
}
"""GPU memory as vendors state it (GiB, except the H200's 141 GB)."""


@dataclass(frozen=True)
class Architecture:
    """A decoder-only Llama-style transformer's shape: all a memory estimate needs."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_embeddings: bool
    head_dim: int = 0

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each adaptable projection in one decoder layer, by PEFT module name."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_kv_heads
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv * self.head_dim),
            "v_proj": (h, kv * self.head_dim),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus an untied output head; these stay bf16 when the rest is 4-bit."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def params(self) -> int:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.num_layers * self.layer_linear_params + self.embedding_params + norms

    def weight_bytes(self, bits: int) -> float:
        """Base weights in bf16 (16) or with decoder linears in NF4 (4), as bitsandbytes loads them."""
        if bits == 16:
            return self.params * BF16
        linear = self.num_layers * self.layer_linear_params
        return linear * NF4_LINEAR + (self.params - linear) * BF16

    def lora_params(self, r: int, target_modules: list[str]) -> int:
        shapes = self.linear_shapes()
        unknown = [m for m in target_modules if m not in shapes]
        if unknown:
            raise PlanError(f"{self.name}: cannot size target_modules {unknown}; known: {list(shapes)}")
        return self.num_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in target_modules)

    def activation_bytes_per_token(self) -> float:
        """bf16 tensors autograd keeps per token without gradient checkpointing: per layer the norm,
        attention and SwiGLU inputs and outputs (~6h + 2·kv·d + 4i values), plus the logits."""
        per_layer = 6 * self.hidden_size + 2 * self.num_kv_heads * self.head_dim + 4 * self.intermediate_size
        return self.num_layers * per_layer * BF16 + self.vocab_size * LOGITS_PER_VOCAB

    def kv_cache_bytes_per_token(self) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * BF16


def _llama(name, hidden, inter, layers, heads, kv, vocab, tied, head_dim=0) -> Architecture:
    return Architecture(name, hidden, inter, layers, heads, kv, vocab, tied, head_dim)


KNOWN = {
    arch.name.lower(): arch
    for arch in (
        _llama("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False),
        _llama("meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False),
        _llama("meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, True, 64),
        _llama("meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, True, 128),
        _llama("HuggingFaceTB/SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True, 64),
    )
}
"""Published config.json shapes of the bases madapt documents; -Instruct variants share them."""
ALIASES = {"smollm2-135m": "huggingfacetb/smollm2-135m"}
"""Embedded base_model names (models.EMBEDDED_MODELS) and the hub model they ship."""


def architecture(base_model: str) -> Architecture:
    """The shape of `base_model`: a local directory's config.json, else the table of known bases."""
    path = Path(base_model).expanduser()
    if (path / "config.json").is_file():
        return _from_config_json(path / "config.json", base_model)
    key = base_model.lower().removesuffix("-instruct")
    key = ALIASES.get(key, key)
    matches = [arch for name, arch in KNOWN.items() if name == key or name.rsplit("/", 1)[-1] == key]
    if not matches:
        known = sorted(a.name for a in KNOWN.values())
        raise PlanError(
            f"plan: unknown base_model {base_model!r}; known: {known}, or a local directory with config.json"
        )
    return matches[0]


def _from_config_json(path: Path, name: str) -> Architecture:
    data = json.loads(path.read_text(encoding="utf-8"))
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in keys if not isinstance(data.get(k), int)]
    if missing:
        raise PlanError(f"plan: {path} lacks {missing}; only Llama-style decoder configs can be sized")
    return Architecture(
        name=name,
        hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"],
        num_layers=data["num_hidden_layers"],
        num_heads=data["num_attention_heads"],
        num_kv_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
        vocab_size=data["vocab_size"],
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        head_dim=data.get("head_dim") or 0,
    )


@dataclass(frozen=True)
class AdapterShape:
    name: str
    r: int
    target_modules: list[str]


@dataclass
class Estimate:
    """Bytes per GPU by component, and the GPU kinds it fits on."""

    parts: dict[str, float]
    gpus: int = 1

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= USABLE * gpu_bytes


@dataclass
class Plan:
    arch: Architecture
    adapters: list[AdapterShape]
    batch_size: int
    max_length: int
    strategy: str
    concurrency: int
    context: int
    training: dict[int, Estimate] = field(default_factory=dict)
    """Per-GPU estimate for the configured worker count, keyed by bits (16 or 4)."""
    serving: dict[int, Estimate] = field(default_factory=dict)
    fewest_gpus: dict[int, dict[str, int | None]] = field(default_factory=dict)
    """bits -> GPU kind -> fewest FSDP workers that fit (None: not even 64)."""
    pack_names: list[str] = field(default_factory=list)
    pack_rows: int = 0
    """Rows of one pack forward: every adapter's micro-batch, or the row cap (backend.trainer.pack_max_rows)."""
    pack: dict[int, Estimate] = field(default_factory=dict)
    """Per-GPU estimate of every declared adapter trained as one pack (`madapt train --pack`), keyed by bits."""
    pack_fewest: dict[int, dict[str, int | None]] = field(default_factory=dict)


def training_estimate(
    arch: Architecture, lora_params: int, *, bits: int, workers: int, strategy: str, tokens: int
) -> Estimate:
    """Per-GPU memory of one LoRA training run: FSDP and DeepSpeed stage 3 shard weights and LoRA state
    over `workers`, DeepSpeed stage 2 shards the LoRA state only, DDP shards nothing."""
    weight_shards = workers if strategy in ("fsdp", "deepspeed3") else 1
    state_shards = workers if strategy in ("fsdp", "deepspeed3", "deepspeed2") else 1
    parts = {
        "base weights": arch.weight_bytes(bits) / weight_shards,
        "LoRA weights + grads + Adam": lora_params * LORA_TRAIN / state_shards,
        "activations": arch.activation_bytes_per_token() * tokens,
        "overhead": GPU_OVERHEAD,
    }
    if weight_shards > 1:
        # FSDP gathers one layer while prefetching the next.
        parts["FSDP gather buffers"] = 2 * arch.weight_bytes(bits) / arch.num_layers
    return Estimate(parts, gpus=workers)


def serving_estimate(arch: Architecture, adapter_params: int, *, bits: int, concurrency: int, context: int) -> Estimate:
    """One replica on one GPU: the base, every adapter resident in bf16, a KV cache for `concurrency`
    sequences of `context` tokens, and the overhead."""
    return Estimate(
        {
            "base weights": arch.weight_bytes(bits),
            "adapters (bf16, all resident)": adapter_params * BF16,
            "KV cache": arch.kv_cache_bytes_per_token() * concurrency * context,
            "overhead": GPU_OVERHEAD,
        }
    )


def make_plan(
    arch: Architecture,
    adapters: list[AdapterShape],
    *,
    batch_size: int,
    max_length: int,
    workers: int,
    strategy: str,
    concurrency: int = 16,
    context: int = 2048,
) -> Plan:
    """Training runs one adapter at a time (the largest sets the need); a replica holds them all."""
    plan = Plan(arch, adapters, batch_size, max_length, strategy, concurrency, context)
    sizes = [arch.lora_params(a.r, a.target_modules) for a in adapters]
    tokens = batch_size * max_length
    for bits in (16, 4):
        plan.training[bits] = training_estimate(
            arch, max(sizes), bits=bits, workers=workers, strategy=strategy, tokens=tokens
        )
        plan.serving[bits] = serving_estimate(arch, sum(sizes), bits=bits, concurrency=concurrency, context=context)
        plan.fewest_gpus[bits] = {
            gpu: fewest_workers(arch, max(sizes), bits=bits, tokens=tokens, gpu_bytes=memory)
            for gpu, memory in GPUS.items()
        }
    return plan


def plan_pack(plan: Plan, names: list[str], rows: int) -> None:
    """Size adapters `names` as one pack: one base, every adapter's LoRA state, `rows` rows a forward."""
    sizes = [plan.arch.lora_params(a.r, a.target_modules) for a in plan.adapters if a.name in names]
    plan.pack_names, plan.pack_rows = names, rows
    tokens = rows * plan.max_length
    for bits in (16, 4):
        plan.pack[bits] = training_estimate(
            plan.arch, sum(sizes), bits=bits, workers=plan.training[bits].gpus, strategy=plan.strategy, tokens=tokens
        )
        plan.pack_fewest[bits] = {
            gpu: fewest_workers(plan.arch, sum(sizes), bits=bits, tokens=tokens, gpu_bytes=memory)
            for gpu, memory in GPUS.items()
        }


def pack_rows(config: Config, adapters: int) -> int:
    """Rows one forward of a pack of `adapters` holds: every lane's micro-batch, up to the row cap
    (backend.trainer.pack_max_rows, else PackTrainer's default: 4 lane batches on a GPU, 1 on a CPU)."""
    batch = config.trainer.batch_size
    return min(
        adapters * batch, config.backend.trainer.pack_max_rows or (4 if config.backend.trainer.use_gpu else 1) * batch
    )


def fewest_workers(arch: Architecture, lora_params: int, *, bits: int, tokens: int, gpu_bytes: float) -> int | None:
    """The fewest FSDP workers whose per-GPU share fits `gpu_bytes`; None if even the most do not."""
    for workers in WORKER_COUNTS:
        estimate = training_estimate(arch, lora_params, bits=bits, workers=workers, strategy="fsdp", tokens=tokens)
        if estimate.fits(gpu_bytes):
            return workers
    return None


def adapter_shapes(config: Config) -> list[AdapterShape]:
    """Every adapter a replica will hold: the declared ones and the merge (its rank is the sum of the
    sources' for `cat`, else the largest source's, as PEFT builds it)."""
    shapes = [AdapterShape(n, a.r, a.target_modules or ["q_proj", "v_proj"]) for n, a in config.named_adapters.items()]
    merge = config.merge
    if merge is not None:
        sources = [s for s in shapes if s.name in merge.sources]
        r = sum(s.r for s in sources) if merge.combination_type == "cat" else max(s.r for s in sources)
        modules = sorted({m for s in sources for m in s.target_modules})
        shapes.append(AdapterShape(merge.name, r, modules))
    return shapes


def plan_for_config(config: Config, *, concurrency: int = 16, context: int = 2048) -> Plan:
    """The config's plan, with its declared adapters also sized as one pack."""
    plan = make_plan(
        architecture(config.base_model),
        adapter_shapes(config),
        batch_size=config.trainer.batch_size,
        max_length=config.trainer.max_length,
        workers=worker_count(config),
        strategy=worker_strategy(config),
        concurrency=concurrency,
        context=context,
    )
    plan_pack(plan, list(config.named_adapters), pack_rows(config, len(config.named_adapters)))
    return plan


def worker_count(config: Config) -> int:
    return 1 if config.backend.type == "local" else config.backend.trainer.num_workers


def worker_strategy(config: Config) -> str:
    backend: RayTrainerConfig = config.backend.trainer
    if config.backend.type == "local":
        return "ddp"
    return f"deepspeed{backend.deepspeed_stage}" if backend.strategy == "deepspeed" else backend.strategy or "ddp"


def plan_for_base(base_model: str, *, concurrency: int = 16, context: int = 2048) -> Plan:
    """Defaults of an adapter and trainer section that names nothing but the base."""
    adapter, trainer = LoraAdapterConfig(), TrainerConfig()
    return make_plan(
        architecture(base_model),
        [AdapterShape("default", adapter.r, ["q_proj", "v_proj"])],
        batch_size=trainer.batch_size,
        max_length=trainer.max_length,
        workers=1,
        strategy="ddp",
        concurrency=concurrency,
        context=context,
    )


def format_plan(plan: Plan) -> str:
    """The plan as the text `madapt plan` prints: one column for bf16, one for 4-bit (QLoRA)."""
    arch = plan.arch
    lines = [
        f"{arch.name}: {arch.params / 1e9:.2f}B parameters, {arch.num_layers} layers, hidden {arch.hidden_size}",
        "adapters: " + ", ".join(f"{a.name} r={a.r} {a.target_modules}" for a in plan.adapters),
        "",
        f"{'':34}{'bf16':>10}{'4-bit':>10}",
    ]

    def table(title: str, estimates: dict[int, Estimate]) -> None:
        lines.append(title)
        for part in estimates[16].parts:
            lines.append(f"  {part:32}{estimates[16].parts[part] / GB:>8.2f}GB{estimates[4].parts[part] / GB:>8.2f}GB")
        lines.append(f"  {'total per GPU':32}{estimates[16].total / GB:>8.2f}GB{estimates[4].total / GB:>8.2f}GB")
        for gpu, memory in GPUS.items():
            marks = ["fits" if estimates[bits].fits(memory) else "no" for bits in (16, 4)]
            lines.append(f"  {'on ' + gpu:32}{marks[0]:>10}{marks[1]:>10}")

    def fewest(title: str, counts: dict[int, dict[str, int | None]]) -> None:
        lines.append(title)
        for gpu in GPUS:
            text = [str(counts[bits][gpu]) if counts[bits][gpu] else f">{WORKER_COUNTS[-1]}" for bits in (16, 4)]
            lines.append(f"    {gpu:30}{text[0]:>10}{text[1]:>10}")

    table(
        f"training, per GPU with {plan.training[16].gpus} worker(s) ({plan.strategy}), "
        f"batch {plan.batch_size} x {plan.max_length} tokens:",
        plan.training,
    )
    fewest("  fewest FSDP GPUs:", plan.fewest_gpus)
    if plan.pack:
        table(
            f"training {', '.join(plan.pack_names)} as one pack (madapt train --pack), per GPU, "
            f"{plan.pack_rows} rows x {plan.max_length} tokens a forward:",
            plan.pack,
        )
        fewest("  fewest FSDP GPUs for the pack:", plan.pack_fewest)
    table(
        f"serving replica (1 GPU), {len(plan.adapters)} adapter(s), "
        f"KV cache {plan.concurrency} x {plan.context} tokens:",
        plan.serving,
    )
    lines.append(f"(decimal GB; {USABLE:.0%} of a GPU's memory counted usable; activations without checkpointing)")
    return "\n".join(lines)


# -- packs that fit a worker -----------------------------------------------------------------------------


def pack_estimate(config: Config, names: list[str]) -> Estimate:
    """One worker's memory for adapters `names` trained as one pack, as `madapt plan` sizes it; CPU workers
    hold the base and activations in fp32 (torch loads the base so there), twice the bf16 figure."""
    plan = Plan(
        architecture(config.base_model),
        [shape for shape in adapter_shapes(config) if shape.name in names],
        config.trainer.batch_size,
        config.trainer.max_length,
        worker_strategy(config),
        concurrency=0,
        context=0,
    )
    bits = 4 if config.quantization else 16
    rows = pack_rows(config, len(names))
    sizes = sum(plan.arch.lora_params(a.r, a.target_modules) for a in plan.adapters)
    tokens = rows * plan.max_length
    estimate = training_estimate(
        plan.arch, sizes, bits=bits, workers=worker_count(config), strategy=plan.strategy, tokens=tokens
    )
    if not config.backend.trainer.use_gpu and not config.quantization:
        estimate.parts["base weights"] *= 2
        estimate.parts["activations"] *= 2
    return estimate


def split_packs(config: Config, names: list[str], worker_bytes: float) -> list[list[str]]:
    """Adapters `names` (in order) in consecutive packs whose estimate fits `worker_bytes`; an adapter that does
    not fit even alone is a pack of its own (an ordinary run)."""
    packs: list[list[str]] = []
    for name in names:
        if packs and pack_estimate(config, [*packs[-1], name]).fits(worker_bytes):
            packs[-1].append(name)
        else:
            packs.append([name])
    return packs


UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def worker_memory(config: Config) -> tuple[float, str] | None:
    """(bytes of one pack worker, where the figure comes from): backend.trainer.pack_memory, else for CPU
    workers this host's available memory (/proc/meminfo; a CPU cluster's nodes are taken to match it); None
    with use_gpu and no pack_memory (the driver cannot tell the workers' GPU)."""
    setting = config.backend.trainer.pack_memory
    if setting:
        number = setting.rstrip("KMGTiB").strip()
        return float(number) * UNITS[setting[len(number) :].strip().upper()], "backend.trainer.pack_memory"
    if config.backend.trainer.use_gpu:
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    kilobytes = next(int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:"))
    return kilobytes * 1024, "this host's available memory"
