"""`ServeArgs`: the `args:` of a serve config, validated once by the ingress and by every replica.

A serve config may name the training config (`config:`) instead of repeating it: `resolve_args` fills
`base_model`, `store`, `active` and `generation` from it, once, in the process that builds the application,
so the replicas get absolute paths and plain values. An arg given in the serve config still wins.
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from madapt.config import (
    ConfigError,
    GenerationConfig,
    StorageConfig,
    check_adapter_name,
    format_validation_error,
    load_config,
    locate_base_model,
)
from madapt.serve.adapter_cache import parse_bytes
from madapt.serve.openai.protocol import GREEDY_TEMPERATURE, MAX_TOKENS_LIMIT

log = logging.getLogger(__name__)

ACTIVE_ALIAS = "default"
"""The model id of the `active` adapter (Ludwig's `adapters.active`), when the serve args name one."""
SERVE_ARGS = "serve args"
"""The `source` of a ConfigError about the args themselves (a training config's errors name its file)."""
GENERATION_FIELDS = [
    ("max_new_tokens", "max_tokens"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("repetition_penalty", "repetition_penalty"),
]
"""Ludwig's `generation` keys the server applies, and the request field each one is the default of."""
SERVED_GENERATION = (*(key for key, _ in GENERATION_FIELDS), "do_sample")
"""The `generation` keys the server's sampler applies; `madapt predict` applies the others too."""


class ServeQuantization(BaseModel):
    """A bitsandbytes-quantized base (CPU or CUDA); adapters stay unquantized on top of it."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = Field(description="4: NF4/FP4 weights (QLoRA's); 8: LLM.int8().")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True

    def bnb_options(self) -> dict[str, Any]:
        """`madapt.models.bnb_config` keyword arguments besides the bit width."""
        return self.model_dump(exclude={"bits"})


class ServeArgs(BaseModel):
    """The `args:` of a serve config: what every replica needs to build its engine."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(
        None,
        description="A training config: base_model, store, active and generation default to its own "
        "(a relative path is read from the current directory; the paths inside it from its own directory).",
    )
    base_model: str = Field("smollm2-135m", description="Embedded name, local directory or HF id.")
    store: str = Field(default_factory=lambda: StorageConfig().uri, description="Adapter store URI.")
    active: str | None = Field(
        None,
        description=f"What model {ACTIVE_ALIAS!r} serves (NAME, NAME@VERSION or NAME@LABEL); "
        "default: the training config's active adapter.",
    )
    active_for_unnamed: bool = Field(
        False,
        description=f"A request that names no model (no `model`, no serve_multiplexed_model_id header) gets "
        f"{ACTIVE_ALIAS!r} instead of a 400.",
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description="Ludwig's generation section, over the training config's key by key: the defaults of "
        f"requests that do not say ({', '.join(SERVED_GENERATION)}).",
    )
    max_adapter_memory: int | float = Field(
        0.25,
        description="Adapter memory per replica: bytes (an int, or a string such as 2GiB or 500MB) or a fraction "
        "0 < f <= 1 of the device's free memory at start-up; adapters are kept by their real size "
        "(madapt.serve.adapter_cache).",
    )
    max_adapters_per_replica: int | None = Field(None, ge=1, description="Optional cap on adapters per replica.")
    host_adapter_memory: int | float = Field(
        2 << 30,
        description="Host-memory tier per replica: the served tensors of recently loaded adapters (bytes or a "
        "fraction of free host memory), so a re-load of an evicted adapter skips the store.",
    )
    max_batch_size: int = Field(32, ge=1, description="Rows decoded together in one mixed-adapter batch.")
    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: requests join and leave the running batch at every decode step; "
        "static: a batch collected for batch_wait_ms is decoded to its end.",
    )
    step_tokens: int = Field(
        512, ge=1, description="continuous: tokens one step may spend (1 per running row + admitted prompts)."
    )
    batch_wait_ms: float = Field(10.0, ge=0, description="static: how long a batch waits for more requests.")
    max_waiting: int = Field(
        64, ge=1, description="Requests a replica holds waiting to join its batch; beyond, 503 + Retry-After at once."
    )
    deadline_s: float = Field(
        300.0, gt=0, description="A request still decoding after this long is cancelled and answered 504."
    )
    stall_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Health: a replica with requests waiting or running and no forward pass finished for this "
        "long fails its health check, so Serve replaces it (above the longest prefill a replica may run).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: ServeQuantization | None = Field(None, description="Serve a 4- or 8-bit base (bitsandbytes).")
    device: str | None = Field(None, description="Default: cuda when available, else cpu.")
    onednn_linears: bool = Field(
        True,
        description="fp32 on CPU: the base's Linears run on oneDNN's matmul rather than MKL's, 1.2-1.8x faster "
        "at a decode step's shapes on the project's AMD CPU (madapt.serve.cpu_gemm; docs/serving.md).",
    )
    onednn_prepack: bool = Field(
        True,
        description="With onednn_linears: oneDNN runs on copies of the weights packed once into its blocked "
        "layout, 4-12% faster end to end (docs/serving.md), at the cost of a second copy of the base's Linears "
        "in host memory.",
    )
    decode_attention: bool = Field(
        True,
        description="On CPU: a decode step's attention in madapt's own code instead of SDPA's flash kernel "
        "(madapt.serve.decode_attention), 1-13% faster end to end on a small model (docs/serving.md).",
    )
    native_kernels: bool = Field(
        True,
        description="On CPU: a decode step's attention (with decode_attention) and adapter products, the base's "
        "RMSNorm, gated-MLP activation and rotary embedding with the KV cache write, and the greedy argmax in "
        "madapt's C++ kernels, built on the machine at first use (madapt.serve.native; where they cannot build, "
        "torch's ops serve), else torch's ops (docs/serving.md).",
    )
    flat_decode: bool = Field(
        True,
        description="With native_kernels, on a Llama base: a decode step as one loop over the layers that calls "
        "the kernels directly, skipping ~7 ms a step of Python in the model's forward; the same logits to the "
        "bit (madapt.serve.decode_step; docs/serving.md).",
    )
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch in each replica.")
    registry_detached: bool = Field(True, description="Keep hot adapter copies after the app is deleted.")
    adapter_retry_s: float = Field(30.0, ge=0, description="How long a failed adapter load is remembered.")
    resolve_ttl_s: float = Field(
        2.0, ge=0, description="How long the ingress caches name resolution (labels, splits) and /v1/models."
    )
    max_tokens: int = Field(512, ge=1, le=MAX_TOKENS_LIMIT, description="The largest max_tokens a request may ask.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies are refused (413).")
    api_keys_file: str | None = Field(None, description="API keys, one per line; turns authentication on.")
    api_keys_env: str | None = Field(None, description="Env var of comma-separated API keys; turns authentication on.")
    max_merge_sources: int = Field(4, ge=1, description="Most adapters one per-request merge may name.")
    max_cached_merges: int = Field(4, ge=1, description="Per-request merges each replica keeps built (LRU).")

    @field_validator("max_adapter_memory", "host_adapter_memory", mode="before")
    @classmethod
    def _sizes(cls, value: Any, info: ValidationInfo) -> int | float:
        return parse_bytes(value, str(info.field_name))

    @field_validator("active")
    @classmethod
    def _active(cls, value: str | None) -> str | None:
        if value is not None:
            check_adapter_name(value.partition("@")[0], "active adapter")
        return value


