"""Releases on a local store: labels, promote, rollback, untag, traffic splits, the resolution rule and its
cache (a fake clock), concurrent record writers, the CLI. The same records on S3 are in test_store_s3.py."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from madapt.cli import main
from madapt.store import ALIASES_FILE, SPLIT_FILE, AdapterNotFound, StoreError, releases
from madapt.store.refs import check_label
from madapt.store.releases import Resolver, draw
from tests.helpers import publish


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def three(store):
    for seed in range(3):
        publish(store, seed=seed)
    return store


def refs(resolver: Resolver, requested: str, users=(None,)) -> set[str]:
    return {resolver.resolve(requested, user).ref for user in users}


def test_the_rule_labels_promote_rollback_untag(three):
    store, resolver = three, Resolver(three, ttl_s=0)
    assert refs(resolver, "coding") == {"coding@3"}  # no label: the newest
    assert releases.tag(store, "coding@1", "canary") == "coding@canary"
    assert refs(resolver, "coding@canary") == {"coding@1"} and refs(resolver, "coding") == {"coding@3"}
    releases.promote(store, "coding@2")
    assert refs(resolver, "coding") == {"coding@2"} == refs(resolver, "coding@prod")
    assert refs(resolver, "coding@latest") == {"coding@3"} and refs(resolver, "coding@1") == {"coding@1"}
    releases.promote(store, "coding@1")
    releases.promote(store, "coding@1")  # the same target again: no history entry
    assert refs(resolver, "coding") == {"coding@1"}
    assert releases.rollback(store, "coding") == 2
    assert refs(resolver, "coding") == {"coding@2"}
    assert releases.rollback(store, "coding") is None  # before the first promote: not set
    assert refs(resolver, "coding") == {"coding@3"}
    with pytest.raises(AdapterNotFound, match="no label 'prod'"):
        resolver.resolve("coding@prod")
    with pytest.raises(StoreError, match="no earlier version"):
        releases.rollback(store, "coding")
    assert releases.untag(store, "coding", "canary") == 1
    with pytest.raises(AdapterNotFound, match="no label 'canary'"):
        resolver.resolve("coding@canary")
    assert releases.rollback(store, "coding", "canary") == 1  # an untag is rolled back like any change
    record = store.read_record("coding", ALIASES_FILE)
    assert record["aliases"] == {"canary": 1} and set(record) >= {"history", "write", "updated"}


def test_labels_are_validated_and_tags_need_a_published_version(three):
    for bad in ("3", "latest", "../x", "", "a" * 65, "pr od", "prod\n"):
        with pytest.raises(StoreError):
            check_label(bad)
        with pytest.raises(StoreError):
            releases.tag(three, "coding@1", bad)
    with pytest.raises(AdapterNotFound, match="no version 9"):
        releases.tag(three, "coding@9", "prod")
    with pytest.raises(StoreError, match="NAME@N"):
        releases.promote(three, "coding")
    with pytest.raises(StoreError, match="9 digits"):
        releases.promote(three, "coding@" + "1" * 50)
    with pytest.raises(StoreError):
        Resolver(three).resolve("coding@")
    assert releases.tag(three, "coding@latest", "v-3_ok") == "coding@v-3_ok"


def test_deleted_versions_stop_resolving_and_labels_fall_back(three):
    store, resolver = three, Resolver(three, ttl_s=0)
    releases.promote(store, "coding@2")
    releases.promote(store, "coding@3")
    store.delete("coding@3")
    with pytest.raises(AdapterNotFound, match=r"coding@3 was deleted"):
        resolver.resolve("coding@3")
    assert refs(resolver, "coding") == {"coding@2"} == refs(resolver, "coding@prod")  # as if rolled back
    assert resolver.card("coding")["aliases"] == {"prod": "coding@2"}
    store.delete("coding@2")
    assert refs(resolver, "coding") == {"coding@1"}  # prod was unset before coding@2: the newest
    with pytest.raises(AdapterNotFound, match="points at coding@3, which was deleted"):
        resolver.resolve("coding@prod")
    assert releases.rollback(store, "coding") is None  # past the deleted coding@2: not set
    with pytest.raises(AdapterNotFound, match="no label 'prod'"):
        resolver.resolve("coding@prod")
    store.delete("coding@1")
    with pytest.raises(AdapterNotFound, match="no published version"):
        resolver.resolve("coding")


def test_a_split_is_sticky_per_user_and_random_without_one(three):
    store, resolver = three, Resolver(three, ttl_s=0)
    releases.tag(store, "coding@2", "candidate")
    releases.set_split(store, "coding", releases.parse_arms(["coding@1=50", "coding@candidate=50"]))
    users = [f"user-{i}" for i in range(40)]
    first = {u: resolver.resolve("coding", u) for u in users}
    assert {r.ref for r in first.values()} == {"coding@1", "coding@2"}  # different users, both arms
    assert {r.arm for r in first.values()} == {"coding@1", "coding@candidate"}
    assert all(resolver.resolve("coding", u) == first[u] for u in users for _ in range(3))  # one user, one arm
    anonymous = Counter(resolver.resolve("coding").ref for _ in range(200))
    assert anonymous.keys() == {"coding@1", "coding@2"} and min(anonymous.values()) > 50
    assert refs(resolver, "coding@3") == {"coding@3"}  # explicit refs bypass the split

    store.delete("coding@1")  # a dead arm is left out of the draw
    assert refs(resolver, "coding", users) == {"coding@2"}
    releases.untag(store, "coding", "candidate")  # no live arm: the split is ignored
    assert refs(resolver, "coding", users) == {"coding@3"}
    releases.clear_split(store, "coding")
    assert store.read_record("coding", SPLIT_FILE)["arms"] == {}


def test_weights_follow_the_split_and_bad_splits_are_refused(three):
    arms = [("a", 90), ("b", 10)]
    drawn = Counter(draw("coding", arms, f"u{i}") for i in range(2000))
    assert 1700 < drawn["a"] < 1900
    for specs, message in (
        (["coding@1=50"], "2 to 8 arms"),
        (["coding@1=0", "coding@2=0"], "not all 0"),
        (["coding@1=x", "coding@2=1"], "NAME@VERSION=WEIGHT"),
        (["coding@1=1", "coding@1=2"], "twice"),
        (["coding@1=1", "coding@7=1"], "no version 7"),
        (["coding@1=1", "coding=1"], "name a version or a label"),
        (["coding@1=1", "coding@nolabel=1"], "no label"),
    ):
        with pytest.raises(StoreError, match=message):
            releases.set_split(three, "coding", releases.parse_arms(specs))
    with pytest.raises(AdapterNotFound):
        releases.set_split(three, "nope", {"coding@1": 1, "coding@2": 1})


def test_the_cache_costs_no_store_reads_and_changes_show_within_the_ttl(three):
    clock = Clock()
    store, resolver = three, Resolver(three, ttl_s=2.0, clock=clock)
    assert resolver.resolve("coding").ref == "coding@3" and resolver.reads["state"] == 1
    for _ in range(50):
        assert resolver.fresh("coding") and resolver.resolve("coding").ref == "coding@3"
    assert resolver.reads["state"] == 1  # steady state: no store round trip

    publish(store, seed=9)
    releases.promote(store, "coding@1")
    clock.now += 1.9
    assert resolver.resolve("coding").ref == "coding@3"  # still cached
    clock.now += 0.1
    assert not resolver.fresh("coding")
    assert resolver.resolve("coding").ref == "coding@1"  # at the bound: re-read
    assert resolver.resolve("coding@4").ref == "coding@4"

    with pytest.raises(AdapterNotFound):
        resolver.resolve("later")
    publish(store, "later")
    with pytest.raises(AdapterNotFound):  # unknown names are cached too (a flood of them stays cheap)
        resolver.resolve("later")
    clock.now += 2.0
    assert resolver.resolve("later").ref == "later@1"


def test_the_listing_reads_each_manifest_once_and_shows_releases(three):
    clock = Clock()
    store, resolver = three, Resolver(three, ttl_s=2.0, clock=clock)
    publish(store, "sql")
    releases.promote(store, "coding@2")
    releases.set_split(store, "coding", {"coding@2": 90, "coding@3": 10})
    cards = {c["id"]: c for c in resolver.cards(lambda entry, error: None)}
    assert cards.keys() == {"coding", "sql"}
    coding = cards["coding"]
    assert (coding["version"], coding["versions"], coding["latest"]) == (2, [1, 2, 3], 3)
    assert coding["aliases"] == {"prod": "coding@2"} and coding["default"] == "coding@2"
    assert coding["split"] == {"coding@2": 90, "coding@3": 10} and cards["sql"]["split"] is None
    assert resolver.reads["manifest"] == 2  # what each name serves, not every version
    for _ in range(5):
        resolver.cards(lambda entry, error: None)
    assert resolver.reads == Counter({"names": 1, "state": 2, "manifest": 2})
    clock.now += 2
    resolver.cards(lambda entry, error: None)
    assert resolver.reads["manifest"] == 2 and resolver.reads["state"] == 4  # manifests are immutable

    Path(store.root, "sql", ALIASES_FILE).write_text("{not json")  # one skipped entry, not a broken listing
    skipped = []
    clock.now += 2
    assert [c["id"] for c in resolver.cards(lambda entry, error: skipped.append(entry))] == ["coding"]
    assert skipped == ["sql"]


def test_concurrent_record_writers_lose_nothing(store):
    publish(store)
    threads = [threading.Thread(target=releases.tag, args=(store, "coding@1", f"t{i}")) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(store.read_record("coding", ALIASES_FILE)["aliases"]) == {f"t{i}" for i in range(8)}
    leftovers = sorted(p.name for p in Path(store.root, "coding").iterdir())
    assert leftovers == [".aliases.json.lock", "1", ALIASES_FILE]  # no temporary files left


def test_cli_releases(three, capsys):
    uri = three.uri

    def run(*argv: str) -> tuple[int, str]:
        code = main(["adapters", *argv, "--store", uri])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    assert run("tag", "coding@1", "canary") == (0, "coding@canary -> coding@1\n")
    assert run("promote", "coding@2")[0] == 0
    assert run("promote", "coding@1")[0] == 0
    assert run("rollback", "coding") == (0, "coding@prod -> coding@2\n")
    assert run("untag", "coding@canary") == (0, "removed coding@canary (was coding@1)\n")
    assert run("untag", "coding", "prod")[0] == 0
    assert run("rollback", "coding", "--label", "prod") == (0, "coding@prod -> coding@2\n")
    code, out = run("split", "coding", "coding@1=90", "coding@3=10")
    assert code == 0 and "coding@1 90.0%" in out
    assert three.read_record("coding", SPLIT_FILE)["arms"] == {"coding@1": 90, "coding@3": 10}
    assert "coding: labels prod -> coding@2; split coding@1=90, coding@3=10" in run("list")[1]
    assert run("split", "coding", "--clear")[0] == 0
    assert three.read_record("coding", SPLIT_FILE)["arms"] == {}
    for bad in (("tag", "coding@1"), ("tag", "coding@1", "7"), ("promote", "coding@9"), ("untag", "coding"),
                ("split", "coding"), ("split", "coding", "coding@1=1", "--clear"), ("rollback", "nope")):  # fmt: skip
        code, out = run(*bad)
        assert code == 2 and out.startswith("error: "), (bad, out)
    assert not Path(uri, "nope").exists()  # refusals write nothing


def test_card_created_is_read_back_as_utc(store):
    """The store writes `created` in UTC; the model card's epoch seconds must not shift by the local zone."""
    before = int(time.time())
    publish(store)
    after = int(time.time())
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XYZ+05"  # five hours west of UTC, a POSIX rule: needs no tz database
    time.tzset()
    try:
        assert time.timezone == 5 * 3600
        assert releases._epoch("1970-01-02T00:00:00Z") == 86_400
        created = Resolver(store, ttl_s=0).card("coding")["created"]
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()
    assert before - 1 <= created <= after + 1  # the store's clock has whole seconds
