"""The OpenAI-compatible wire format: request parsing, responses, SSE chunks, errors.

Requests are read as vLLM reads them: fields madapt does not know are ignored (logged once per name per
process, and listed in the `X-Madapt-Ignored-Fields` response header), fields that change nothing for
madapt (`user`, `metadata`, `store`, ...) are accepted, and what madapt does not implement but would
change the answer (`tools`, a JSON `response_format`, `best_of`, ...) is a 400 naming the field, rather
than a response that looks right and is not. Sampling fields are vLLM's (`top_k`, `min_p`, the penalties:
`madapt.serve.sampling`), each range checked here.

Bodies are checked before they are parsed: at most `MAX_DEPTH` levels of nesting and number literals of
at most `MAX_NUMBER_DIGITS` digits, so no body can make the JSON parser recurse deeply or build a huge
integer. Every problem with a body is a `ProtocolError` (a 4xx); errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with OpenAI's types and string codes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import numpy
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from madapt.serve.choices import choice
from madapt.serve.constrain import read_response_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 4096
MAX_STOP = 4
MAX_N = 16
"""The most choices (`n`) per prompt."""
MAX_CHOICES = 64
"""The most rows one request may add to the batch: prompts times `n`."""
MAX_LOGPROBS = 20
"""The most alternatives per token (`top_logprobs`, or `logprobs` of a completion): vLLM's default."""
MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a body may have (a chat request needs 5)."""
MAX_NUMBER_DIGITS = 100
"""Longest run of digits in a number literal (`int()` refuses more than 4,300; nothing needs 100)."""
MAX_MODEL_ID = 100
"""Longest `model` (or `serve_multiplexed_model_id`): a 64-character name, `@` and a version fit."""
SEED_RANGE = (0, 2**63 - 1)
"""Seeds a request may give: what every sampler (torch's, numpy's, a signed 64-bit one) takes alike."""
GREEDY_TEMPERATURE = 1e-4
"""A temperature below this is greedy decoding (dividing logits by it would only overflow)."""
IGNORED_HEADER = "X-Madapt-Ignored-Fields"
MAX_IGNORED_HEADER = 1024
MAX_LOGGED_NAMES = 1024

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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def shown(value: Any, limit: int = 40) -> str:
    """`repr(value)`, cut to about `limit` characters: error messages never echo a whole megabyte."""
    if isinstance(value, int) and value.bit_length() > 128:
        return "a large integer"
    if not isinstance(value, str):
        return repr(value)[:limit] if isinstance(value, int | float | None) else type(value).__name__
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


# -- request models ---------------------------------------------------------------------------------


class OpenAIModel(BaseModel):
    """Unknown fields are kept aside (`model_extra`) and reported by `ignored_fields`, not refused."""

    model_config = ConfigDict(extra="allow", validate_default=True)

    def ignored_fields(self, prefix: str = "") -> set[str]:
        """Names of the unknown fields here and in nested models, as `a.b` (lists as `a[].b`)."""
        names = {prefix + str(key) for key in self.model_extra or {}}
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, OpenAIModel):
                    names |= item.ignored_fields(f"{prefix}{name}{'[]' if items is value else ''}.")
        return names


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    include_obfuscation: Any = Field(None, description="Ignored: madapt's chunks are not padded.")

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _drop_nulls(data, {"include_usage"})


IGNORED = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
    "reasoning_effort",
    "verbosity",
    "prediction",
)
"""Known fields accepted and ignored: they do not change the text madapt generates."""


class SamplingRequest(OpenAIModel):
    model: str = Field(description="'base', an adapter NAME (latest version) or NAME@VERSION.")
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT, description="New tokens to generate at most.")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_LIMIT, description="New tokens at most; takes precedence over max_tokens."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} strings that end the output.")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Makes sampling reproducible.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="Choices per prompt: independent rows, seeds derived per choice.")
    top_k: int = Field(0, ge=-1, le=2**31 - 1, description="Keep the k likeliest tokens; 0 or -1: off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p times the likeliest's probability.")
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="vLLM's: > 1 discourages tokens seen in prompt or output.",
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="OpenAI's, on the output.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="OpenAI's, on the output.")
    # Refused unless off (see `UNSUPPORTED`); typed loosely so that any value gets the same clear 400.
    logit_bias: Any = None
    response_format: Any = Field(None, description="text, json_object or json_schema (madapt.serve.constrain).")
    adapters: Any = Field(None, description="A per-request merge: {adapter: weight} (madapt.serve.request_merges).")
    # Ignored (see `IGNORED`).
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    prediction: Any = None

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:  # `"temperature": null` means the default, as in OpenAI's API
        return _drop_nulls(data, {"max_tokens", "temperature", "top_p", "stream", "n", *SAMPLING_DEFAULTS})

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("temperature must be a finite number")
        return 0.0 if value < GREEDY_TEMPERATURE else value  # below the floor: greedy

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: Any) -> dict[str, Any] | None:
        return read_response_format(value)  # a GrammarError is a ValueError: a 400 naming the field

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops

    @property
    def new_tokens(self) -> int | None:
        """The token budget asked for: `max_completion_tokens`, else `max_tokens` (None: the server picks)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def new_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def logprobs_top(self) -> int | None:
        """Alternatives per token to return with logprobs (None: no logprobs)."""
        return None

    def sampling(self) -> dict[str, Any]:
        """What a replica needs to build this request's rows (see `AdapterServer.generate`)."""
        settings = self.model_dump(include={"temperature", "top_p", "stop", "seed", "n", *SAMPLING_DEFAULTS})
        return settings | {"max_tokens": self.new_tokens, "logprobs": self.logprobs_top}

    def check_supported(self) -> None:
        """A 400 naming the first field whose value asks for something madapt does not implement."""
        for name, neutral, what in UNSUPPORTED:
            if name in type(self).model_fields and not neutral(getattr(self, name)):
                raise ProtocolError(
                    400, f"{name}: {what} is not supported by this server", param=name, code="unsupported_parameter"
                )


