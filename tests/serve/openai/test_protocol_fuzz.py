"""Hypothesis: no request body makes the parser fail with anything but a 400 ProtocolError: arbitrary
bytes and documents, and bodies built to hurt (deep nesting, huge numbers, long or odd ids, many unknown
fields)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from madapt.serve.openai.errors import ProtocolError
from madapt.serve.openai.parsing import (
    MAX_DEPTH,
    MAX_MODEL_ID,
    MAX_NUMBER_DIGITS,
    check_model_id,
    ignored_header,
    parse_request,
)
from madapt.serve.openai.protocol import MAX_CHOICES, MAX_LOGPROBS, ChatCompletionRequest, CompletionRequest

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LARGE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = [CompletionRequest, ChatCompletionRequest]
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
fields = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "top_logprobs",
        "echo",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
        "tools",
        "user",
        "extra",
    ]
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "", "x"])
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "file", ""])},
    optional={"text": st.text(max_size=10) | values, "image_url": values, "extra": values},
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles},
        optional={
            "content": st.text(max_size=20) | st.lists(parts, max_size=3) | values,
            "name": st.text(max_size=8) | values,
            "tool_calls": values,
            "unknown": values,
        },
    ),
    max_size=4,
)


def parses_or_refuses(kind, body: bytes) -> None:
    try:
        request = parse_request(kind, body)
    except ProtocolError as error:
        assert error.status == 400 and error.body()["error"]["message"]
        assert isinstance(error.code, str) and error.kind == "invalid_request_error"
        assert len(error.message) < 5000  # never the whole body echoed back
    else:
        assert isinstance(request, kind)
        assert request.new_tokens is None or request.new_tokens >= 1
        header = ignored_header(request.ignored_fields())
        assert all(value.isascii() and value.isprintable() for value in header.values())
        settings = request.sampling()
        assert settings["logprobs"] is None or 0 <= settings["logprobs"] <= MAX_LOGPROBS
        assert settings["top_k"] >= -1 and 0 <= settings["min_p"] <= 1 and settings["repetition_penalty"] > 0
        assert all(-2 <= settings[f"{k}_penalty"] <= 2 for k in ("presence", "frequency"))
        if kind is ChatCompletionRequest:
            assert all(isinstance(turn["content"], str) for turn in request.conversation())
        else:
            assert request.prompts and all(isinstance(p, str) and p for p in request.prompts)
            assert len(request.prompts) * request.n <= MAX_CHOICES


@FUZZ
@given(st.sampled_from(KINDS), st.binary(max_size=300))
def test_arbitrary_bytes(kind, body):
    parses_or_refuses(kind, body)


@FUZZ
@given(st.sampled_from(KINDS), st.dictionaries(fields, values, max_size=6))
def test_arbitrary_fields(kind, document):
    parses_or_refuses(kind, json.dumps(document).encode())


@FUZZ
@given(messages, st.dictionaries(fields, values, max_size=3), st.dictionaries(st.text(max_size=12), values, max_size=4))
def test_chat_messages(turns, known, unknown):
    parses_or_refuses(ChatCompletionRequest, json.dumps({**unknown, "model": "m", **known, "messages": turns}).encode())


@LARGE
@given(
    st.sampled_from(KINDS),
    st.integers(1, 100_000),
    st.sampled_from(["[", "{", "mixed"]),
    st.booleans(),
    st.sampled_from(["metadata", "unknown", "prompt", "messages", "top", "stop", "top_k", "echo"]),
)
def test_deep_nesting(kind, depth, bracket, closed, field):
    opens = "".join("[" if bracket == "[" or (bracket == "mixed" and i % 2) else '{"a":' for i in range(depth))
    closes = "".join("]" if o == "[" else "}" for o in reversed(opens.replace('{"a":', "{")))
    nested = opens + "1" + (closes if closed else "")
    body = nested if field == "top" else f'{{"model": "m", "prompt": "hi", "{field}": {nested}}}'
    parses_or_refuses(kind, body.encode())
    if depth > MAX_DEPTH:
        with pytest.raises(ProtocolError, match="nested more than"):
            parse_request(kind, body.encode())


@LARGE
@given(
    st.sampled_from(KINDS),
    st.sampled_from(
        [
            "seed",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "n",
            "unknown",
            "top_k",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "top_logprobs",
        ]
    ),
    st.integers(1, 6000),
    st.sampled_from(["", "-"]),
    st.sampled_from(["", ".5", "e5", "e-5", "e+{digits}", ".{digits}"]),
    st.booleans(),
)
def test_huge_numbers(kind, field, digits, sign, tail, quoted):
    number = sign + "9" * digits + tail.format(digits="1" * digits)
    value = f'"{number}"' if quoted else number  # as a string: pydantic's own limits apply
    chat = '"messages": [{"role": "user", "content": "hi"}]'
    body = f'{{"model": "m", "prompt": "hi", {chat}, "{field}": {value}}}'
    parses_or_refuses(kind, body.encode())
    if not quoted and digits > MAX_NUMBER_DIGITS:
        with pytest.raises(ProtocolError, match="digits"):
            parse_request(kind, body.encode())


@LARGE
@given(st.sampled_from(KINDS), st.integers(0, 200_000), st.sampled_from(["x", "[", "\\\\", '\\"', "9", "é"]))
def test_long_strings_are_content_not_structure(kind, size, unit):
    body = json.dumps({"model": "m", "prompt": "p", "messages": [{"role": "user", "content": "c"}], "user": ""})
    body = body.replace('"user": ""', f'"user": "{unit * size}"')
    parses_or_refuses(kind, body.encode())


@LARGE
@given(st.sampled_from(KINDS), st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=2000, unique=True))
def test_many_unknown_fields(kind, names):
    document = {name: 1 for name in names} | {
        "model": "m",
        "prompt": "hi",
        "messages": [{"role": "user", "content": "x"}],
    }
    parses_or_refuses(kind, json.dumps(document).encode())


model_ids = st.one_of(
    st.text(max_size=300),
    st.integers(0, 10_000).map(lambda n: "coding@" + "1" * n),
    st.text(alphabet="abc@0123456789٣", max_size=120),
    st.from_regex(r"[a-z]{1,64}@[0-9]{1,12}", fullmatch=True),
)


@FUZZ
@given(model_ids)
def test_model_ids_pass_or_are_400(model):
    try:
        assert check_model_id(model) == model
    except ProtocolError as error:
        assert error.status == 400 and error.param == "model" and len(error.message) < 300
    else:
        assert len(model) <= MAX_MODEL_ID and model.isascii()
        version = model.partition("@")[2]
        assert not version or version == "latest" or (version.isdigit() and len(version) <= 9)


@pytest.mark.parametrize("kind", KINDS)
def test_a_valid_request_still_parses(kind):
    body = {"model": "coding", "max_tokens": 4, "prompt": "hi"}
    if kind is ChatCompletionRequest:
        body = {"model": "coding", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_request(kind, json.dumps(body).encode()).model == "coding"


@LARGE
@given(st.sampled_from(KINDS), st.integers(0, 5000), st.integers(-3, 40), st.sampled_from(["a", "", 1, None]))
def test_long_prompt_lists_and_many_choices(kind, prompts, n, item):
    document = {"model": "m", "prompt": [item] * prompts, "n": n, "messages": [{"role": "user", "content": "x"}]}
    parses_or_refuses(kind, json.dumps(document).encode())
