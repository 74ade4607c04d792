"""Hot adapter copies in Ray's object store, owned by one long-lived named actor.

An object in Ray's object store dies with the process that put it there. A replica that put an adapter
would take it down when it is scaled away; the registry actor puts each verified adapter once and keeps
it (LRU, bounded), so the next replica that needs it gets the tensors from shared memory instead of
re-reading and re-verifying the store. One registry per store URI, `detached` so it outlives the app.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any

import ray
from ray.actor import ActorHandle

from madapt.store import AdapterNotFound, AdapterStore, BaseModelMismatch, CorruptAdapter, StoreError

NAMESPACE = "madapt"
ERRORS = {AdapterNotFound: 404, BaseModelMismatch: 409, CorruptAdapter: 422, StoreError: 400}


def error_status(error: StoreError) -> int:
    return next(status for kind, status in ERRORS.items() if isinstance(error, kind))


@ray.remote(num_cpus=0)
class AdapterRegistry:
    """Resolves refs, verifies adapters once and owns their hot copies in the object store."""

    def __init__(self, store_uri: str, capacity: int = 256):
        self.store = AdapterStore(store_uri)
        self.capacity = capacity
        self.hot: OrderedDict[str, ray.ObjectRef] = OrderedDict()

    def fetch(self, ref: str, fingerprint: str) -> dict[str, Any]:
        """{'ref', 'source', 'seconds', 'object': [ObjectRef of (config, tensors)], 'response_format'} or
        {'status', 'error'}; 'response_format' is the manifest's default (None when it has none).

        The ObjectRef is wrapped in a list so Ray hands the caller the reference (owned here) rather
        than resolving it; errors are returned, not raised, so callers map them to HTTP statuses.
        """
        start = time.perf_counter()
        try:
            manifest = self.store.manifest(ref)
            if manifest.base_fingerprint != fingerprint:  # said without the other base's name: it may be a path
                raise BaseModelMismatch(
                    f"{manifest.ref} was trained on another base model (fingerprint {manifest.base_fingerprint}, "
                    f"served: {fingerprint})"
                )
            served = {"ref": manifest.ref, "response_format": manifest.response_format}
            if manifest.ref in self.hot:
                self.hot.move_to_end(manifest.ref)
                return {**served, "source": "object_store", "object": [self.hot[manifest.ref]], "seconds": 0.0}
            stored = self.store.open(manifest.ref, expected_fingerprint=fingerprint)
            obj = ray.put((stored.config, stored.tensors))
            self.hot[stored.ref] = obj
            while len(self.hot) > self.capacity:
                self.hot.popitem(last=False)
            return {**served, "source": "store", "object": [obj], "seconds": time.perf_counter() - start}
        except StoreError as error:
            return {"status": error_status(error), "error": str(error)}


def registry_name(store_uri: str) -> str:
    return "madapt-registry-" + hashlib.sha256(store_uri.encode()).hexdigest()[:12]


def get_registry(store_uri: str, *, detached: bool = True) -> ActorHandle:
    """The registry for `store_uri`, created on first use (safe when replicas race to create it) and
    restarted, empty, if its process dies."""
    options: dict[str, Any] = {
        "name": registry_name(store_uri),
        "namespace": NAMESPACE,
        "get_if_exists": True,
        "max_restarts": -1,
    }
    if detached:
        options["lifetime"] = "detached"
    return AdapterRegistry.options(**options).remote(store_uri)  # type: ignore[attr-defined]  # added by @ray.remote
