"""Publishing a merge: open its sources (one base model), find a published twin, publish with lineage."""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence

from madapt.merge.strategies import MergeError, MergeSpec, check_spec, merge_adapters
from madapt.store import AdapterStore, BaseModelMismatch, Manifest, StoredAdapter


def lineage(adapters: Sequence[StoredAdapter], spec: MergeSpec) -> dict:
    """What the merge was made of. `rank`, `engine` and `majority_sign_method` appear only when set, so merges
    published before they existed keep matching their twins."""
    return {
        "sources": [{"name": a.manifest.name, "version": a.manifest.version} for a in adapters],
        "weights": list(spec.weights),
        "combination_type": spec.combination_type,
        "density": spec.density,
        "seed": spec.seed,
        **({"rank": spec.rank} if spec.rank is not None else {}),
        **({"engine": spec.engine} if spec.engine != "madapt" else {}),
        **({"majority_sign_method": spec.majority_sign_method} if spec.majority_sign_method != "total" else {}),
    }


def open_sources(
    store: AdapterStore,
    spec: MergeSpec,
    cache: MutableMapping[tuple[str, str], StoredAdapter] | None = None,
    *,
    expected_fingerprint: str | None = None,
) -> list[StoredAdapter]:
    """Open every source's latest version; all must come from one base model (by the fingerprint their
    manifests carry, and `expected_fingerprint` when the caller knows the base). `cache`, keyed by
    (store URI, ref), lets a long-lived caller read each version once."""
    cache = {} if cache is None else cache
    manifests = [store.manifest(source) for source in spec.sources]
    fingerprint = expected_fingerprint or manifests[0].base_fingerprint
    foreign = [m for m in manifests if m.base_fingerprint != fingerprint]
    if foreign:
        trained_on = ", ".join(f"{m.ref} on {m.base_model!r} ({m.base_fingerprint})" for m in manifests)
        raise BaseModelMismatch(
            f"merge {spec.name!r}: {foreign[0].ref} was trained on base model {foreign[0].base_model!r}, not the "
            f"base of the other sources; sources must share one base: {trained_on}"
        )
    opened = []
    for manifest in manifests:
        key = (store.uri, manifest.ref)
        if key not in cache:
            cache[key] = store.open(manifest.ref, expected_fingerprint=fingerprint)
        opened.append(cache[key])
    return opened


def published_twin(
    store: AdapterStore, spec: MergeSpec, sources: Sequence[StoredAdapter], overwrite: bool
) -> Manifest | None:
    """The published merge with the same lineage, if any.

    Fresh source versions under the same recipe make a new version (that is how a declared merge
    follows retrained sources); a different recipe under the same name is refused unless `overwrite`.
    """
    if overwrite or not store.versions(spec.name):
        return None
    previous = store.manifest(spec.name)
    wanted = lineage(sources, spec)
    if previous.lineage == wanted:
        return previous
    if recipe(previous.lineage or {}) != recipe(wanted):
        raise MergeError(
            f"merge {spec.name!r}: {previous.ref} is already published with different lineage; "
            "pass --overwrite to publish a new version"
        )
    return None


def recipe(lineage_record: dict) -> dict:
    """A lineage without source versions: what the merge is, not which trained versions it used."""
    sources = [source["name"] for source in lineage_record.get("sources", [])]
    return {**lineage_record, "sources": sources}


def merge_and_publish(
    store: AdapterStore,
    spec: MergeSpec,
    *,
    overwrite: bool = False,
    cache: MutableMapping[tuple[str, str], StoredAdapter] | None = None,
    expected_fingerprint: str | None = None,
) -> Manifest:
    """Merge published sources and publish the result with lineage. No base weights are read: the merge
    inherits its base identity (name and fingerprint) from its sources.

    The same merge of the same source versions is not repeated: its published version is returned.
    """
    check_spec(spec)
    sources = open_sources(store, spec, cache, expected_fingerprint=expected_fingerprint)
    twin = published_twin(store, spec, sources, overwrite)
    if twin is not None:
        return twin
    started = time.perf_counter()
    config, tensors = merge_adapters(sources, spec)
    return store.publish(
        spec.name,
        config,
        tensors,
        base_model=sources[0].manifest.base_model,
        base_fingerprint=sources[0].manifest.base_fingerprint,
        metrics={"merge_s": time.perf_counter() - started},
        lineage=lineage(sources, spec),
    )
