"""`madapt bench cli`: CPU time of the commands a user runs first (`madapt --help`, `madapt validate`), each a
fresh process as in a shell, beside the interpreter's own start-up and what the same process paid when the CLI
imported torch, transformers and PEFT up front (the baseline, measured in the same run).

CPU time (user + system of the child, from getrusage) rather than wall-clock: it is what a loaded 2-core
machine multiplies, and it does not count waiting for a core. Each row is the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from madapt.bench import save_report

RESULTS = Path("benchmarks/results/cli")
HEAVY = ("torch", "transformers", "peft", "ray")
PROBE = """
import json, sys
from madapt.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)
"""
"""A command run in-process, then the heavy libraries its process holds, as JSON on stderr's last line."""


def cpu_seconds(command: list[str]) -> tuple[float, str]:
    """The child's user + system CPU seconds, and what it wrote to stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 2):
        raise RuntimeError(f"{command}: exit {done.returncode}\n{done.stderr}")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used, done.stderr


def measure(command: list[str], repeat: int) -> dict[str, float]:
    times = [cpu_seconds(command)[0] for _ in range(repeat)]
    return {"median_cpu_s": statistics.median(times), "best_cpu_s": min(times), "runs": repeat}


def loaded_modules(argv: list[str]) -> list[str]:
    """The heavy libraries a command's process ends up holding."""
    _, stderr = cpu_seconds([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)])
    return json.loads(stderr.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="madapt bench cli", description=__doc__)
    parser.add_argument("--config", default="examples/multi_adapter.yaml", help="the config to validate")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    python = sys.executable
    commands = {
        "python -c pass (interpreter start-up)": [python, "-c", "pass"],
        "madapt --help": [python, "-m", "madapt.cli", "--help"],
        f"madapt validate {args.config}": [python, "-m", "madapt.cli", "validate", args.config],
        f"madapt plan {args.config}": [python, "-m", "madapt.cli", "plan", args.config],
        f"madapt adapters list --config {args.config}": [
            python,
            "-m",
            "madapt.cli",
            "adapters",
            "list",
            "--config",
            args.config,
        ],
        "import torch, transformers, peft (the baseline: what an eager CLI paid)": [
            python,
            "-c",
            "import torch, transformers, peft",
        ],
    }
    rows = {label: measure(command, args.repeat) for label, command in commands.items()}
    baseline = rows[next(label for label in rows if label.startswith("import torch"))]["median_cpu_s"]
    loaded = {
        argv[0]: loaded_modules(argv)
        for argv in (
            ["--help"],
            ["validate", args.config],
            ["plan", args.config],
            ["adapters", "list", "--config", args.config],
        )
    }
    lines = [
        f"# madapt bench cli ({platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})",
        "",
        f"| command | CPU s (median of {args.repeat}) | x baseline |",
        "| --- | ---: | ---: |",
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['median_cpu_s']:.2f} | {row['median_cpu_s'] / baseline:.2f}x |")
    lines += [""] + [f"heavy libraries loaded by `madapt {c}`: {', '.join(m) or 'none'}" for c, m in loaded.items()]
    report = {"rows": rows, "loaded": loaded, "machine": platform.platform(), "python": platform.python_version()}
    save_report(args.out, "cli", report, lines)
    return 0
