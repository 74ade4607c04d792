"""Random adapters of every PEFT type serving runs (LoRA variants and non-LoRA tuners), for the serving
benchmark's per-type rows and for tests: made with PEFT on a base, their weights moved off PEFT's identity
init by seeded noise so that each one changes the model's output."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PeftModel,
    VBLoRAConfig,
    VeraConfig,
    get_peft_model,
)

from madapt.lora import extract
from madapt.models import LoadedBase
from madapt.store import AdapterStore, Manifest

NORMS = ["input_layernorm", "post_attention_layernorm"]
"""LN tuning's targets: Llama-family norm module names."""

KINDS: dict[str, Callable[[list[str]], PeftConfig]] = {
    "lora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=False),
    "rslora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, use_rslora=True, init_lora_weights=False),
    "rank_pattern": lambda t: LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=t,
        rank_pattern={t[-1]: 2, f"layers.1.self_attn.{t[0]}": 6},
        alpha_pattern={t[-1]: 3},
        init_lora_weights=False,
    ),
    "lora_bias": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, lora_bias=True, init_lora_weights=False),
    "dora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True, init_lora_weights=False),
    "adalora": lambda t: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=t),
    "ia3": lambda t: IA3Config(target_modules=[*t, "down_proj"], feedforward_modules=["down_proj"]),
    "oft": lambda t: OFTConfig(r=0, oft_block_size=16, target_modules=t),
    "boft": lambda t: BOFTConfig(boft_block_size=16, target_modules=t),
    "loha": lambda t: LoHaConfig(r=4, target_modules=t),
    "lokr": lambda t: LoKrConfig(r=4, target_modules=t),
    "vera": lambda t: VeraConfig(r=4, target_modules=t),
    "hra": lambda t: HRAConfig(r=8, target_modules=t),
    "fourierft": lambda t: FourierFTConfig(n_frequency=32, target_modules=t),
    "vblora": lambda t: VBLoRAConfig(r=4, num_vectors=16, vector_length=16, target_modules=t),
    "ln_tuning": lambda t: LNTuningConfig(target_modules=NORMS),
}
"""Each kind's PEFT config on the given Linear targets (q_proj/v_proj-like names)."""

NOISE = {"ia3": 3.0, "boft": 3.0, "ln_tuning": 3.0}
"""The noise's scale per kind (default 1): enough to move a tiny random model's greedy tokens."""


def typed_peft_model(
    model: torch.nn.Module, kind: str, *, seed: int, targets: Sequence[str] = ("q_proj", "v_proj")
) -> PeftModel:
    """`model` wrapped (in place) with a `kind` adapter named 'random', initialised and then moved by seeded
    noise: the same seed gives the same weights."""
    config = KINDS[kind](list(targets))
    config.task_type = "CAUSAL_LM"
    with torch.random.fork_rng():  # PEFT's random inits draw from the global generator: seed it, then restore it
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, adapter_name="random")
    generator = torch.Generator().manual_seed(seed)
    noise = NOISE.get(kind, 1.0)
    with torch.no_grad():
        for _, parameter in sorted(peft_model.named_parameters()):
            if parameter.requires_grad:
                noise_like = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.add_(noise * noise_like.to(parameter.device, parameter.dtype))
    return peft_model.eval()


def random_typed_adapter(
    model: torch.nn.Module, kind: str, *, seed: int, targets: Sequence[str] = ("q_proj", "v_proj")
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A random `kind` adapter on `model` as (adapter_config, tensors); `model` is left as it was."""
    peft_model = typed_peft_model(model, kind, seed=seed, targets=targets)
    try:
        return extract(peft_model, "random")
    finally:
        peft_model.unload()


def publish_typed(
    store: AdapterStore,
    base: LoadedBase,
    name: str,
    kind: str,
    *,
    seed: int,
    targets: Sequence[str] = ("q_proj", "v_proj"),
) -> Manifest:
    """Publish a `random_typed_adapter` on `base` into `store`."""
    config, tensors = random_typed_adapter(base.model, kind, seed=seed, targets=targets)
    return store.publish(name, config, tensors, base_model=base.name, base_fingerprint=base.fingerprint)
