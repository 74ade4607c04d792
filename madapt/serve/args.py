"""`ServeArgs`: the `args:` of a serve config, validated once by the ingress and by every replica."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from madapt.config import StorageConfig
from madapt.serve.protocol import MAX_TOKENS_LIMIT


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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
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
    max_merge_sources: int = Field(4, ge=1, description="Most adapters one per-request merge may name.")
    max_cached_merges: int = Field(4, ge=1, description="Per-request merges each replica keeps built (LRU).")
