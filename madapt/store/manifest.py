"""What a version holds: its file names, the manifest that vouches for them, and the opened adapter."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from madapt.store.errors import CorruptAdapter

if TYPE_CHECKING:  # torch is imported where tensors are read: listing a store needs none
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
CLAIM_FILE = ".claim"
DELETED_FILE = "deleted.json"
ALIASES_FILE = "aliases.json"
SPLIT_FILE = "split.json"
RECORD_FILES = (ALIASES_FILE, SPLIT_FILE)
PAYLOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE)
VERSION_DIR = re.compile(r"[1-9][0-9]*")  # canonical only: "01" or "²" would alias or break int()
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""How the store writes times (manifests' `created`, tombstones, records): UTC, to the second."""


@dataclass
class Manifest:
    name: str
    version: int
    base_model: str
    base_fingerprint: str
    r: int
    alpha: float
    target_modules: list[str]
    files: dict[str, dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] | None = None
    created: str = ""
    response_format: dict[str, Any] | None = None
    """The OpenAI `response_format` served when a request names none (a training config's JSON schema)."""
    peft_type: str = "LORA"
    type_options: dict[str, Any] = field(default_factory=dict)
    """A non-LoRA adapter's own PEFT fields (e.g. OFT's oft_block_size), from its adapter_config.json."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def size_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


@dataclass
class StoredAdapter:
    """An opened, verified adapter: PEFT's config and tensors plus the manifest that vouches for them."""

    manifest: Manifest
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def ref(self) -> str:
        return self.manifest.ref


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CorruptAdapter(f"{where}: tensor {key!r} has NaN or infinite values")


def manifest_bytes(manifest: Manifest) -> bytes:
    return json.dumps(asdict(manifest), indent=2).encode()


GENERIC_CONFIG_KEYS = frozenset(
    {"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version"}
    | {"target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"}
)
"""adapter_config.json keys every PEFT type shares; the rest are a type's own options."""


def type_options(config: dict[str, Any]) -> dict[str, Any]:
    """A non-LoRA adapter's own fields for its manifest (LoRA's r and alpha have fields of their own)."""
    if config.get("peft_type", "LORA") == "LORA":
        return {}
    return {k: v for k, v in sorted(config.items()) if k not in GENERIC_CONFIG_KEYS}


def as_list(value: Any) -> list[str]:
    """target_modules as a list: PEFT also allows one regular expression (a string) or none."""
    return [value] if isinstance(value, str) else list(value or [])


def utc_now() -> str:
    return time.strftime(TIME_FORMAT, time.gmtime())
