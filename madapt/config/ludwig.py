"""How madapt's schema meets Ludwig's: `Strict`, the base of every config section (unknown keys are errors;
Ludwig keys madapt does not act on are declared per section), and `triage`, the walk over the raw document
that keeps madapt's keys, notes Ludwig keys madapt does not act on and reports the rest with the closest key.
"""

from __future__ import annotations

import difflib
import types
from typing import Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict


def same_note(keys: str, note: str) -> dict[str, str]:
    """`ludwig_ignored` entries for the space-separated Ludwig `keys` that madapt ignores for one reason."""
    return dict.fromkeys(keys.split(), note)


class Strict(BaseModel):
    """A config section: unknown keys are errors; keys of Ludwig's schema that madapt does not act on are listed
    in `ludwig_ignored` (key -> what madapt does instead) and reported as one warning line each."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
    ludwig_ignored: ClassVar[dict[str, str]] = {}

    @classmethod
    def ignored_keys(cls, data: dict[Any, Any]) -> dict[str, str]:
        return cls.ludwig_ignored

    @classmethod
    def value_notes(cls, data: dict[Any, Any]) -> dict[str, tuple[str, bool]]:
        """Values accepted with a note: key -> (message, drop the key so madapt's default applies)."""
        return {}

    @classmethod
    def passed_keys(cls, data: dict[Any, Any]) -> frozenset[str]:
        """Keys outside the model's fields that it gathers itself (a before-validator), kept as they are."""
        return frozenset()


def _section_model(annotation: Any) -> tuple[str, type[Strict]] | None:
    """The config section type behind a field annotation: ('model'|'dict'|'list', the Strict class)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
        return None
    if origin is dict:
        inner = _section_model(get_args(annotation)[1])
        return ("dict", inner[1]) if inner and inner[0] == "model" else None
    if origin is list:
        inner = _section_model(get_args(annotation)[0])
        return ("list", inner[1]) if inner and inner[0] == "model" else None
    if isinstance(annotation, type) and issubclass(annotation, Strict):
        return ("model", annotation)
    return None


def triage(data: dict[Any, Any], model: type[Strict], path: str, notes: dict[str, str], problems: list[str]) -> Any:
    """Walk the raw document along the schema: keep madapt's keys, drop (and note) Ludwig keys madapt does not
    act on, and report keys that neither schema has, with the closest known key."""
    ignored = model.ignored_keys(data)
    value_notes = model.value_notes(data)
    passed = model.passed_keys(data)
    kept: dict[Any, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key in value_notes:
            message, drop = value_notes[key]
            notes.setdefault(where, message)
            if drop:
                continue
        if key in model.model_fields:
            section = _section_model(model.model_fields[key].annotation)
            if section is not None and section[0] == "model" and isinstance(value, dict):
                value = triage(value, section[1], where, notes, problems)
            elif section is not None and section[0] == "dict" and isinstance(value, dict):
                value = {
                    k: triage(v, section[1], f"{where}.{k}", notes, problems) if isinstance(v, dict) else v
                    for k, v in value.items()
                }
            elif section is not None and section[0] == "list" and isinstance(value, list):
                value = [
                    triage(v, section[1], f"{where}[{i}]", notes, problems) if isinstance(v, dict) else v
                    for i, v in enumerate(value)
                ]
            kept[key] = value
        elif key in passed:
            kept[key] = value
        elif key in ignored:
            notes.setdefault(where, ignored[key])
        else:
            close = difflib.get_close_matches(str(key), [*model.model_fields, *ignored], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; check the spelling"
            problems.append(f"{where}: unknown key (not part of Ludwig's LLM config schema{hint})")
    return kept
