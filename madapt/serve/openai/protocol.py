"""The OpenAI-compatible wire format, as vLLM's `entrypoints/openai/protocol.py`: the request models (with
their limits) and the response models (whole responses, stream chunks, model cards).

Requests are read as vLLM reads them: fields madapt does not know are ignored (logged once per name per
process, and listed in the `X-Madapt-Ignored-Fields` response header: `madapt.serve.openai.parsing`),
fields that change nothing for madapt (`user`, `metadata`, `store`, ...) are accepted, and what madapt does
not implement but would change the answer (`functions`, `logit_bias`, `best_of`, ...) is a 400
naming the field, rather than a response that looks right and is not. Sampling fields are vLLM's (`top_k`,
`min_p`, the penalties: `madapt.serve.sampling`), each range checked here.

Responses are pydantic models whose `model_dump()` is the JSON OpenAI's clients parse; a field listed in a
model's `OMIT_NONE` is left out when it is None (a stream chunk's `usage`, a delta's `role`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from madapt.serve.constrain import TEXT, read_response_format
from madapt.serve.openai.errors import ProtocolError, shown
from madapt.serve.openai.tools import NAMED, ToolPlan, read_history_calls, read_tools

MAX_TOKENS_LIMIT = 4096
MAX_STOP = 4
MAX_N = 16
"""The most choices (`n`) per prompt."""
MAX_CHOICES = 64
"""The most rows one request may add to the batch: prompts times `n`."""
MAX_LOGPROBS = 20
"""The most alternatives per token (`top_logprobs`, or `logprobs` of a completion): vLLM's default."""
SEED_RANGE = (0, 2**63 - 1)
"""Seeds a request may give: what every sampler (torch's, numpy's, a signed 64-bit one) takes alike."""
GREEDY_TEMPERATURE = 1e-4
"""A temperature below this is greedy decoding (dividing logits by it would only overflow)."""
REFUSED = "Not supported: accepted only when off (null, or empty, or the value that asks for nothing)."


# -- request models ---------------------------------------------------------------------------------


class OpenAIModel(BaseModel):
    """Unknown fields are kept aside (`model_extra`) and reported by `ignored_fields`, not refused."""

    model_config = ConfigDict(extra="allow", validate_default=True)
    NULL_IS_DEFAULT: ClassVar[frozenset[str]] = frozenset()
    """Fields for which `null` means the default, as in OpenAI's API (`"temperature": null`)."""

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key not in cls.NULL_IS_DEFAULT}
        return data

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

    NULL_IS_DEFAULT = frozenset({"include_usage"})


IGNORED = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "reasoning_effort",
    "verbosity",
    "prediction",
)
"""Known fields accepted and ignored: they do not change the text madapt generates."""


