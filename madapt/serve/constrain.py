"""Structured output: a request's `response_format` as a grammar that masks each row's next-token logits.

`response_format` takes OpenAI's shapes: `{"type": "text"}` (no constraint), `{"type": "json_object"}` (any
JSON object) and `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`. The schema is
compiled by llguidance (the Rust library behind Guidance, also used by vLLM and llama.cpp): it is checked
once when the request is read (`read_response_format`, a 400 naming `response_format` when it does not
compile), then each constrained row gets its own matcher over the base model's token table
(`Grammars.row`). Before every sampling step the engine masks, row by row, the tokens the row's grammar
forbids (`mask_rows`), so rows with and without a grammar share one batch; the chosen token then advances
the matcher, and a row whose grammar is complete ends with `finish_reason: stop`.

Whitespace between JSON tokens is fixed (`, ` and `: `, no newlines) unless a schema's `x-guidance` says
otherwise: with free whitespace a weak model can emit blanks until `max_tokens` and never close the object.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import llguidance
import llguidance.hf
import numpy
import torch
from transformers import PreTrainedTokenizerBase

from madapt.json_grammar import grammar, schema_problem

JSON_OBJECT: dict[str, Any] = {"type": "object"}
TEXT = {"type": "text"}


class GrammarError(ValueError):
    """A `response_format` that cannot be enforced; the message says why and where."""


def read_response_format(value: Any, where: str = "response_format") -> dict[str, Any] | None:
    """The constraint a `response_format` asks for: None when absent, `TEXT`, or `{"type": "json_schema",
    "schema": ...}` (json_object is the schema of any object). Raises `GrammarError` naming `where`."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise GrammarError(f"{where} must be an object with a string 'type'")
    kind = value["type"]
    if kind == "text":
        return TEXT
    if kind == "json_object":
        return {"type": "json_schema", "schema": JSON_OBJECT}
    if kind != "json_schema":
        raise GrammarError(f"{where}.type must be 'text', 'json_object' or 'json_schema', not {kind[:40]!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError(f"{where}.json_schema must be an object with a 'schema'")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise GrammarError(f"{where}.json_schema.name must be a string")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise GrammarError(f"{where}.json_schema.schema must be a JSON Schema object")
    problem = schema_problem(schema)
    if problem:
        raise GrammarError(f"{where}.json_schema.schema cannot be enforced: {problem}")
    return {"type": "json_schema", "schema": schema}


class RowGrammar:
    """One row's matcher: which tokens may come next, and the tokens chosen so far."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int):
        self.matcher = matcher
        self.vocab = vocab

    def allowed(self, width: int) -> torch.Tensor:
        """A bool mask over `width` logits: True where the grammar allows the token (ids past the
        tokenizer's vocabulary, padding in the embedding, never are)."""
        bits = numpy.frombuffer(self.matcher.compute_bitmask(), dtype=numpy.uint8)
        self._check()
        allowed = torch.from_numpy(numpy.unpackbits(bits, bitorder="little")[: min(self.vocab, width)].astype(bool))
        if width > allowed.numel():
            allowed = torch.cat([allowed, allowed.new_zeros(width - allowed.numel())])
        if not allowed.any():
            raise GrammarError("the grammar allows no next token")
        return allowed

    def advance(self, token: int) -> bool:
        """Take the chosen token; True when the grammar is complete (nothing but the end may follow)."""
        self.matcher.consume_token(token)
        self._check()
        return bool(self.matcher.is_stopped())

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"structured output failed: {self.matcher.get_error()[:300]}")


class Grammars:
    """The base model's token table for llguidance, built once (about a second) on first use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.table: llguidance.LLTokenizer | None = None
        self.lock = threading.Lock()

    def row(self, constraint: dict[str, Any]) -> RowGrammar:
        """A fresh matcher for one row (`constraint` from `read_response_format`, not `TEXT`). Blocking:
        call it off the event loop."""
        with self.lock:
            if self.table is None:
                self.table = llguidance.hf.from_tokenizer(self.tokenizer)
        matcher = llguidance.LLMatcher(self.table, grammar(constraint["schema"]), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"response_format cannot be enforced: {matcher.get_error()[:300]}")
        return RowGrammar(matcher, self.table.vocab_size)


class GrammarRow(Protocol):
    """What `mask_rows` reads and sets of a row (`madapt.serve.engine.Row`)."""

    grammar: RowGrammar | None
    finish_reason: str | None
    error: str | None


def mask_rows(rows: Sequence[GrammarRow], logits: torch.Tensor) -> None:
    """Set to -inf, in place, every logit a row's grammar forbids (rows without one are untouched). A
    grammar that fails ends its row with an error; the other rows go on."""
    for i, row in enumerate(rows):
        if row.grammar is None or row.finish_reason is not None:
            continue
        try:
            allowed = row.grammar.allowed(logits.shape[-1]).to(logits.device)
        except GrammarError as error:
            row.error, row.finish_reason = str(error), "error"
            continue
        logits[i].masked_fill_(~allowed, float("-inf"))
