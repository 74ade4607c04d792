"""The AdapterMerger actor on a local Ray cluster: every combination type, reuse, refusals, reproducibility."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from madapt.cli import main
from madapt.cluster import ClusterError, wait_for_resources
from madapt.config import COMBINATION_TYPES, DENSITY_TYPES
from madapt.lora import attach, delta_weights, publish_random
from madapt.merge import MergeError, MergeSpec
from madapt.merge.actor import get_or_create_merger
from madapt.models import load_base
from madapt.store import AdapterNotFound, AdapterStore, BaseModelMismatch, StoredAdapter
from tests.helpers import tiny_config

pytestmark = pytest.mark.ray

EXPECTED_RANK = {"cat": 12, "exact_linear": 12}  # every other type: the largest source rank, 8


@pytest.fixture(scope="module")
def merger(ray_cluster):
    """The merger every `madapt merge` on this cluster reaches (default name and namespace), shared by the
    module: each actor is a process that imports torch and PEFT, so one is started, not four."""
    return get_or_create_merger()


def cached(ray_cluster, merger, store: AdapterStore) -> list[str]:
    """The source versions the actor holds for `store` (it is shared with other tests' stores)."""
    return [ref for uri, ref in ray_cluster.get(merger.cached.remote()) if uri == store.uri]


@pytest.fixture
def published(store, base):
    publish_random(store, base, "a", r=8, alpha=16, seed=1)
    publish_random(store, base, "b", r=4, alpha=4, seed=2)
    return store


def spec_for(combination_type: str, name: str | None = None, **overrides) -> MergeSpec:
    density = 0.6 if combination_type in DENSITY_TYPES else None
    fields = {"density": density, "seed": 3, **overrides}
    return MergeSpec(name or combination_type.replace("_", "-"), ("a", "b"), (0.7, 0.3), combination_type, **fields)


def test_every_combination_type_through_one_named_actor(ray_cluster, merger, published, base):
    manifests = {t: ray_cluster.get(merger.merge.remote(published.uri, spec_for(t))) for t in COMBINATION_TYPES}
    assert cached(ray_cluster, get_or_create_merger(), published) == ["a@1", "b@1"]  # each read once, kept

    model = base.model
    inputs = base.tokenizer(["def add(a, b):"], return_tensors="pt")
    with torch.inference_mode():
        reference = model(**inputs).logits
    for combination_type, manifest in manifests.items():
        assert manifest.lineage == {
            "sources": [{"name": "a", "version": 1}, {"name": "b", "version": 1}],
            "weights": [0.7, 0.3],
            "combination_type": combination_type,
            "density": 0.6 if combination_type in DENSITY_TYPES else None,
            "seed": 3,
        }
        assert manifest.r == EXPECTED_RANK.get(combination_type, 8)
        model = attach(model, published.open(manifest.ref, expected_fingerprint=base.fingerprint))
        model.set_adapter(manifest.name)
        with torch.inference_mode():
            logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits, reference), f"{combination_type}: the merge changed nothing"
    model.unload()


def test_refusals_and_reproducibility_through_the_actor(ray_cluster, merger, published, base, other_tiny_model):

    def merge(spec, **kwargs):
        return ray_cluster.get(merger.merge.remote(published.uri, spec, **kwargs))

    def refuse(error, match, spec, **kwargs):
        before = published.list()
        with pytest.raises(error, match=match):
            merge(spec, **kwargs)
        assert published.list() == before

    refuse(AdapterNotFound, "'missing'", MergeSpec("m", ("a", "missing"), (0.5, 0.5)))
    refuse(MergeError, r"density must be in \(0, 1\]", spec_for("dare_ties", "m", density=1.2))
    publish_random(published, load_base(other_tiny_model), "foreign", r=8, alpha=16, seed=4)
    refuse(BaseModelMismatch, "foreign@1 was trained on base model", MergeSpec("m", ("a", "foreign"), (0.5, 0.5)))

    first = merge(spec_for("dare_ties", "m"))
    refuse(MergeError, "already published with different lineage", spec_for("dare_ties", "m", seed=4))
    # The recorded lineage reproduces the merge bit for bit, as a new version under --overwrite.
    recorded = first.lineage
    again = merge(
        spec_for("dare_ties", "m", density=recorded["density"], seed=recorded["seed"]),
        overwrite=True,
    )
    assert (first.ref, again.ref) == ("m@1", "m@2")
    store = AdapterStore(published.uri)
    one, two = store.open("m@1").tensors, store.open("m@2").tensors
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_cli_merge_goes_through_the_actor_then_prints_and_charts_quality(
    ray_cluster, merger, base, tiny_model, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MADAPT_HOME", str(tmp_path / "home"))
    document = tiny_config(tiny_model, str(tmp_path / "store"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    store = AdapterStore(document["storage"]["uri"])
    publish_random(store, base, "coding", r=8, alpha=16, seed=1)
    publish_random(store, base, "chat", r=4, alpha=8, seed=2)

    assert main(["merge", str(path), "--max-examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "published both@1: ties of coding@1, chat@1" in out
    assert "held-out quality of both@1" in out and "chat@1" in out
    assert (tmp_path / "home" / "reports" / "both@1" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["merge", str(path), "--no-eval"]) == 0  # same lineage: the published version is reused
    assert store.versions("both") == [1]
    assert cached(ray_cluster, merger, store) == ["chat@1", "coding@1"]  # the CLI went through the actor


def test_sources_already_in_the_object_store_are_not_read_again(ray_cluster, merger, published, base):
    stored = published.open("a")
    # A copy whose delta W is zero: if the merge used it, the result is b's share alone.
    silent = StoredAdapter(
        stored.manifest, stored.config, {k: v * 0 if "lora_B" in k else v for k, v in stored.tensors.items()}
    )
    spec = spec_for("exact_linear", "from-objects")
    manifest = ray_cluster.get(merger.merge.remote(published.uri, spec, preloaded=[ray_cluster.put(silent)]))
    merged = published.open(manifest.ref)
    b = published.open("b")
    expected, got = delta_weights(b.config, b.tensors), delta_weights(merged.config, merged.tensors)
    for module, delta in expected.items():
        torch.testing.assert_close(got[module], 0.3 * delta, rtol=1e-5, atol=1e-7)


def test_waiting_for_cpus_others_hold_is_bounded_and_names_them(ray_cluster, merger):
    """What `madapt merge` and `madapt train` do first on a cluster whose CPUs other work holds (issue 23)."""
    total = ray_cluster.cluster_resources()["CPU"]
    never = rf"the merger actor needs {total + 1:g} CPU but the cluster has {total:g} in all"
    with pytest.raises(ClusterError, match=never):
        wait_for_resources({"CPU": total + 1}, "the merger actor")  # refused at once, not after the wait
    started = time.monotonic()
    busy = rf"the merger actor needs {total:g} CPU but only [\d.]+ of the cluster's {total:g} were free for 1 s"
    with pytest.raises(ClusterError, match=busy):
        wait_for_resources({"CPU": total}, "the merger actor", timeout_s=1)  # the module's merger holds one
    assert time.monotonic() - started < 10
