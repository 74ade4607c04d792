"""The OpenAI-compatible wire format: request models (unknown fields refused), responses, SSE chunks, errors.

Only what madapt implements is accepted: a field the server would silently ignore (`n=3`, `logprobs`) is
a 400 naming the field, rather than a response that looks right and is not.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_TOKENS_LIMIT = 4096
MAX_STOP = 4


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 503: "unavailable"}


class ProtocolError(ValueError):
    """A request the API refuses; carries the HTTP status and an OpenAI-style error type."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers if headers or status != 503 else {"Retry-After": "1"}  # 503: try again soon

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    model: str = Field(description="'base', an adapter NAME (latest version) or NAME@VERSION.")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT, description="New tokens to generate at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} strings that end the output.")
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops


class CompletionRequest(SamplingRequest):
    prompt: str = Field(min_length=1, description="Raw text to continue (no chat template).")


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="Rendered with the base model's chat template.")


def parse_request(kind: type[SamplingRequest], body: bytes) -> SamplingRequest:
    """Decode and validate a request body, turning every problem into a 400 naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ProtocolError(400, "request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise ProtocolError(400, problems, param=field) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request_id: str, model: str, text: str, finish_reason: str | None, used: dict[str, int] | None, *, chat: bool
) -> dict[str, Any]:
    """A whole response (`usage` set) or a streamed chunk (`usage` None, `text` the delta)."""
    chunk = used is None
    if chat:
        key, value = ("delta", {"content": text}) if chunk else ("message", {"role": "assistant", "content": text})
        choice = {"index": 0, key: value, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if used is not None:
        body["usage"] = used
    return body


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
