"""Metric label values are bounded whatever the number of adapters (the names themselves are checked on
Ray's Prometheus endpoint: tests/serve/test_serve.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from madapt.serve.metrics import OTHER, BoundedLabels


def test_adapter_labels_are_names_and_bounded():
    labels = BoundedLabels(limit=3)
    assert [labels.adapter(r) for r in ("coding@1", "coding@2", "chat@latest", "base")] == [
        "coding",
        "coding",
        "chat",
        "base",
    ]
    assert labels.adapter("sql@1") == OTHER and labels.adapter("coding@9") == "coding"  # the first 3 keep theirs
    with ThreadPoolExecutor(8) as pool:
        shown = set(pool.map(labels.adapter, [f"a{i}@1" for i in range(1000)]))
    assert shown == {OTHER} and len(labels.seen) == 3
