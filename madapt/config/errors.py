"""`ConfigError` and the one formatter of pydantic's errors into 'yaml.path: message' lines; its parts
(`error_location`, `error_message`) are also what the HTTP API's 400s are built from (madapt.serve.openai.errors)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from madapt.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used; `problems` lists every issue as 'yaml.path: message'."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


_TYPE_TAG = re.compile(r"(str|int|float|bool|list|dict|function-\w+)(\[.*\])?")
"""A part of a pydantic error's `loc` that names no field: a validator wrapper or a union member's type."""


def error_location(loc: Iterable[Any], *, union_members: bool = False) -> list[Any]:
    """The parts of a pydantic error's `loc` that name fields and items: validator wrappers
    (`function-after[...]`) dropped, and with `union_members` also the tag pydantic inserts for the member
    of a union it tried (`str`, `list[str]`, ...)."""

    def tag(part: Any) -> bool:
        if not isinstance(part, str):
            return False
        return _TYPE_TAG.fullmatch(part) is not None if union_members else part.startswith("function-")

    return [part for part in loc if not tag(part)]


def error_message(message: str) -> str:
    """A pydantic error's message without the prefixes pydantic adds to what a validator raised."""
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _yaml_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in error_location(loc)]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path or "(top level)"


FEATURE_REFUSALS = {
    "input_features": "madapt trains text-only causal LMs: the one input feature is text, formatted by "
    "prompt.template (Ludwig's multimodal inputs need is_multimodal, which madapt does not run)",
    "output_features": "madapt's answer is the generated text (type: text); Ludwig's category output, which "
    "parses the generation into a label with decoder category_extractor, is not run by madapt: use type: text",
}
"""Why madapt's features are text only: the sentence for a feature `type` other than text."""


def _feature_sentence(item: Any) -> str | None:
    """madapt's own sentence for a feature list or type that pydantic refused, else None."""
    loc, kind = item["loc"], item["type"]
    section = loc[0] if loc else None
    if section not in FEATURE_REFUSALS:
        return None
    noun = "input" if section == "input_features" else "output"
    if kind == "too_long" and len(loc) == 1:
        given = item.get("ctx", {}).get("actual_length")
        return f"madapt's LLM takes exactly one {noun} feature, as Ludwig's LLM does ({given} given): " + (
            "name further columns in prompt.template" if noun == "input" else "it generates one text answer"
        )
    if kind == "literal_error" and loc[2:] == ("type",):
        return f"{item['input']!r} {noun} feature: {FEATURE_REFUSALS[section]}"
    if kind == "literal_error" and loc[2:] == ("decoder", "type"):
        return (
            f"decoder {item['input']!r}: madapt decodes with text_extractor only (the answer is the generated "
            "text, constrained by json_schema when set); category_extractor's label matching is not run"
        )
    return None


def format_validation_error(error: ValidationError) -> list[str]:
    """One 'yaml.path: message' line per pydantic error, with pydantic's prefixes removed."""
    problems = []
    for item in error.errors():
        message = error_message(item["msg"])
        sentence = _feature_sentence(item)
        if sentence is not None:
            message = sentence
        elif item["type"] == "extra_forbidden":
            message = "unknown key (not part of the schema; check the spelling)"
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.append(f"{_yaml_path(item['loc'])}: {message}")
    return problems
