"""matplotlib is optional (`pip install madapt[plots]`): chart writers get pyplot here, or skip their PNG; the
training loss curve of each published version is drawn here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MISSING = "install madapt[plots] for charts"


def pyplot(path: Path) -> Any | None:
    """matplotlib.pyplot on the Agg backend (no display needed), or None after one log line naming `path`."""
    try:
        import matplotlib
    except ImportError:
        log.warning("%s: skipped %s (matplotlib is not installed)", MISSING, path)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_plot_path(name: str, version: int) -> Path:
    """Each published version keeps its own curve: `MADAPT_HOME/runs/<adapter>/<version>/loss.png`."""
    from madapt.config import madapt_home

    return madapt_home() / "runs" / name / str(version) / "loss.png"


def plot_losses(name: str, version: int, losses: list[float]) -> Path | None:
    """The run's training loss per optimizer step as a PNG; None without matplotlib (madapt[plots])."""
    path = loss_plot_path(name, version)
    plt = pyplot(path)
    if plt is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(losses) + 1), losses, marker=".")
    axes.set(xlabel="optimizer step", ylabel="training loss", title=f"adapter {name} version {version}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
