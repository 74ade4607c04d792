"""Releases: labels on versions, the default label, rollback, traffic splits, and the cached resolver.

Everything lives in the store, next to the versions (see `madapt.store.adapters` for the atomic writes):

    <root>/<name>/aliases.json   {"aliases": {"prod": 4, "canary": 5}, "history": {"prod": [null, 2, 3]}}
    <root>/<name>/split.json     {"arms": {"coding@3": 90, "coding@4": 10}}

**The resolution rule** (what the ingress and `madapt predict`-style callers apply to a requested id):

1. `base` is the base model.
2. `NAME@N` is version N: 404 when N was never published, 404 "was deleted" when it was deleted.
3. `NAME@latest` is the newest published version, whatever the labels say.
4. `NAME@LABEL` is the version the label points at (404 when the label is not set).
5. `NAME` with a traffic split: one of the split's arms (each an explicit `OTHER@N` or `OTHER@LABEL`,
   resolved by rules 2-4), drawn by weight. With an OpenAI `user`, the draw is a hash of (NAME, user), so
   one user always lands on the same arm while the weights stay; without one it is random.
6. `NAME` without a split: the version the default label `prod` points at (`promote NAME@V` sets it);
   without one, the newest published version.

Refs are read by `madapt.store.refs`. Labels are validated like adapter names, and may not be all digits or
`latest`. Every label keeps a short
history of what it pointed at (`HISTORY` entries; null for "not set"). `rollback NAME` moves `prod` back
to its previous target, skipping versions deleted since; after the first promote that is "not set", so
`NAME` is again the newest version. A label whose version was deleted resolves as if rolled back past
it (without writing anything); one with no live earlier target counts as not set. An arm that does
not resolve (its version deleted, its label removed) is left out of the draw; a split with no live arm
is ignored.

`Resolver` applies the rule through a cache: each adapter's state (published and deleted versions,
labels, split: one listing and two small reads) is kept for `ttl_s` seconds, the `/v1/models` listing
likewise, and manifests (immutable per version) for good. In the steady state a request costs no store
round trip, and any change made in the store (publish, tag, promote, rollback, untag, split, delete) is
served within `ttl_s` by every replica that resolves.
"""

from __future__ import annotations

import calendar
import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from madapt.store.adapters import AdapterStore
from madapt.store.errors import AdapterNotFound, StoreError
from madapt.store.manifest import ALIASES_FILE, SPLIT_FILE, TIME_FORMAT, Manifest
from madapt.store.refs import Ref, check_label, name_of

BASE_ID = "base"  # as madapt.predict.BASE_ID (not imported: that module loads torch models)
DEFAULT_LABEL = "prod"
HISTORY = 10
MAX_ARMS = 8  # bounds the `arm` tag of the split metrics
MAX_WEIGHT = 1_000_000
MAX_NAMES = 4096  # resolver cache entries (unknown names are cached too, so a flood of them stays cheap)


@dataclass(frozen=True)
class State:
    """One adapter's releases as read from the store at one moment."""

    name: str
    versions: tuple[int, ...] = ()
    deleted: frozenset[int] = frozenset()
    aliases: dict[str, int] = field(default_factory=dict)
    history: dict[str, list[int | None]] = field(default_factory=dict)
    arms: dict[str, int] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return bool(self.versions or self.deleted)

    def version(self, version: int) -> int:
        if version in self.deleted:
            raise AdapterNotFound(f"{self.name}@{version} was deleted; published: {list(self.versions)}")
        if version not in self.versions:
            raise AdapterNotFound(f"adapter {self.name!r} has no version {version}; published: {list(self.versions)}")
        return version

    def newest(self) -> int:
        if not self.versions:
            deleted = sorted(self.deleted)
            raise AdapterNotFound(f"adapter {self.name!r} has no published version; deleted: {deleted}")
        return self.versions[-1]

    def target(self, label: str) -> int | None:
        """The live version `label` points at, walking its history back past deleted versions; None if unset."""
        if label not in self.aliases:
            return None
        for version in [self.aliases[label], *reversed(self.history.get(label, []))]:
            if version is None or version in self.versions:
                return version
        return None

    def label(self, label: str) -> int:
        check_label(label)
        version = self.target(label)
        if version is not None:
            return version
        if label in self.aliases:
            raise AdapterNotFound(f"{self.name}@{label} points at {self.name}@{self.aliases[label]}, which was deleted")
        raise AdapterNotFound(f"adapter {self.name!r} has no label {label!r}; labels: {sorted(self.aliases)}")

    def default(self) -> int:
        """What `NAME` resolves to without a split: the default label's version, else the newest."""
        target = self.target(DEFAULT_LABEL)
        return self.newest() if target is None else target

    def labels(self) -> dict[str, str]:
        """Each label with a live target, as `NAME@N`."""
        return {label: f"{self.name}@{v}" for label in sorted(self.aliases) if (v := self.target(label)) is not None}


