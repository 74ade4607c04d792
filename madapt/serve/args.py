"""`ServeArgs`: the `args:` of a serve config, validated once by the ingress and by every replica."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from madapt.config import StorageConfig
from madapt.serve.protocol import MAX_TOKENS_LIMIT


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

    base_model: str = Field("smollm2-135m", description="Embedded name, local directory or HF id.")
    store: str = Field(default_factory=lambda: StorageConfig().uri, description="Adapter store URI.")
    max_adapters_per_replica: int = Field(8, ge=1, description="Multiplexing LRU size per replica.")
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