SAMPLING_DEFAULTS = {"top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
"""The vLLM sampling fields (`null` means the default)."""


class SamplingRequest(OpenAIModel):
    NULL_IS_DEFAULT = frozenset({"max_tokens", "temperature", "top_p", "stream", "n", *SAMPLING_DEFAULTS})
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
    # Refused unless off (`UNSUPPORTED`); typed loosely so that any value gets the same clear 400.
    logit_bias: Any = Field(None, description=REFUSED)
    response_format: Any = Field(None, description="text, json_object or json_schema (madapt.serve.constrain).")
    adapters: Any = Field(None, description="A per-request merge: {adapter: weight} (madapt.serve.request_merges).")
    merge: Any = Field(
        None, description="How a per-request merge combines: {combination_type, density, majority_sign_method, seed}."
    )
    # Ignored (see `IGNORED`).
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    prediction: Any = None

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


UNSUPPORTED = [
    ("best_of", _off(1), "best_of sampling"),
    ("suffix", _off(""), "a suffix (insertion)"),
    ("logit_bias", _off({}), "logit_bias"),
    ("functions", _off([]), "function calling"),
    ("function_call", _off("none", "auto"), "function calling"),
    ("modalities", _off(["text"]), "output other than text"),
    ("audio", _off(), "audio output"),
    ("web_search_options", _off(), "web search"),
]
"""(field, is it off, what it asks for): a field that is not off is a 400 naming it."""


class CompletionRequest(SamplingRequest):
    NULL_IS_DEFAULT = SamplingRequest.NULL_IS_DEFAULT | {"echo"}
    prompt: Any = Field(description="Raw text to continue (no chat template), or a list of texts: n choices each.")
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs: its tokens').")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Logprobs with this many alternatives.")
    best_of: Any = Field(None, description=REFUSED)
    suffix: Any = Field(None, description=REFUSED)

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
    tool_calls: Any = None  # an assistant's past calls, rendered by the chat template (tools.read_history_calls)
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
    NULL_IS_DEFAULT = SamplingRequest.NULL_IS_DEFAULT | {"logprobs"}
    messages: list[ChatMessage] = Field(min_length=1, description="Rendered with the base model's chat template.")
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_LIMIT, description="Default: what fits the context, up to the server's limit."
    )
    logprobs: bool = Field(False, description="Return each output token's logprob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (needs logprobs)."
    )
    tools: Any = Field(None, description="Functions the model may call (madapt.serve.openai.tools).")
    tool_choice: Any = Field(None, description="none, auto (the default with tools), required, or a function.")
    parallel_tool_calls: Any = Field(None, description="false: at most one call under tool_choice required.")
    functions: Any = Field(None, description=REFUSED)
    function_call: Any = Field(None, description=REFUSED)
    modalities: Any = Field(None, description=REFUSED)
    audio: Any = Field(None, description=REFUSED)
    web_search_options: Any = Field(None, description=REFUSED)
    _tool_plan: ToolPlan | None = PrivateAttr(None)

    @property
    def tool_plan(self) -> ToolPlan | None:
        """What the request's tools ask for (read by `check_supported`), or None without tools."""
        return self._tool_plan

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
            if message.function_call:
                raise ProtocolError(
                    400,
                    f"messages.{i}.function_call: function calling is not supported; use tool_calls",
                    param=f"messages.{i}.function_call",
                    code="unsupported_parameter",
                )
            if message.tool_calls:
                read_history_calls(message.tool_calls, f"messages.{i}.tool_calls")
        self._tool_plan = read_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        constrained = self._tool_plan is not None and self._tool_plan.choice in ("required", NAMED)
        if constrained and self.response_format not in (None, TEXT):
            raise ProtocolError(
                400,
                "response_format: cannot be combined with tool_choice 'required' or a named function, whose "
                "output is the call's JSON; use tool_choice 'auto' or drop response_format",
                param="response_format",
                code="invalid_value",
            )

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as a chat template takes them: text content; `developer` is `system`, which is
        what it means for models that predate it; an assistant's `tool_calls` with `arguments` as objects."""
        rendered = []
        for message in self.messages:
            turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
            turn["content"] = message.text()
            turn |= {key: getattr(message, key) for key in ("name", "tool_call_id") if getattr(message, key)}
            if message.tool_calls:
                turn["tool_calls"] = read_history_calls(message.tool_calls, "tool_calls")
            rendered.append(turn)
        return rendered


# -- response models --------------------------------------------------------------------------------


class WireModel(BaseModel):
    """A response part: its fields in the order they go on the wire; those in `OMIT_NONE` left out when None."""

    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None or key not in self.OMIT_NONE}


class UsageInfo(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        total = prompt_tokens + completion_tokens
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


class CompletionLogProbs(WireModel):
    """The legacy completions `logprobs` (a prompt's first token has null ones)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatLogProb(WireModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb]


class ChatCompletionLogProbs(WireModel):
    content: list[ChatLogProbsContent]


class CompletionResponseChoice(WireModel):
    """A choice of a completion, whole or a stream chunk's (`text` the delta)."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogProbs | None


class FunctionCall(WireModel):
    OMIT_NONE = frozenset({"name", "arguments"})
    name: str | None = None
    arguments: str | None = None
    """A JSON object, as a string (a stream sends it in pieces)."""


class ToolCall(WireModel):
    """A call in a whole response; in a stream, `index` says which call a piece belongs to, and only its
    first piece has `id`, `type` and the function's name."""

    OMIT_NONE = frozenset({"index", "id", "type"})
    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class AssistantMessage(WireModel):
    OMIT_NONE = frozenset({"tool_calls"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class DeltaMessage(WireModel):
    OMIT_NONE = frozenset({"role", "content", "tool_calls"})
    content: str | None = None
    role: Literal["assistant"] | None = None
    """Only in a stream's opening chunk of each choice."""
    tool_calls: list[ToolCall] | None = None


class ChatCompletionResponseChoice(WireModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatCompletionLogProbs | None


class ChatCompletionResponseStreamChoice(WireModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None
    logprobs: ChatCompletionLogProbs | None


class Response(WireModel):
    """A whole response (`usage` set) or a stream chunk (`usage` left out, or set with no choices when the
    client asked for it); each kind names its `object` and its choices' type."""

    OMIT_NONE = frozenset({"usage"})
    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: UsageInfo | None = None


class CompletionResponse(Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionResponseChoice]


class ChatCompletionResponse(Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class ChatCompletionStreamResponse(Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionResponseStreamChoice]


class ModelCard(WireModel):
    """One entry of `/v1/models`; an adapter's card carries its releases as extra fields
    (`version`, `versions`, `aliases`, `split`, ...: `madapt.store.releases`)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "madapt"
    root: str | None = None


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
