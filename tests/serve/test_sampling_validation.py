"""Sampling settings are checked at the edge: a 400 naming the field, a tiny temperature is greedy."""

from __future__ import annotations

import json

import pytest

from madapt.serve.openai.errors import ProtocolError
from madapt.serve.openai.parsing import parse_request
from madapt.serve.openai.protocol import ChatCompletionRequest, CompletionRequest


def body(**fields) -> bytes:
    return json.dumps({"model": "coding", "prompt": "hi", **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (body(seed=-1), "seed"),
        (body(seed=2**63), "seed"),
        (body(top_p=0), "top_p"),
        (body(top_p=1.5), "top_p"),
        (body(temperature=-0.1), "temperature"),
        (b'{"model": "coding", "prompt": "hi", "temperature": 1e400}', "temperature"),  # json reads inf
        (b'{"model": "coding", "prompt": "hi", "temperature": NaN}', None),  # not JSON at all
    ],
)
def test_invalid_sampling_settings_are_a_400_naming_the_field(raw, param):
    with pytest.raises(ProtocolError) as refused:
        parse_request(CompletionRequest, raw)
    assert refused.value.status == 400
    if param:
        assert refused.value.param == param


def test_edge_values_are_accepted_and_a_tiny_temperature_is_greedy():
    request = parse_request(CompletionRequest, body(seed=2**63 - 1, top_p=1.0, temperature=5e-5))
    assert request.seed == 2**63 - 1 and request.temperature == 0.0
    assert parse_request(CompletionRequest, body(seed=0, temperature=1e-4)).temperature == 1e-4
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1e-9}
    assert parse_request(ChatCompletionRequest, json.dumps(chat).encode()).temperature == 0.0