def resolve_args(args: Mapping[str, Any] | None) -> ServeArgs:
    """`args` validated, with what they leave out taken from the training config they name and local paths
    made absolute. Every problem is a ConfigError: of the args (source SERVE_ARGS) or of the training config."""
    try:
        settings = ServeArgs.model_validate(dict(args or {}))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error), SERVE_ARGS) from None
    given = settings.model_fields_set
    update: dict[str, Any] = {}
    if settings.config is not None:
        path = Path(settings.config).expanduser().resolve()
        config = load_config(path)
        inherited = {"base_model": config.base_model, "store": config.storage.uri, "active": config.active}
        update = {"config": str(path), **{key: value for key, value in inherited.items() if key not in given}}
        merged = config.generation.kwargs() | settings.generation.kwargs()
        update["generation"] = GenerationConfig.model_validate(merged)
    if "base_model" in given:
        update["base_model"] = locate_base_model(settings.base_model)
    if "store" in given and "://" not in settings.store:
        update["store"] = str(Path(settings.store).expanduser().resolve())
    resolved = settings.model_copy(update=update)
    problems = generation_problems(resolved)
    if problems:
        raise ConfigError(problems, SERVE_ARGS)
    for key in sorted(set(resolved.generation.kwargs()) - set(SERVED_GENERATION)):
        log.warning(
            "serve args: generation.%s is not applied by the server (it applies %s); `madapt predict` applies it",
            key,
            ", ".join(SERVED_GENERATION),
        )
    return resolved


def generation_problems(settings: ServeArgs) -> list[str]:
    """Generation defaults that a request could not ask for: the API's ranges and the server's limit."""
    generation, problems = settings.generation.kwargs(), []
    if generation.get("max_new_tokens", 0) > settings.max_tokens:
        problems.append(
            f"generation.max_new_tokens: {generation['max_new_tokens']} is above max_tokens "
            f"({settings.max_tokens}), the most a request may ask"
        )
    if generation.get("temperature", 0) > 2:
        problems.append("generation.temperature: must be at most 2 (the API's range)")
    if generation.get("top_p", 1) <= 0:
        problems.append("generation.top_p: must be above 0 (the API's range)")
    return problems


def sampling_defaults(settings: ServeArgs) -> dict[str, Any]:
    """What a request that does not say gets, from `generation` (`GENERATION_FIELDS`): `do_sample: false`
    is greedy decoding, as in `madapt predict`."""
    generation = settings.generation.kwargs()
    defaults = {new: generation[old] for old, new in GENERATION_FIELDS if old in generation}
    if defaults.get("temperature", 1.0) < GREEDY_TEMPERATURE or generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults
