"""AdapterMerger: one Ray actor that merges published adapters for every job and CLI call on a cluster.

It is named, so `madapt merge`, `jobs/merge.py` and a training job reach the same actor, and it may be
detached so it outlives them. It keeps what it has read: each source version is opened (checksums
verified) once, keyed by store and ref so two stores' `coding@1` never meet. It never touches the base
model: a merge inherits the base identity its sources' manifests carry. Without a cluster the user points
at (madapt.cluster), `run_merge` runs the same code in-process, without Ray's start-up.

The actor reads and writes the store with the object-storage variables of the driver that started it
(madapt.store.storage_env): an actor's environment is fixed when it starts, so drivers that reach their
stores through different endpoints or keys get a merger each, named after a digest of those variables.
"""

from __future__ import annotations

import hashlib
import json

import ray

from madapt.cluster import connect, wait_for_resources
from madapt.merge import MergeSpec, check_spec, merge_and_publish
from madapt.store import AdapterStore, Manifest, StoredAdapter, storage_env, storage_runtime_env

MERGER_NAME = "madapt-merger"
MERGER_NAMESPACE = "madapt"
MERGER_RESOURCES = {"CPU": 1.0}


@ray.remote(num_cpus=MERGER_RESOURCES["CPU"])
class AdapterMerger:
    """Merges on request; stores and opened source versions are kept between calls."""

    def __init__(self) -> None:
        self.stores: dict[str, AdapterStore] = {}
        self.sources: dict[tuple[str, str], StoredAdapter] = {}  # (store URI, "name@version") -> verified adapter

    def merge(
        self,
        store_uri: str,
        spec: MergeSpec,
        *,
        overwrite: bool = False,
        preloaded: list[StoredAdapter] | None = None,
    ) -> Manifest:
        """Merge `spec.sources` (latest versions) and publish `spec.name`; see merge.merge_and_publish.

        `preloaded`: adapters already in Ray's object store (pass their ObjectRefs); each is used for its
        own version instead of reading the store.
        """
        check_spec(spec)
        store = self.stores.setdefault(store_uri, AdapterStore(store_uri))
        for adapter in ray.get(list(preloaded or [])):
            self.sources.setdefault((store.uri, adapter.ref), adapter)
        return merge_and_publish(store, spec, overwrite=overwrite, cache=self.sources)

    def cached(self) -> list[tuple[str, str]]:
        """(store URI, ref) of every source version held in memory, for tests and diagnostics."""
        return sorted(self.sources)


def merger_name() -> str:
    """MERGER_NAME, suffixed with a digest of this process's object-storage variables when it has any."""
    env = storage_env()
    if not env:
        return MERGER_NAME
    return f"{MERGER_NAME}-{hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]}"


def get_or_create_merger(
    name: str | None = None, namespace: str = MERGER_NAMESPACE, *, detached: bool = False
) -> ray.actor.ActorHandle:
    """The named merger actor (default: merger_name()), created on first use with this process's storage
    variables; `detached` keeps it alive after this driver exits."""
    options = {"name": name or merger_name(), "namespace": namespace, "get_if_exists": True}
    runtime_env = storage_runtime_env()
    if runtime_env:
        options["runtime_env"] = runtime_env
    if detached:
        options["lifetime"] = "detached"
    return AdapterMerger.options(**options).remote()  # type: ignore[attr-defined]  # added by @ray.remote


def run_merge(store_uri: str, spec: MergeSpec, *, overwrite: bool = False, detached: bool = False) -> Manifest:
    """Run one merge on the named actor of the cluster this process is connected to or pointed at
    (`ray job submit`, `--address`, RAY_ADDRESS, a `ray start` cluster on this machine); otherwise in-process.
    A new actor waits a bounded time for its CPU (madapt.cluster.wait_for_resources), never forever."""
    if not connect(start=False):
        return merge_and_publish(AdapterStore(store_uri), spec, overwrite=overwrite)
    name = merger_name()
    try:
        merger = ray.get_actor(name, namespace=MERGER_NAMESPACE)
    except ValueError:  # not started yet on this cluster
        wait_for_resources(MERGER_RESOURCES, "the merger actor")
        merger = get_or_create_merger(name, detached=detached)
    return ray.get(merger.merge.remote(store_uri, spec, overwrite=overwrite))
