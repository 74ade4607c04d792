"""matplotlib is optional (`pip install madapt[plots]`): chart writers get pyplot here, or skip their PNG."""

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
