"""The replica's Prometheus metrics, as Ray exports them.

Ray's exporter shows a metric named `madapt_x` as `ray_madapt_x` (counters with a `_total` suffix,
histograms as `_bucket`/`_sum`/`_count`), tagged by Serve with the application, deployment and replica;
docs/serving.md lists the names as shown. Latencies are in seconds. Label values are bounded: an adapter is
labelled by its name without the version, and only the first `MAX_ADAPTER_LABELS` names a replica sees
have their own label; the rest are counted as `other`, so a store with thousands of adapters cannot
blow up the time series. The ingress's `SplitMetrics` are tagged by traffic-split arm.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Counter_
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

MAX_ADAPTER_LABELS = 32
OTHER = "other"
SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


class BoundedLabels:
    """The first `limit` distinct values keep their own label; later ones are `other`. Thread-safe."""

    def __init__(self, limit: int = MAX_ADAPTER_LABELS):
        self.limit, self.seen, self.lock = limit, set[str](), threading.Lock()

    def __call__(self, value: str) -> str:
        with self.lock:
            if value in self.seen:
                return value
            if len(self.seen) < self.limit:
                self.seen.add(value)
                return value
        return OTHER

    def adapter(self, ref: str) -> str:
        """The label of an adapter reference (`coding@3` -> `coding`)."""
        return self(ref.partition("@")[0])


def replica_metrics() -> dict[str, Any]:
    """The replica's metrics by short name (created once per replica process)."""
    adapter = ("adapter",)
    return {
        "requests": Counter("madapt_requests", "Requests per adapter and HTTP status.", tag_keys=("adapter", "status")),
        "tokens": Counter("madapt_tokens", "Tokens per adapter (rate() gives tokens/s).", tag_keys=("adapter", "kind")),
        "cache": Counter("madapt_adapter_cache", "Adapter cache hits, misses, loads, evictions.", tag_keys=("event",)),
        "load_s": Histogram(
            "madapt_adapter_load_seconds",
            "Adapter load time by source (store, object store or host tier).",
            boundaries=SECONDS,
            tag_keys=("source",),
        ),
        "tier_bytes": Gauge(
            "madapt_adapter_bytes", "Adapter bytes held per cache tier (device, host).", tag_keys=("tier",)
        ),
        "tier_loads": Counter(
            "madapt_adapter_tier_loads", "Adapter loads by the tier they came from (store, host).", tag_keys=("tier",)
        ),
        "tier_load_s": Histogram(
            "madapt_adapter_tier_load_seconds",
            "Adapter load time by the tier it came from (store: registry or store read; host: host-memory tier).",
            boundaries=SECONDS,
            tag_keys=("tier",),
        ),
        "first_token_s": Histogram(
            "madapt_time_to_first_token_seconds",
            "From a request reaching the replica to its first token.",
            boundaries=SECONDS,
            tag_keys=adapter,
        ),
        "latency_s": Histogram(
            "madapt_request_latency_seconds",
            "End to end on the replica: from a request reaching it to its last token.",
            boundaries=SECONDS,
            tag_keys=adapter,
        ),
        "queue_s": Histogram(
            "madapt_queue_time_seconds",
            "From a row being submitted to its prefill starting.",
            boundaries=SECONDS,
            tag_keys=adapter,
        ),
        "request_tokens": Histogram(
            "madapt_request_tokens",
            "Tokens per request, prompt and completion.",
            boundaries=TOKENS,
            tag_keys=("adapter", "kind"),
        ),
        "queue_depth": Gauge("madapt_queue_depth", "Rows waiting to join the running batch."),
        "running": Gauge("madapt_running_rows", "Rows in the running batch."),
    }


class SplitMetrics:
    """An ingress replica's metrics of the requests a traffic split routed, tagged by split arm (at most
    `MAX_ARMS` per split: madapt.store.releases): status, tokens and latency, and a tally for `stats()`."""

    def __init__(self) -> None:
        self.arms: Counter_[tuple[str, str, str]] = Counter_()  # (model, arm, status): requests per split arm
        self.requests = Counter(
            "madapt_split_requests", "Requests per traffic-split arm.", tag_keys=("model", "arm", "status")
        )
        self.tokens = Counter("madapt_split_tokens", "Tokens per traffic-split arm.", tag_keys=("model", "arm", "kind"))
        self.latency_s = Histogram(
            "madapt_split_latency_seconds",
            "Request latency per traffic-split arm (until the last token).",
            boundaries=SECONDS,
            tag_keys=("model", "arm"),
        )

    def count(
        self, model: str, arm: str, status: str, started: float, last: dict[str, Any] | None, prompt_tokens: int
    ) -> None:
        """One request a split routed to `arm`: its status, and when it succeeded its tokens and latency."""
        self.arms[(model, arm, status)] += 1
        self.requests.inc(tags={"model": model, "arm": arm, "status": status})
        if status != "200" or last is None:
            return
        self.latency_s.observe(time.perf_counter() - started, tags={"model": model, "arm": arm})
        for kind, tokens in (("prompt", prompt_tokens), ("completion", last["usage"]["completion_tokens"])):
            if tokens:
                self.tokens.inc(tokens, tags={"model": model, "arm": arm, "kind": kind})

    def stats(self) -> dict[str, int]:
        """Requests per split arm and status seen by this ingress replica, as 'model|arm|status' -> count."""
        return {"|".join(key): n for key, n in sorted(self.arms.items())}
