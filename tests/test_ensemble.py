"""`ensemble` on the local backend: k members on disjoint deterministic shards, merged with the declared
strategy and published under the adapter's name with lineage; `madapt eval` scores each member and the merge."""

from __future__ import annotations

import pytest

from madapt.config import ConfigError, parse_config
from madapt.ensemble import shard
from madapt.evaluate import evaluate_config, format_table, write_report
from madapt.models import load_base
from madapt.splits import load_splits
from madapt.store import AdapterStore
from madapt.train.local import train_local
from tests.helpers import tiny_config


def ensemble_document(tiny_model: str, store: str, **ensemble) -> dict:
    document = tiny_config(tiny_model, store)
    coding = {**document["adapters"]["adapters"]["coding"], "ensemble": {"members": 2, **ensemble}}
    document["adapters"] = {"adapters": {"coding": coding}}
    document["trainer"]["max_steps"] = 2
    return document


def test_ensemble_trains_members_on_disjoint_shards_and_publishes_their_merge(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MADAPT_HOME", str(tmp_path / "home"))
    config = parse_config(ensemble_document(tiny_model, str(tmp_path / "store"), combination_type="ties"))
    store = AdapterStore(config.storage.uri)
    merged = train_local(config, "coding", store, progress=False)

    train, held_out = load_splits(config, "coding")
    shards = [shard(train, i, 2) for i in (1, 2)]
    assert sorted(e.prompt for s in shards for e in s) == sorted(e.prompt for e in train)  # disjoint, complete
    assert not {e.prompt for s in shards for e in s} & {e.prompt for e in held_out}  # eval data stays out
    assert all(shards) and shards == [shard(list(reversed(train)), i, 2)[::-1] for i in (1, 2)]  # row order free
    members = [store.manifest(f"coding-m{i}") for i in (1, 2)]
    assert [m.metrics["examples"] for m in members] == [len(s) for s in shards]
    assert merged.ref == "coding@1" and merged.lineage is not None
    assert merged.lineage["sources"] == [{"name": "coding-m1", "version": 1}, {"name": "coding-m2", "version": 1}]
    assert merged.lineage["combination_type"] == "ties" and merged.lineage["density"] == 0.7
    assert merged.lineage["weights"] == [0.5, 0.5]

    report = evaluate_config(config, load_base(tiny_model), store)
    assert report.models == ["base", "coding-m1@1", "coding-m2@1", "coding@1"] and report.splits == ["coding"]
    assert report.tokens["coding"] > 0 and len({report.losses[m]["coding"] for m in report.models}) == 4
    table = format_table(report)
    assert all(model in table for model in report.models)
    _, png = write_report(report, tmp_path / "report")
    assert png is None or png.stat().st_size > 1000


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        ({"coding": {"ensemble": {"members": 1}}}, "adapters.adapters.coding.ensemble.members: Input should be"),
        ({"coding": {"ensemble": {"members": 2}}, "coding-m2": {}}, "member name 'coding-m2' is already declared"),
        ({"coding": {"ensemble": {"members": 2, "density": 0.5}}}, "density is only used by"),
        ({"c" * 62: {"ensemble": {"members": 2}}}, "use a shorter adapter name"),
    ],
)
def test_ensemble_rules_name_the_key(tiny_model, adapters, message):
    document = {"base_model": tiny_model, "adapters": {"adapters": adapters}, "backend": "local"}
    with pytest.raises(ConfigError) as error:
        parse_config(document)
    assert any(message in problem for problem in error.value.problems), error.value.problems
