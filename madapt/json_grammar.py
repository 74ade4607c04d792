"""A JSON Schema as llguidance's grammar: the compile options madapt uses and whether a schema compiles.

The one check that config validation (`decoder.json_schema`) and serving (serve.constrain, `response_format`)
share, so a schema the config accepts is one serving enforces. Imports llguidance only (no torch or
transformers), and config imports it only when a config sets a json_schema.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

COMPILE_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""Fixed whitespace between JSON tokens unless a schema's `x-guidance` says otherwise (see serve.constrain)."""


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why llguidance cannot compile `schema` (an unknown type, an unsupported keyword, ...), or None."""
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar(schema))
    except (ValueError, TypeError, RuntimeError) as failure:
        error = f"{type(failure).__name__}: {failure}"
    return error[:500] or None


def grammar(schema: dict[str, Any]) -> str:
    """`schema` as an llguidance grammar, compiled with `COMPILE_OPTIONS`."""
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPILE_OPTIONS)  # type: ignore[arg-type]
