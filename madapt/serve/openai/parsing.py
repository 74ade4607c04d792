"""Reading a request: the body bounded before it is parsed, decoded and validated into its request model;
unknown fields logged and named in a header; `model` ids checked.

Bodies are checked before they are parsed: at most `MAX_DEPTH` levels of nesting and number literals of
at most `MAX_NUMBER_DIGITS` digits, so no body can make the JSON parser recurse deeply or build a huge
integer. Every problem with a body is a `ProtocolError` (a 4xx).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any
from urllib.parse import quote

import numpy
from pydantic import ValidationError

from madapt.serve.openai.errors import ProtocolError, shown, validation_refusal
from madapt.serve.openai.protocol import SamplingRequest
from madapt.store.refs import Ref, RefError

log = logging.getLogger(__name__)

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a body may have (a chat request needs 5)."""
MAX_NUMBER_DIGITS = 100
"""Longest run of digits in a number literal (`int()` refuses more than 4,300; nothing needs 100)."""
MAX_MODEL_ID = 100
"""Longest `model` (or `serve_multiplexed_model_id`): a 64-character name, `@` and a version fit."""
IGNORED_HEADER = "X-Madapt-Ignored-Fields"
MAX_IGNORED_HEADER = 1024
MAX_LOGGED_NAMES = 1024

_LONG_NUMBER = re.compile(rb"[0-9]{%d}" % (MAX_NUMBER_DIGITS + 1))
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def check_shape(body: bytes) -> None:
    """Refuse, before parsing, a body nested deeper than `MAX_DEPTH` or with a number literal longer than
    `MAX_NUMBER_DIGITS` digits. A few passes in C over the body, linear in its size; no recursion."""
    # Outside strings: drop escaped backslashes, then escaped quotes (pairs taken left to right, as a JSON
    # parser takes them); then every other quote opens or closes a string, so the even pieces between
    # quotes are what is outside strings (an unterminated string's tail is an odd piece).
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    bare = b" ".join(unescaped.split(b'"')[::2])
    if _LONG_NUMBER.search(bare):
        raise ProtocolError(
            400, f"request body has a number with more than {MAX_NUMBER_DIGITS} digits", code="number_too_long"
        )
    brackets = numpy.frombuffer(bare.translate(_BRACKETS, _NOT_BRACKETS), dtype=numpy.uint8)
    if brackets.size and int(numpy.cumsum(ord("\\") - brackets.astype(numpy.int32)).max()) > MAX_DEPTH:
        raise ProtocolError(400, f"request body is nested more than {MAX_DEPTH} levels deep", code="nesting_too_deep")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(kind: type[SamplingRequest], body: bytes, *, default_model: str | None = None) -> SamplingRequest:
    """Decode and validate a request body; every problem is a 400 naming the field where there is one.

    Unknown fields are ignored: `request.ignored_fields()` names them (each is logged once per process).
    `default_model` is what a body without `model` (or with null) names; without it `model` is required.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProtocolError(400, f"request body is not UTF-8: {error}", code="invalid_json") from None
    check_shape(body)
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise ProtocolError(400, f"request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ProtocolError(400, "request body must be a JSON object", code="invalid_json")
    check_text(data)
    if default_model is not None and data.get("model") is None:
        data["model"] = default_model
    try:
        request = kind.model_validate(data)
    except ValidationError as error:
        raise validation_refusal(error.errors(include_url=False, include_input=False)) from None
    except (ValueError, TypeError, RecursionError, OverflowError) as error:  # defensive: never a 500
        raise ProtocolError(400, f"request could not be read: {type(error).__name__}") from None
    request.check_supported()
    log_ignored(request.ignored_fields())
    return request


def check_text(data: object) -> None:
    """Refuse a string holding a lone UTF-16 surrogate (`"\\ud800"` is valid JSON but no text: the tokenizer
    cannot encode it), naming the field. One pass in C when there is none; the walk only finds the field."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if not _encodable(str(key)):
                    raise ProtocolError(400, f"a field name in {path or 'the body'} is not valid text", param=path)
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, str) and not _encodable(value):
            raise ProtocolError(
                400, f"{shown(path, 80)}: not valid text (a lone UTF-16 surrogate)", param=path, code="invalid_value"
            )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_logged: set[str] = set()
_logged_lock = threading.Lock()


def log_ignored(names: set[str]) -> None:
    """Log each ignored field name once per process (at most `MAX_LOGGED_NAMES` names are remembered)."""
    with _logged_lock:
        new = sorted(n for n in names if n not in _logged)[: max(0, MAX_LOGGED_NAMES - len(_logged))]
        _logged.update(new)
        full = len(_logged) >= MAX_LOGGED_NAMES
    for name in new:
        log.warning("ignoring unknown request field %s (logged once)", shown(name, 80))
    if new and full:
        log.warning("%d distinct unknown fields seen; no more are logged", MAX_LOGGED_NAMES)


def ignored_header(names: set[str]) -> dict[str, str]:
    """`{IGNORED_HEADER: "a,b"}` (names percent-encoded, cut to `MAX_IGNORED_HEADER` bytes), or `{}`."""
    if not names:
        return {}
    listed, size = [], 0
    for name in sorted(names):
        encoded = quote(name, safe="[]._-~")
        if size + len(encoded) + 1 > MAX_IGNORED_HEADER:
            listed.append("...")
            break
        listed.append(encoded)
        size += len(encoded) + 1
    return {IGNORED_HEADER: ",".join(listed)}


def check_model_id(value: str) -> str:
    """A 400 for a `model` (or multiplexed id) that is too long, not printable ASCII, or has a version that is
    not 1-9 ASCII digits or `latest` (`madapt.store.refs`); the name itself is checked by the store."""
    try:
        Ref.parse(value, labels=False, check_name=False, max_length=MAX_MODEL_ID)
    except RefError as error:
        raise ProtocolError(400, str(error), param="model", code="invalid_value") from None
    return value


def _check_requested(value: str) -> str:
    """`check_model_id`, letting a label (`coding@prod`) stand after the '@' where it expects a version; the
    label itself is validated by the resolver."""
    try:
        Ref.parse(value, check_name=False, max_length=MAX_MODEL_ID)
    except RefError as error:
        raise ProtocolError(400, str(error), param="model", code="invalid_value") from None
    return value
