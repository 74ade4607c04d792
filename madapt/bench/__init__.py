"""Benchmarks: each module has main(argv) -> int and reports ratios against a baseline from the same run."""

import json
from pathlib import Path


def save_report(out: Path, name: str, report: dict, lines: list[str]) -> None:
    """Write `name`.json (the whole report) and `name`.md (its table) under `out`, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    text = "\n".join(lines).rstrip("\n") + "\n"
    (out / f"{name}.md").write_text(text)
    print(text, end="")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `values` by nearest rank, 0.0 for none: one definition for every bench."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
