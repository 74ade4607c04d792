"""Merge maths on tiny random adapters, without Ray: exactness, PEFT parity, reproducibility, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from madapt.lora import delta_weights, publish_random
from madapt.merge import MergeError, MergeSpec, merge_adapters, merge_and_publish
from madapt.models import load_base
from madapt.store import AdapterNotFound, BaseModelMismatch


@pytest.fixture
def sources(store, base):
    """'a' (r=8) and 'b' (r=4) on q,v; 'a_twin' is 'a' published again under another name."""
    publish_random(store, base, "a", r=8, alpha=16, seed=1)
    publish_random(store, base, "b", r=4, alpha=4, seed=2)
    publish_random(store, base, "a_twin", r=8, alpha=16, seed=1)
    return store


def opened(store, names):
    return [store.open(n) for n in names]


def merged_deltas(store, spec: MergeSpec):
    config, tensors = merge_adapters(opened(store, spec.sources), spec)
    return config, delta_weights(config, tensors)


def weighted_dense_sum(store, names, weights):
    deltas = [delta_weights(a.config, a.tensors) for a in opened(store, names)]
    return {m: sum(w * d[m] for w, d in zip(weights, deltas, strict=True)) for m in deltas[0]}


def test_exact_linear_is_the_weighted_sum_of_deltas_and_peft_linear_is_not(sources):
    weights = (0.7, 0.3)
    expected = weighted_dense_sum(sources, ("a", "b"), weights)
    config, exact = merged_deltas(sources, MergeSpec("m", ("a", "b"), weights, "exact_linear"))
    assert config["r"] == 12
    for module, delta in expected.items():
        torch.testing.assert_close(exact[module], delta, rtol=1e-5, atol=1e-6)

    # Self-merge: the exact result is the adapter itself; PEFT's linear scales it by (sqrt(.7) + sqrt(.3))^2.
    own = weighted_dense_sum(sources, ("a",), (1.0,))
    _, peft_linear = merged_deltas(sources, MergeSpec("m", ("a", "a_twin"), weights, "linear"))
    _, exact_self = merged_deltas(sources, MergeSpec("m", ("a", "a_twin"), weights, "exact_linear"))
    too_strong = (math.sqrt(0.7) + math.sqrt(0.3)) ** 2
    for module, delta in own.items():
        torch.testing.assert_close(exact_self[module], delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(peft_linear[module], too_strong * delta, rtol=1e-4, atol=1e-6)
    assert too_strong == pytest.approx(1.917, abs=1e-3)


def test_exact_linear_compressed_to_its_true_rank_is_still_exact(sources):
    expected = weighted_dense_sum(sources, ("a", "b"), (0.5, 0.5))
    config, compressed = merged_deltas(sources, MergeSpec("m", ("a", "b"), (0.5, 0.5), "exact_linear", rank=12))
    assert config["r"] == 12
    for module, delta in expected.items():
        torch.testing.assert_close(compressed[module], delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rank", [None, 6])
def test_fast_svd_matches_peft_dense_svd(sources, rank):
    spec = MergeSpec("m", ("a", "b"), (0.6, 0.4), "svd", rank=rank)
    fast_config, fast = merged_deltas(sources, spec)
    peft_config, dense = merged_deltas(sources, MergeSpec(**{**spec.__dict__, "engine": "peft"}))
    assert fast_config["r"] == peft_config["r"] == (rank or 8)
    for module in dense:
        s_fast = torch.linalg.svdvals(fast[module].double())[: fast_config["r"]]
        s_peft = torch.linalg.svdvals(dense[module].double())[: fast_config["r"]]
        torch.testing.assert_close(s_fast, s_peft, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast[module], dense[module], rtol=1e-3, atol=1e-5)


def test_dare_is_reproducible_by_seed(sources):
    spec = MergeSpec("m", ("a", "b"), (0.5, 0.5), "dare_ties", density=0.5, seed=7)
    _, first = merge_adapters(opened(sources, spec.sources), spec)
    _, again = merge_adapters(opened(sources, spec.sources), spec)
    _, other = merge_adapters(opened(sources, spec.sources), MergeSpec(**{**spec.__dict__, "seed": 8}))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_refusals_name_the_problem_and_publish_nothing(sources, base, other_tiny_model, tmp_path):
    def refuse(error, match, spec, store=sources, **kwargs):
        before = store.list()
        with pytest.raises(error, match=match):
            merge_and_publish(store, spec, **kwargs)
        assert store.list() == before

    refuse(AdapterNotFound, "'nope'", MergeSpec("m", ("a", "nope"), (0.5, 0.5)))
    refuse(MergeError, "density", MergeSpec("m", ("a", "b"), (0.5, 0.5), "ties", density=1.5))
    refuse(MergeError, "density", MergeSpec("m", ("a", "b"), (0.5, 0.5), "ties", density=0.0))

    foreign = load_base(other_tiny_model)
    publish_random(sources, foreign, "foreign", r=8, alpha=16, seed=3)
    refuse(BaseModelMismatch, "foreign@1", MergeSpec("m", ("a", "foreign"), (0.5, 0.5)))

    first = merge_and_publish(sources, MergeSpec("m", ("a", "b"), (0.5, 0.5)))
    assert first.lineage["sources"] == [{"name": "a", "version": 1}, {"name": "b", "version": 1}]
    same = merge_and_publish(sources, MergeSpec("m", ("a", "b"), (0.5, 0.5)))
    assert same.ref == first.ref  # the same lineage is not merged twice
    changed = MergeSpec("m", ("a", "b"), (0.9, 0.1))
    refuse(MergeError, "m@1 is already published with different lineage", changed)
    second = merge_and_publish(sources, changed, overwrite=True)
    assert second.ref == "m@2" and second.lineage["weights"] == [0.9, 0.1]

    publish_random(sources, base, "b", r=4, alpha=8, seed=11)  # a retrained source: same recipe, fresh version
    third = merge_and_publish(sources, changed)
    assert third.ref == "m@3" and third.lineage["sources"][1] == {"name": "b", "version": 2}