@dataclass(frozen=True)
class Resolution:
    ref: str  # what serves the request: `NAME@N` or `base`
    arm: str | None = None  # the split arm drawn, as written in the split (`coding@4`), if any


def read_state(store: AdapterStore, name: str) -> State:
    """The store's current state for `name` (one listing and two small reads)."""
    published, deleted = store.issued(name)
    aliases = store.read_record(name, ALIASES_FILE) or {}
    split = store.read_record(name, SPLIT_FILE) or {}
    return State(
        name=name,
        versions=tuple(published),
        deleted=frozenset(deleted),
        aliases={k: v for k, v in (aliases.get("aliases") or {}).items() if type(v) is int},
        history={k: [x for x in v if x is None or type(x) is int] for k, v in (aliases.get("history") or {}).items()},
        arms={k: v for k, v in (split.get("arms") or {}).items() if type(v) is int and v > 0},
    )


def draw(name: str, arms: list[tuple[str, int]], user: str | None) -> str:
    """An arm by weight: a hash of (name, user) when a user is given (sticky), else random."""
    total = sum(weight for _, weight in arms)
    if user:
        digest = hashlib.sha256(f"{name}\0{user}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") * total >> 64
    else:
        point = random.randrange(total)
    for arm, weight in arms:
        point -= weight
        if point < 0:
            return arm
    return arms[-1][0]


