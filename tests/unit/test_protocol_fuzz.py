"""Hypothesis: no request body makes the parser fail with anything but a 400 ProtocolError."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from madapt.serve.protocol import ChatCompletionRequest, CompletionRequest, ProtocolError, parse_request

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = [CompletionRequest, ChatCompletionRequest]
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
fields = st.sampled_from(
    ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n", "extra"]
)


def parses_or_refuses(kind, body: bytes) -> None:
    try:
        request = parse_request(kind, body)
    except ProtocolError as error:
        assert error.status == 400 and error.body()["error"]["message"]
    else:
        assert isinstance(request, kind) and request.max_tokens >= 1


@FUZZ
@given(st.sampled_from(KINDS), st.binary(max_size=300))
def test_arbitrary_bytes(kind, body):
    parses_or_refuses(kind, body)


@FUZZ
@given(st.sampled_from(KINDS), st.dictionaries(fields, values, max_size=6))
def test_arbitrary_fields(kind, document):
    parses_or_refuses(kind, json.dumps(document).encode())


@pytest.mark.parametrize("kind", KINDS)
def test_a_valid_request_still_parses(kind):
    body = {"model": "coding", "max_tokens": 4, "prompt": "hi"}
    if kind is ChatCompletionRequest:
        body = {"model": "coding", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_request(kind, json.dumps(body).encode()).model == "coding"