def _off(*neutral: Any) -> Callable[[Any], bool]:
    """A test for 'this field asks for nothing': None or one of `neutral` (compared with its type)."""
    return lambda value: value is None or any(type(value) is type(v) and value == v for v in neutral)


SAMPLING_DEFAULTS = {"top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
"""The vLLM sampling fields (`null` means the default)."""

UNSUPPORTED = [
    ("best_of", _off(1), "best_of sampling"),
    ("suffix", _off(""), "a suffix (insertion)"),
    ("logit_bias", _off({}), "logit_bias"),
    ("tools", _off([]), "tool calling"),
    ("tool_choice", _off("none", "auto"), "a tool_choice other than none"),
    ("functions", _off([]), "function calling"),
    ("function_call", _off("none", "auto"), "function calling"),
    ("modalities", _off(["text"]), "output other than text"),
    ("audio", _off(), "audio output"),
    ("web_search_options", _off(), "web search"),
]
"""(field, is it off, what it asks for): a field that is not off is a 400 naming it."""


class CompletionRequest(SamplingRequest):
    prompt: Any = Field(description="Raw text to continue (no chat template), or a list of texts: n choices each.")
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs: its tokens').")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Logprobs with this many alternatives.")
    best_of: Any = None
    suffix: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_echo(cls, data: Any) -> Any:
        return _drop_nulls(data, {"echo"})

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            if any(not p for p in value):
                raise ValueError("prompts must not be empty")
            return value
        if isinstance(value, list) and value and all(isinstance(p, int | list) for p in value):
            return value  # token ids: refused by check_supported, with a clearer message than a type error
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty string or a list of them")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def logprobs_top(self) -> int | None:
        return self.logprobs

    def sampling(self) -> dict[str, Any]:
        return super().sampling() | {"echo": self.echo}

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and not all(isinstance(p, str) for p in self.prompt):
            raise ProtocolError(
                400, "prompt: token-id prompts are not supported; send text", param="prompt", code="unsupported_value"
            )
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ProtocolError(
                400,
                f"prompt: {len(self.prompts)} prompts times n={self.n} is more than {MAX_CHOICES} choices",
                param="prompt",
                code="invalid_value",
            )


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, description="A string, or a list of {'type': 'text', 'text': ...} parts.")
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Any = None  # refused unless empty: the model would not see the calls
    function_call: Any = None
    refusal: Any = None  # ignored

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        for i, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"content part {i} must be an object with a string 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} (type 'text') needs a string 'text'")
        return value

    @model_validator(mode="after")
    def _needs_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def ignored_fields(self, prefix: str = "") -> set[str]:
        names = super().ignored_fields(prefix)
        for part in self.content if isinstance(self.content, list) else []:
            names |= {f"{prefix}content[].{key}" for key in part if key not in ("type", "text")}
        return names

    def text(self) -> str:
        """The content as one string; text parts are joined with newlines, as vLLM joins them."""
        if isinstance(self.content, list):
            return "\n".join(part["text"] for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="Rendered with the base model's chat template.")
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_LIMIT, description="Default: what fits the context, up to the server's limit."
    )
    logprobs: bool = Field(False, description="Return each output token's logprob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (needs logprobs)."
    )
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    web_search_options: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_logprobs(cls, data: Any) -> Any:
        return _drop_nulls(data, {"logprobs"})

    @property
    def logprobs_top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError(
                400,
                "top_logprobs: logprobs must be true to return alternatives",
                param="top_logprobs",
                code="invalid_value",
            )
        for i, message in enumerate(self.messages):
            for part in message.content if isinstance(message.content, list) else []:
                if part["type"] != "text":
                    raise ProtocolError(
                        400,
                        f"messages.{i}.content: content parts of type {shown(part['type'])} are not supported; "
                        "only 'text' parts are",
                        param=f"messages.{i}.content",
                        code="unsupported_value",
                    )
            for name in ("tool_calls", "function_call"):
                if getattr(message, name):
                    raise ProtocolError(
                        400,
                        f"messages.{i}.{name}: tool calls are not supported by this server",
                        param=f"messages.{i}.{name}",
                        code="unsupported_parameter",
                    )

    def conversation(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them: text content; `developer` is `system`, which is
        what it means for models that predate it."""
        rendered = []
        for message in self.messages:
            turn = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
            turn |= {key: getattr(message, key) for key in ("name", "tool_call_id") if getattr(message, key)}
            rendered.append(turn)
        return rendered


def _drop_nulls(data: Any, fields: set[str]) -> Any:
    """`{"field": null}` for a field with a default means the default."""
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value is not None or key not in fields}
    return data


# -- parsing ----------------------------------------------------------------------------------------

_LONG_NUMBER = re.compile(rb"[0-9]{%d}" % (MAX_NUMBER_DIGITS + 1))
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_TYPE_TAG = re.compile(r"(str|int|float|bool|list|dict|function-\w+)(\[.*\])?")  # union members in a `loc`


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
    if default_model is not None and data.get("model") is None:
        data["model"] = default_model
    try:
        request = kind.model_validate(data)
    except ValidationError as error:
        raise _refusal(error) from None
    except (ValueError, TypeError, RecursionError, OverflowError) as error:  # defensive: never a 500
        raise ProtocolError(400, f"request could not be read: {type(error).__name__}") from None
    request.check_supported()
    log_ignored(request.ignored_fields())
    return request


def _refusal(error: ValidationError) -> ProtocolError:
    problems: dict[str, tuple[str, str]] = {}  # "path: message" -> (path, pydantic's error type)
    for e in error.errors(include_url=False, include_input=False):
        path = ".".join(str(p) if len(str(p)) <= 40 else shown(p) for p in e["loc"] if not _tag(p))
        message = e["msg"].removeprefix("Value error, ")
        problems.setdefault(f"{path}: {message}" if path else message, (path, e["type"]))
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


def _tag(part: Any) -> bool:
    return isinstance(part, str) and _TYPE_TAG.fullmatch(part) is not None


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
    """A 400 for a `model` (or multiplexed id) that is too long, not ASCII, or has a version that is not
    1-9 ASCII digits or `latest`; the name itself is checked by the store."""
    problem = None
    if len(value) > MAX_MODEL_ID:
        problem = f"longer than {MAX_MODEL_ID} characters"
    elif not value.isascii() or not value.isprintable():
        problem = "only printable ASCII is allowed"
    elif "@" in value:
        version = value.partition("@")[2]
        if not (version == "latest" or (1 <= len(version) <= 9 and all("0" <= c <= "9" for c in version))):
            problem = "the version must be 1-9 ASCII digits or 'latest'"
    if problem:
        raise ProtocolError(
            400, f"invalid adapter reference {shown(value)}: {problem}", param="model", code="invalid_value"
        )
    return value


# -- responses --------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    used: dict[str, int] | None,
    *,
    chat: bool,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole response of one choice (`usage` set) or a streamed chunk (`usage` None, `text` the delta)."""
    return response(
        request_id,
        model,
        [choice(index, text, finish_reason, logprobs, chat=chat, chunk=used is None)],
        used,
        chat=chat,
    )


def response(
    request_id: str, model: str, choices: list[dict[str, Any]], used: dict[str, int] | None, *, chat: bool
) -> dict[str, Any]:
    """A whole response (`usage` set) or a streamed chunk (`usage` None)."""
    chunk = used is None
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if used is not None:
        body["usage"] = used
    return body


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The conversation rendered by the base model's chat template; a template that refuses it (a role
    it does not know, turns that do not alternate) is a 400 with the template's own message."""
    import jinja2

    from madapt.data import render_chat

    try:
        return render_chat(tokenizer, messages)
    except jinja2.TemplateError as error:  # what `raise_exception(...)` in a template raises
        raise ProtocolError(
            400, f"the chat template refused these messages: {error}", param="messages", code="invalid_chat_template"
        ) from None
    except (TypeError, ValueError, KeyError, IndexError) as error:  # a template that fails on this input
        raise ProtocolError(
            400,
            f"the chat template could not render these messages: {type(error).__name__}: {shown(str(error), 200)}",
            param="messages",
            code="invalid_chat_template",
        ) from None