class Resolver:
    """Requested ids to refs by the rule above, through a per-adapter cache of `ttl_s` seconds."""

    def __init__(self, store: AdapterStore, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.store, self.ttl_s, self.clock = store, ttl_s, clock
        self.states: dict[str, tuple[float, State]] = {}
        self.manifests: dict[str, Manifest] = {}
        self.names: tuple[float, list[str]] | None = None
        self.reads: Counter[str] = Counter()  # store round trips by kind, for tests and debugging
        self.lock = threading.Lock()

    # -- the cache -------------------------------------------------------------------------------

    def fresh(self, requested: str) -> bool:
        """Whether resolving `requested` needs no store read now (callers on an event loop resolve inline
        then, and in a thread otherwise). Arms of a split are other names: they are checked too."""
        name = name_of(requested)
        if requested == BASE_ID:
            return True
        entry = self.states.get(name)
        if entry is None or self.clock() - entry[0] >= self.ttl_s:
            return False
        return "@" in requested or all(self.fresh(arm) for arm in entry[1].arms if name_of(arm) != name)

    def state(self, name: str) -> State:
        entry = self.states.get(name)
        now = self.clock()
        if entry is not None and now - entry[0] < self.ttl_s:
            return entry[1]
        self.reads["state"] += 1
        state = read_state(self.store, name)
        with self.lock:
            self.states.pop(name, None)
            self.states[name] = (now, state)
            while len(self.states) > MAX_NAMES:
                self.states.pop(next(iter(self.states)))
        return state

    def manifest(self, name: str, version: int) -> Manifest:
        ref = f"{name}@{version}"
        manifest = self.manifests.get(ref)
        if manifest is None:  # a version's manifest never changes (numbers are never issued twice)
            self.reads["manifest"] += 1
            manifest = self.store.manifest(ref)
            with self.lock:
                if len(self.manifests) >= MAX_NAMES:
                    self.manifests.clear()
                self.manifests[ref] = manifest
        return manifest

    def adapter_names(self) -> list[str]:
        now = self.clock()
        if self.names is None or now - self.names[0] >= self.ttl_s:
            self.reads["names"] += 1
            self.names = (now, self.store.names())
        return self.names[1]

    # -- the rule --------------------------------------------------------------------------------

    def resolve(self, requested: str, user: str | None = None) -> Resolution:
        if requested == BASE_ID:
            return Resolution(BASE_ID)
        ref = Ref.parse(requested)
        name, state = ref.name, self._existing(ref.name)
        if ref.suffix:
            return Resolution(f"{name}@{self._pinned(state, ref)}")
        live = []
        for arm, weight in sorted(state.arms.items()):
            try:
                live.append((arm, weight, self.resolve_arm(arm)))
            except StoreError:
                continue  # its version deleted or its label gone: not drawn
        if live:
            arm = draw(name, [(a, w) for a, w, _ in live], user)
            return Resolution(next(ref for a, _, ref in live if a == arm), arm)
        return Resolution(f"{name}@{state.default()}")

    def resolve_arm(self, arm: str) -> str:
        ref = Ref.parse(arm)
        if not ref.suffix:
            raise StoreError(f"split arm {arm!r}: name a version or a label (NAME@N or NAME@LABEL)")
        return f"{ref.name}@{self._pinned(self._existing(ref.name), ref)}"

    def _existing(self, name: str) -> State:
        state = self.state(name)
        if not state.exists:
            raise AdapterNotFound(f"adapter {name!r} is not in the store")
        return state

    @staticmethod
    def _pinned(state: State, ref: Ref) -> int:
        if ref.latest:
            return state.newest()
        if ref.version is not None:
            return state.version(ref.version)
        return state.label(ref.suffix)

    # -- what /v1/models shows ---------------------------------------------------------------------

    def card(self, requested: str) -> dict[str, Any]:
        """The model card of `NAME` or `NAME@VERSION|LABEL|latest`, with releases as extra fields."""
        ref = Ref.parse(requested)
        name, suffix, state = ref.name, ref.suffix, self._existing(ref.name)
        version = self._pinned(state, ref) if suffix else state.default()
        manifest = self.manifest(name, version)
        return {
            "id": requested,
            "object": "model",
            "created": _epoch(manifest.created),
            "owned_by": "madapt",
            "root": manifest.base_model,
            "parent": BASE_ID,
            "version": version,
            "versions": list(state.versions),
            "latest": state.versions[-1] if state.versions else None,
            "aliases": state.labels(),
            "default": f"{name}@{version}" if not suffix else None,
            "split": dict(sorted(state.arms.items())) or None,
        }

    def cards(self, skip: Callable[[str, Exception], None]) -> list[dict[str, Any]]:
        """A card per adapter with a published version; an entry that cannot be read goes to `skip`."""
        cards = []
        for name in self.adapter_names():
            try:
                cards.append(self.card(name))
            except Exception as error:
                skip(name, error)
        return cards


def _epoch(created: str) -> int:
    """A manifest's `created` (UTC, as the store writes it) as Unix seconds; 0 when unreadable."""
    try:
        return calendar.timegm(time.strptime(created, TIME_FORMAT))
    except (ValueError, TypeError, OverflowError):
        return 0


# -- changing releases (what `madapt adapters tag|promote|rollback|untag|split` call) ----------------


def _explicit(store: AdapterStore, ref: str) -> tuple[str, int]:
    """`NAME@N` (or `NAME@latest`, taken as the newest now) of a published version."""
    parsed = Ref.parse(ref)
    state = read_state(store, parsed.name)
    if parsed.latest:
        return parsed.name, state.newest()
    if parsed.version is None:
        raise StoreError(f"{ref!r}: name a version, as NAME@N")
    return parsed.name, state.version(parsed.version)


def _aliases(record: dict[str, Any] | None) -> tuple[dict[str, int], dict[str, list[int | None]]]:
    record = record or {}
    return dict(record.get("aliases") or {}), {k: list(v) for k, v in (record.get("history") or {}).items()}


def _point(label: str, version: int | None) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
    """A change that points `label` at `version` (None: unset), remembering where it pointed before."""

    def change(record: dict[str, Any] | None) -> dict[str, Any]:
        aliases, history = _aliases(record)
        previous = aliases.get(label)
        if previous == version:
            return {"aliases": aliases, "history": history}
        history[label] = [*history.get(label, []), previous][-HISTORY:]
        if version is None:
            aliases.pop(label, None)
        else:
            aliases[label] = version
        return {"aliases": aliases, "history": history}

    return change


def tag(store: AdapterStore, ref: str, label: str) -> str:
    """Point `label` at the published version `ref` (NAME@N); returns `NAME@LABEL`."""
    check_label(label)
    name, version = _explicit(store, ref)
    store.update_record(name, ALIASES_FILE, _point(label, version))
    return f"{name}@{label}"


def promote(store: AdapterStore, ref: str) -> str:
    """Make `ref` what `NAME` resolves to: the default label `prod` points at it."""
    return tag(store, ref, DEFAULT_LABEL)


def untag(store: AdapterStore, name: str, label: str) -> int:
    """Remove `label` (its history is kept, so `rollback` can restore it); returns the version it named."""
    check_label(label)
    Ref.parse(name)
    found = (store.read_record(name, ALIASES_FILE) or {}).get("aliases") or {}
    if label not in found:
        raise AdapterNotFound(f"adapter {name!r} has no label {label!r}; labels: {sorted(found)}")
    store.update_record(name, ALIASES_FILE, _point(label, None))
    return int(found[label])


def rollback(store: AdapterStore, name: str, label: str = DEFAULT_LABEL) -> int | None:
    """Point `label` back at its previous target, skipping versions deleted since; returns that version
    (None: the label was not set before, and is now removed)."""
    check_label(label)
    state = read_state(store, name)
    if not state.exists:
        raise AdapterNotFound(f"adapter {name!r} is not in the store")
    published = set(state.versions)

    def change(record: dict[str, Any] | None) -> dict[str, Any]:
        aliases, history = _aliases(record)
        earlier = history.get(label, [])
        while earlier and earlier[-1] is not None and earlier[-1] not in published:
            earlier.pop()  # deleted since
        if not earlier:
            raise StoreError(f"{name}@{label} has no earlier version to roll back to")
        version = earlier.pop()
        history[label] = earlier
        if version is None:
            aliases.pop(label, None)
        else:
            aliases[label] = version
        return {"aliases": aliases, "history": history}

    record = store.update_record(name, ALIASES_FILE, change)
    version = (record.get("aliases") or {}).get(label)
    return version if type(version) is int else None


def parse_arms(specs: list[str]) -> dict[str, int]:
    """['coding@3=90', 'coding@4=10'] -> {'coding@3': 90, 'coding@4': 10}."""
    arms: dict[str, int] = {}
    for spec in specs:
        arm, equals, weight = spec.rpartition("=")
        if not equals or not (weight.isascii() and weight.isdigit()) or len(weight) > 7:
            raise StoreError(f"split arm {spec!r}: expected NAME@VERSION=WEIGHT (a whole number)")
        if arm in arms:
            raise StoreError(f"split arm {arm!r} is given twice")
        arms[arm] = int(weight)
    return arms


def set_split(store: AdapterStore, name: str, arms: dict[str, int]) -> dict[str, int]:
    """Split requests for `name` between `arms` ({'coding@3': 90, 'coding@4': 10}); each arm must resolve now."""
    Ref.parse(name)
    if not 2 <= len(arms) <= MAX_ARMS:
        raise StoreError(f"a split needs 2 to {MAX_ARMS} arms, not {len(arms)}")
    if any(not 0 <= w <= MAX_WEIGHT for w in arms.values()) or not sum(arms.values()):
        raise StoreError(f"split weights are whole numbers from 0 to {MAX_WEIGHT}, not all 0")
    resolver = Resolver(store, ttl_s=0)
    for arm in arms:
        label = Ref.parse(arm).label
        if label is not None:
            check_label(label)
        resolver.resolve_arm(arm)
    if not read_state(store, name).exists:
        raise AdapterNotFound(f"adapter {name!r} is not in the store")
    store.update_record(name, SPLIT_FILE, lambda _: {"arms": dict(arms)})
    return arms


def clear_split(store: AdapterStore, name: str) -> None:
    Ref.parse(name)
    if not read_state(store, name).exists:
        raise AdapterNotFound(f"adapter {name!r} is not in the store")
    store.update_record(name, SPLIT_FILE, lambda _: {"arms": {}})
