"""AdapterMerger: one Ray actor that merges published adapters for every job and CLI call on a cluster.

It is named, so `madapt merge`, `jobs/merge.py` and a training job reach the same actor, and it may be
detached so it outlives them. It keeps what it has read: each source version is opened (checksums
verified) once, and each base model is fingerprinted once from its config and a slice of its
embeddings, never by loading the whole base (merging needs adapter tensors and shapes only).
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from madapt.merge import MergeSpec, check_spec, merge_and_publish
from madapt.models import fingerprint, load_base, resolve_base_model
from madapt.store import AdapterStore, Manifest, StoredAdapter

MERGER_NAME = "madapt-merger"
MERGER_NAMESPACE = "madapt"


def base_fingerprint(base_model: str, *, trust_remote_code: bool = False) -> str:
    """`models.fingerprint` of the base, reading only its config and the first rows of its embeddings.

    The architecture is built on the meta device (no memory), its input embedding is swapped for the
    rows read from the safetensors shard that holds them. A hub id without a local copy is loaded whole.
    """
    location = Path(resolve_base_model(base_model))
    if not location.is_dir():
        return load_base(base_model, trust_remote_code=trust_remote_code).fingerprint
    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    embedding = model.get_input_embeddings()
    key = next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)
    for shard in sorted(location.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            if key in set(handle.keys()):  # safe_open has no __contains__
                embedding.weight = torch.nn.Parameter(handle.get_slice(key)[:64], requires_grad=False)
                return fingerprint(model)
    return load_base(base_model, trust_remote_code=trust_remote_code).fingerprint


@ray.remote(num_cpus=1)
class AdapterMerger:
    """Merges on request; stores, base fingerprints and opened source versions are kept between calls."""

    def __init__(self):
        self.stores: dict[str, AdapterStore] = {}
        self.fingerprints: dict[str, str] = {}
        self.sources: dict[str, StoredAdapter] = {}  # "name@version" -> verified adapter

    def fingerprint(self, base_model: str) -> str:
        if base_model not in self.fingerprints:
            self.fingerprints[base_model] = base_fingerprint(base_model)
        return self.fingerprints[base_model]

    def merge(
        self,
        store_uri: str,
        base_model: str,
        spec: MergeSpec,
        *,
        overwrite: bool = False,
        preloaded: list[StoredAdapter] | None = None,
    ) -> Manifest:
        """Merge `spec.sources` (latest versions) and publish `spec.name`; see merge.merge_and_publish.

        `preloaded`: adapters already in Ray's object store (pass their ObjectRefs); each is used for its
        own version instead of reading the store, after the same base-model check.
        """
        check_spec(spec)
        store = self.stores.setdefault(store_uri, AdapterStore(store_uri))
        for adapter in ray.get(list(preloaded or [])):
            self.sources.setdefault(adapter.ref, adapter)
        return merge_and_publish(
            store, base_model, self.fingerprint(base_model), spec, overwrite=overwrite, cache=self.sources
        )

    def cached(self) -> list[str]:
        """Source versions held in memory, for tests and `madapt` diagnostics."""
        return sorted(self.sources)


def get_or_create_merger(
    name: str = MERGER_NAME, namespace: str = MERGER_NAMESPACE, *, detached: bool = False
) -> ray.actor.ActorHandle:
    """The named merger actor, created on first use; `detached` keeps it alive after this driver exits."""
    options = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return AdapterMerger.options(**options).remote()


def merge_on_cluster(
    store_uri: str, base_model: str, spec: MergeSpec, *, overwrite: bool = False, detached: bool = False
) -> Manifest:
    """Run one merge on the named actor (connecting to Ray, or starting a local one, if needed)."""
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    merger = get_or_create_merger(detached=detached)
    return ray.get(merger.merge.remote(store_uri, base_model, spec, overwrite=overwrite))
