"""The OpenAI wire format: what is refused (and with which field named), and the response shapes the
official client parses. Plus every shipped serve config: valid for Ray Serve and for `build_app`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from madapt.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    completion,
    parse_request,
    usage,
)

SERVE_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "serve_configs").rglob("*.yaml"))


def body(**fields) -> bytes:
    return json.dumps({"model": "coding", "prompt": "hi", **fields}).encode()


def test_defaults_and_stop_normalised():
    request = parse_request(CompletionRequest, body(stop="\n"))
    assert (request.max_tokens, request.temperature, request.top_p, request.stop) == (16, 1.0, 1.0, ["\n"])
    assert parse_request(CompletionRequest, body()).stop == []


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{oops", None),
        (b"[1, 2]", None),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=10**6), "max_tokens"),
        (body(temperature=-1), "temperature"),
        (body(top_p=0), "top_p"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (body(stop=[""]), "stop"),
        (body(n=2), "n"),
        (body(logprobs=3), "logprobs"),
        (json.dumps({"model": "coding"}).encode(), "prompt"),
        (body(prompt=""), "prompt"),
    ],
)
def test_bad_requests_are_400_naming_the_field(raw, field):
    with pytest.raises(ProtocolError) as caught:
        parse_request(CompletionRequest, raw)
    assert caught.value.status == 400
    assert caught.value.param == field
    assert caught.value.body()["error"]["code"] == 400


def test_chat_needs_messages_with_known_roles():
    with pytest.raises(ProtocolError, match="messages"):
        parse_request(ChatCompletionRequest, json.dumps({"model": "m", "messages": []}).encode())
    with pytest.raises(ProtocolError, match="role"):
        parse_request(
            ChatCompletionRequest, json.dumps({"model": "m", "messages": [{"role": "x", "content": ""}]}).encode()
        )


def test_response_shapes_parse_with_the_openai_types():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    used = usage(3, 2)
    assert used["total_tokens"] == 5
    text = Completion.model_validate(completion("cmpl-1", "coding", "ab", "length", used, chat=False))
    assert text.choices[0].text == "ab" and text.usage.completion_tokens == 2
    chat = ChatCompletion.model_validate(completion("chatcmpl-1", "coding", "ab", "stop", used, chat=True))
    assert chat.choices[0].message.content == "ab"
    chunk = ChatCompletionChunk.model_validate(completion("chatcmpl-1", "coding", "a", None, None, chat=True))
    assert chunk.choices[0].delta.content == "a" and chunk.choices[0].finish_reason is None


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_are_valid(path):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from madapt.serve.app import ServeArgs, build_app

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for application in schema.applications:
        assert application.import_path == "madapt.serve.app:build_app"
        settings = ServeArgs.model_validate(application.args)
        assert {d.name for d in application.deployments} <= {"AdapterServer", "OpenAIIngress"}
        server = next(d for d in application.deployments if d.name == "AdapterServer")
        assert server.max_ongoing_requests >= settings.max_batch_size
        assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, application.args), Application)


def test_serve_configs_exist():
    assert any(p.name == "multi_adapter.yaml" for p in SERVE_CONFIGS)
