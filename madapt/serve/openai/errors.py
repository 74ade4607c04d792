"""Errors of the HTTP API: `ProtocolError` (a status and OpenAI's error `type`, `param`, string `code`), its
wire shape `ErrorResponse` (`{"error": {"message", "type", "param", "code"}}`), and the one formatter of
pydantic's errors into a 400, built on the config's (`madapt.config.errors`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from madapt.config.errors import error_location, error_message

ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    409: "model_base_mismatch",
    413: "request_too_large",
    422: "model_unusable",
    500: "internal_error",
    503: "service_unavailable",
    504: "deadline_exceeded",
}
"""The `code` of an error by HTTP status, unless the error names a more precise one (`model_not_found`,
`context_length_exceeded`, `unsupported_parameter`, `invalid_type`, ...)."""
CODES_400 = (
    "invalid_value",
    "invalid_type",
    "missing_required_parameter",
    "unsupported_parameter",
    "unsupported_value",
    "invalid_json",
    "nesting_too_deep",
    "number_too_long",
    "context_length_exceeded",
    "invalid_chat_template",
)
"""The precise codes of a 400."""


def status_for(code: str | int | None) -> int:
    """The HTTP status an error's `code` stands for: what a reader of a stream needs, since an error event
    in a stream has no status line of its own (an int, as older madapt sent, is the status itself)."""
    if isinstance(code, int):
        return code
    by_code = {name: status for status, name in ERROR_CODES.items()} | dict.fromkeys(CODES_400, 400)
    return (by_code | {"model_not_found": 404, "unknown_url": 404}).get(code or "", 500)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorInfo


class ProtocolError(ValueError):
    """A request the API refuses: the HTTP status, and OpenAI's error `type`, `param` and string `code`.

    As OpenAI does, every 4xx (401 included) is an `invalid_request_error` and every 5xx a `server_error`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        kind: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
        self.code = code or ERROR_CODES.get(status, "server_error" if status >= 500 else "invalid_request")
        self.headers = dict(headers or ({"Retry-After": "1"} if status == 503 else {}))  # 503: try again soon

    def response(self) -> ErrorResponse:
        info = ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code)
        return ErrorResponse(error=info)

    def body(self) -> dict[str, Any]:
        return self.response().model_dump()


def shown(value: Any, limit: int = 40) -> str:
    """`repr(value)`, cut to about `limit` characters: error messages never echo a whole megabyte."""
    if isinstance(value, int) and value.bit_length() > 128:
        return "a large integer"
    if not isinstance(value, str):
        return repr(value)[:limit] if isinstance(value, int | float | None) else type(value).__name__
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def validation_refusal(errors: Sequence[Mapping[str, Any]], *, skip: int = 0) -> ProtocolError:
    """The 400 for pydantic's `errors` (a request body's, or FastAPI's for a route's parameters, whose `loc`
    starts with where the value was: `skip` such parts): the first five 'path: message' problems, `param`
    the first's path, `code` from the first's type (missing, wrong type, or a wrong value)."""
    problems: dict[str, tuple[str, str]] = {}  # "path: message" -> (path, pydantic's error type)
    for e in errors:
        parts = error_location(tuple(e.get("loc", ()))[skip:], union_members=True)
        path = ".".join(str(p) if len(str(p)) <= 40 else shown(p) for p in parts)
        message = error_message(str(e.get("msg", "invalid")))
        problems.setdefault(f"{path}: {message}" if path else message, (path, str(e.get("type", ""))))
    if not problems:
        return ProtocolError(400, "request: invalid", code="invalid_value")
    listed = list(problems)
    text = "; ".join(listed[:5]) + (f"; and {len(listed) - 5} more" if len(listed) > 5 else "")
    path, first = next(iter(problems.values()))
    if first == "missing":
        code = "missing_required_parameter"
    elif first.endswith(("_type", "_parsing")):
        code = "invalid_type"
    else:
        code = "invalid_value"
    return ProtocolError(400, text, param=path or None, code=code)
