"""Reading a config: `load_config` (a YAML file, paths resolved beside it) and `parse_config` (a parsed
document), which run the Ludwig triage, the schema and every rule, and report all problems at once."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from madapt.config.adapters import LOCAL_ONLY_INITS
from madapt.config.backend import BackendConfig
from madapt.config.errors import ConfigError, format_validation_error
from madapt.config.ludwig import triage
from madapt.config.paths import locate_base_model
from madapt.config.rules import (
    adapter_paths,
    adapter_problems,
    cross_reference_problems,
    early_stop_problems,
    prompt_problems,
    quantization_problems,
    tracking_problems,
    training_problems,
)
from madapt.config.schema import Config

log = logging.getLogger("madapt.config")  # the name users and tests filter on, whichever module logs

MAX_DOCUMENT_NODES = 20_000
"""A config is a few hundred nodes; more than this, aliases expanded, is an alias bomb (or not a config)."""


def _check_size(data: Any, source: str) -> None:
    """Count nodes as a walk that follows aliases would see them, stopping at the cap: bounded time."""
    seen, stack = 0, [data]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_DOCUMENT_NODES:
            raise ConfigError(
                [f"(top level): the document expands to more than {MAX_DOCUMENT_NODES} nodes (a YAML alias bomb?)"],
                source,
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _resolve_ludwig(config: Config) -> list[str]:
    """Map Ludwig's names onto the settings madapt runs with; refuse contradictions."""
    problems = []
    trainer = config.trainer
    if trainer.train_steps is not None:
        if trainer.max_steps is not None and trainer.max_steps != trainer.train_steps:
            problems.append("trainer.train_steps: disagrees with trainer.max_steps; keep one")
        trainer.max_steps = trainer.train_steps
    length = config.preprocessing.global_max_sequence_length
    if length is not None:
        if "max_length" in trainer.model_fields_set and trainer.max_length != length:
            problems.append("preprocessing.global_max_sequence_length: disagrees with trainer.max_length; keep one")
        trainer.max_length = length
    split = config.preprocessing.split
    if split is not None and split.type in ("random", "hash"):
        fraction = 1.0 - split.probabilities[0]
        if "eval_fraction" in trainer.model_fields_set and not math.isclose(trainer.eval_fraction, fraction):
            problems.append("preprocessing.split: its held-out share disagrees with trainer.eval_fraction; keep one")
        trainer.eval_fraction = fraction
    return problems


def _default_backend(config: Config, notes: dict[str, str]) -> None:
    """madapt's default backend is ray, Ludwig's is local. A config that names no backend and initialises an
    adapter in a way only one process can (pissa, olora, corda, eva) trains locally, as it does under Ludwig."""
    if "backend" in config.model_fields_set:
        return
    adapters = [adapter for _, adapter in adapter_paths(config).values()]
    inits = sorted({a.init_lora_weights for a in adapters if a.init_lora_weights in LOCAL_ONLY_INITS})
    if inits:
        config.backend = BackendConfig(type="local")
        notes["backend"] = (
            f"not given: trains in this process (backend: local, Ludwig's default), as init_lora_weights "
            f"{', '.join(map(repr, inits))} needs the whole adapter in one process"
        )


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate an already-parsed YAML document, reporting every problem at once. Ludwig keys that madapt
    does not act on are logged, one warning line per key, and listed in `config.notes`. No dataset is needed
    here: as in Ludwig, data may come at train time (`data_problems` checks it then)."""
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping of keys, got {type(data).__name__}"], source)
    _check_size(data, source)
    problems = cross_reference_problems(data)
    notes: dict[str, str] = {}
    kept = triage(data, Config, "", notes, problems)
    try:
        config = Config.model_validate(kept)
    except ValidationError as error:
        problems += format_validation_error(error)
        raise ConfigError(problems, source) from None
    problems += _resolve_ludwig(config)
    _default_backend(config, notes)
    problems += adapter_problems(config) + training_problems(config) + early_stop_problems(config)
    problems += quantization_problems(config) + prompt_problems(config) + tracking_problems(config)
    if problems:
        raise ConfigError(problems, source)
    for where, message in notes.items():
        log.warning("%s: %s: %s", source, where, message)
    config.notes = notes
    return config


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents with more nodes than any config needs, while composing."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._nodes = getattr(self, "_nodes", 0) + 1
        if self._nodes > MAX_DOCUMENT_NODES:
            raise yaml.YAMLError(f"more than {MAX_DOCUMENT_NODES} YAML nodes")
        return super().compose_node(parent, index)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config; dataset paths are resolved relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"cannot read the file: {error.strerror or error}"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], str(path)) from None
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML: {error}"], str(path)) from None
    config = parse_config(data, str(path))
    return _resolve_paths(config, path.parent.resolve())


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(value: str | None) -> str | None:
        if value is None or "://" in value or Path(value).is_absolute():
            return value
        return str(base / value)

    def resolve_dataset(value: str | None) -> str | None:
        if value is not None and not (base / value).exists() and not Path(value).suffix:
            return value  # a Hugging Face dataset name (owner/name), not a file next to the config
        return resolve(value)

    config.dataset = resolve_dataset(config.dataset)
    for adapter in config.named_adapters.values():
        adapter.dataset = resolve_dataset(adapter.dataset)
        adapter.eval_dataset = resolve_dataset(adapter.eval_dataset)
    config.base_model = locate_base_model(config.base_model, base)
    if "uri" in config.storage.model_fields_set:  # a store the file names is read from beside it
        config.storage.uri = str(resolve(os.path.expanduser(config.storage.uri)))
    return config
