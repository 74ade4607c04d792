"""`madapt init DIR`: a starter project copied from the examples shipped inside the package.

The repository's examples/ and serve_configs/ are the packages madapt.examples and madapt.serve_configs in
the wheel (pyproject.toml maps them), so a `pip install madapt` user gets the same files as a checkout.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path, PurePosixPath
from string import Template

import yaml

from madapt.errors import UserError

TRAIN_SOURCE = "multi_adapter.yaml"
"""The example in madapt.examples that becomes the starter training config."""
SERVE_SOURCE = "multi_adapter.yaml"
"""The config in madapt.serve_configs that becomes the starter serve config."""
TRAIN_CONFIG = "multi_adapter.yaml"
SERVE_CONFIG = "serve.yaml"
CONFIG_ARG = re.compile(r"(?m)^(\s+config:\s*)\S+")
"""The serve config's `config:` arg, which the starter points at the training config it writes."""

TRAIN_HEADER = """\
# Written by `madapt init`: two LoRA adapters on the embedded SmolLM2-135M, each with its own tiny dataset
# (paths relative to this file), merged by TIES. Next:
#   madapt validate $config
#   madapt train $config        # Ray Train; `backend: {type: local}` trains in-process instead
#   madapt serve $serve
"""
SERVE_HEADER = """\
# Written by `madapt init`: every adapter in the store, served from the embedded SmolLM2-135M through one
# OpenAI-compatible endpoint, after `madapt train $config` published coding, chat and coding_chat.
#   madapt serve $serve    # or: serve run $serve
#   curl localhost:8000/v1/chat/completions -d '{"model": "coding", "messages": [{"role": "user", "content": "hi"}]}'
# `config:` is the training config: base_model, store, active (model "default") and generation come from it.
"""


class StarterError(UserError, ValueError):
    """`madapt init` would overwrite files, or the shipped example is unusable; the message says which."""


def _without_leading_comments(text: str) -> str:
    """The example's own header comments describe the repository layout; the starter writes its own."""
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def _datasets(config_text: str) -> list[str]:
    """Relative dataset paths the training config names (top level and per adapter), in order."""
    document = yaml.safe_load(config_text)
    paths = [document.get("dataset"), document.get("eval_dataset")]
    for adapter in ((document.get("adapters") or {}).get("adapters") or {}).values():
        paths += [adapter.get("dataset"), adapter.get("eval_dataset")]
    found: list[str] = []
    for path in paths:
        if path is None or path in found:
            continue
        pure = PurePosixPath(path)
        if pure.is_absolute() or ".." in pure.parts:
            raise StarterError(f"example {TRAIN_SOURCE}: dataset {path!r} is not inside the examples")
        found.append(path)
    return found


def starter_files() -> dict[str, bytes]:
    """Relative path in the target directory -> content: training config, serve config and its datasets."""
    examples = files("madapt.examples")
    names = {"config": TRAIN_CONFIG, "serve": SERVE_CONFIG}
    train_text = examples.joinpath(TRAIN_SOURCE).read_text(encoding="utf-8")
    serve_text = files("madapt.serve_configs").joinpath(SERVE_SOURCE).read_text(encoding="utf-8")
    written = {
        TRAIN_CONFIG: (Template(TRAIN_HEADER).safe_substitute(names) + _without_leading_comments(train_text)).encode(),
        SERVE_CONFIG: (Template(SERVE_HEADER).safe_substitute(names) + _without_leading_comments(serve_text)).encode(),
    }
    for path in _datasets(train_text):
        written[path] = examples.joinpath(*PurePosixPath(path).parts).read_bytes()
    return written


def init_project(directory: str | Path, *, force: bool = False) -> list[Path]:
    """Write the starter files into `directory` (created if missing); refuse to overwrite unless `force`.
    Returns the written paths, training config first."""
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise StarterError(f"{target} exists and is not a directory")
    content = starter_files()
    paths = {name: target.joinpath(*PurePosixPath(name).parts) for name in content}
    training = json.dumps(str(paths[TRAIN_CONFIG].resolve()))  # quoted: a valid YAML scalar for any path
    serve_text = content[SERVE_CONFIG].decode()
    content[SERVE_CONFIG] = CONFIG_ARG.sub(lambda match: match.group(1) + training, serve_text, count=1).encode()
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not force:
        raise StarterError(f"would overwrite {', '.join(existing)}; pass --force to replace them")
    for name, data in content.items():
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_bytes(data)
    return list(paths.values())
