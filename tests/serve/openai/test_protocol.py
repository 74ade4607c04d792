"""The OpenAI wire format: what is accepted, ignored or refused (and with which field named), the error
shape, bounded parsing, and the response shapes the official client parses. Plus every shipped serve
config: valid for Ray Serve and for `build_app`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from madapt.serve.openai.chat_template import chat_prompt
from madapt.serve.openai.choices import choice
from madapt.serve.openai.errors import CODES_400, ProtocolError, status_for
from madapt.serve.openai.parsing import (
    IGNORED_HEADER,
    MAX_DEPTH,
    MAX_NUMBER_DIGITS,
    check_model_id,
    ignored_header,
    parse_request,
)
from madapt.serve.openai.protocol import (
    IGNORED,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)

SERVE_CONFIGS = sorted((Path(__file__).resolve().parents[3] / "serve_configs").rglob("*.yaml"))


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
        (body(n=17), "n"),
        (body(n=0), "n"),
        (body(logprobs=21), "logprobs"),
        (body(logprobs=-1), "logprobs"),
        (body(echo=[True]), "echo"),
        (body(best_of=3), "best_of"),
        (body(suffix="}"), "suffix"),
        (body(frequency_penalty=2.5), "frequency_penalty"),
        (body(presence_penalty=-3), "presence_penalty"),
        (b'{"model": "coding", "prompt": "hi", "presence_penalty": 1e400}', "presence_penalty"),  # json reads inf
        (body(repetition_penalty=0), "repetition_penalty"),
        (body(repetition_penalty=-1.5), "repetition_penalty"),
        (body(top_k=-2), "top_k"),
        (body(top_k=1.5), "top_k"),
        (body(min_p=1.01), "min_p"),
        (body(min_p=-0.1), "min_p"),
        (body(prompt=["a", "b"] * 3, n=11), "prompt"),  # 66 choices
        (body(prompt=["a"] * 65), "prompt"),
        (body(prompt=["a", ""]), "prompt"),
        (body(logit_bias={"50256": -100}), "logit_bias"),
        (body(seed=2**64), "seed"),
        (body(seed="x"), "seed"),
        (body(max_completion_tokens=0), "max_completion_tokens"),
        (body(stream_options={"include_usage": "maybe"}), "stream_options.include_usage"),
        (json.dumps({"model": "coding"}).encode(), "prompt"),
        (json.dumps({"prompt": "hi"}).encode(), "model"),
        (body(prompt=""), "prompt"),
        (body(prompt=[]), "prompt"),
        (body(prompt=[1, 2, 3]), "prompt"),
        (body(prompt=[[1, 2]]), "prompt"),
        (body(prompt={"text": "hi"}), "prompt"),
    ],
)
def test_bad_requests_are_400_naming_the_field(raw, field):
    with pytest.raises(ProtocolError) as caught:
        parse_request(CompletionRequest, raw)
    assert caught.value.status == 400
    assert caught.value.param == field
    error = caught.value.body()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["code"], str) and error["message"]


TOOL = {"type": "function", "function": {"name": "f"}}


def chat_body(messages=None, **fields) -> bytes:
    turns = [{"role": "user", "content": "hi"}] if messages is None else messages
    return json.dumps({"model": "coding", "messages": turns, **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "field", "code", "needle"),
    [
        (chat_body(n=17), "n", "invalid_value", "16"),
        (chat_body(top_logprobs=2), "top_logprobs", "invalid_value", "logprobs must be true"),
        (chat_body(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value", "20"),
        (chat_body(logprobs="maybe"), "logprobs", "invalid_type", "boolean"),
        (chat_body(response_format={"type": "xml"}), "response_format", "invalid_value", "'json_schema'"),
        (chat_body(response_format={"type": "json_schema", "json_schema": {}}), "response_format", None, "schema"),
        (chat_body(tools="f"), "tools", "invalid_value", "must be a list"),
        (chat_body(tools=[{"function": {"name": "f"}}]), "tools[0].type", None, '"function"'),
        (
            chat_body(tools=[TOOL, {"type": "function", "function": {"description": "d"}}]),
            "tools[1].function.name",
            None,
            "1-64",
        ),
        (chat_body(tools=[TOOL, TOOL]), "tools[1].function.name", None, "twice"),
        (
            chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]),
            "tools[0].function.parameters",
            "invalid_value",
            "cannot be enforced",
        ),
        (chat_body(tool_choice="required"), "tool_choice", None, "needs tools"),
        (chat_body(tools=[TOOL], tool_choice="sometimes"), "tool_choice", None, "'required'"),
        (
            chat_body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
            "tool_choice.function.name",
            None,
            "not one of the request's tools",
        ),
        (chat_body(tools=[TOOL], parallel_tool_calls="yes"), "parallel_tool_calls", None, "true or false"),
        (
            chat_body(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}),
            "response_format",
            None,
            "cannot be combined",
        ),
        (chat_body(functions=[{"name": "f"}]), "functions", None, "function calling"),
        (chat_body(modalities=["text", "audio"]), "modalities", None, "text"),
        (chat_body(audio={"voice": "alloy"}), "audio", None, "audio"),
        (chat_body([]), "messages", None, "at least 1"),
        (chat_body([{"role": "x", "content": "hi"}]), "messages.0.role", "invalid_value", "developer"),
        (chat_body([{"role": "function", "content": "hi"}]), "messages.0.role", None, "'tool'"),
        (chat_body([{"content": "hi"}]), "messages.0.role", "missing_required_parameter", "required"),
        (chat_body([{"role": "user"}]), "messages.0", None, "needs content"),
        (chat_body([{"role": "user", "content": 3}]), "messages.0.content", None, "string or a list"),
        (chat_body([{"role": "user", "content": [{"text": "a"}]}]), "messages.0.content", None, "'type'"),
        (chat_body([{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content", None, "'text'"),
        (
            chat_body([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
            "messages.0.content",
            "unsupported_value",
            "'image_url'",
        ),
        (
            chat_body([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}]),
            "messages.0.content",
            "unsupported_value",
            "'input_audio'",
        ),
        (
            chat_body([{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]),
            "messages.0.tool_calls[0].function",
            "invalid_value",
            '"name"',
        ),
        (
            chat_body([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]),
            "messages.0.tool_calls[0].function.arguments",
            None,
            "JSON object",
        ),
        (
            chat_body([{"role": "assistant", "function_call": {"name": "f"}}]),
            "messages.0.function_call",
            None,
            "tool_calls",
        ),
    ],
)
def test_chat_refusals_name_the_field(raw, field, code, needle):
    with pytest.raises(ProtocolError) as caught:
        parse_request(ChatCompletionRequest, raw)
    assert (caught.value.status, caught.value.param) == (400, field)
    assert code is None or caught.value.code == code
    assert needle in caught.value.message


def test_unknown_fields_are_ignored_named_and_logged_once(caplog):
    raw = chat_body(
        [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}], "x_trace": 1}],
        skip_special_tokens=True,
        include_stop_str_in_output=False,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    with caplog.at_level("WARNING", logger="madapt.serve.openai.parsing"):
        request = parse_request(ChatCompletionRequest, raw)
        parse_request(ChatCompletionRequest, raw)
    ignored = {
        "skip_special_tokens",
        "include_stop_str_in_output",
        "stream_options.continuous_usage_stats",
        "messages[].x_trace",
        "messages[].content[].cache_control",
    }
    assert request.ignored_fields() == ignored
    assert request.stream_options.include_usage
    assert sorted(caplog.messages) == sorted(f"ignoring unknown request field {n!r} (logged once)" for n in ignored)
    assert ignored_header(ignored) == {IGNORED_HEADER: ",".join(sorted(ignored))}
    assert ignored_header(set()) == {}


def test_the_ignored_header_is_encoded_and_bounded():
    header = ignored_header({"a b", "caf\u00e9", "x\r\ny"})[IGNORED_HEADER]
    assert header == "a%20b,caf%C3%A9,x%0D%0Ay" and header.isascii()
    long = ignored_header({f"field_{i:04d}_" + "x" * 40 for i in range(1000)})[IGNORED_HEADER]
    assert len(long) <= 1024 + 4 and long.endswith(",...")


@pytest.mark.parametrize("name", IGNORED)
def test_fields_that_change_nothing_are_accepted_silently(name):
    value = {"metadata": {"k": "v"}, "store": True}.get(name, "x")
    for kind, raw in ((ChatCompletionRequest, chat_body(**{name: value})), (CompletionRequest, body(**{name: value}))):
        assert parse_request(kind, raw).ignored_fields() == set()
    options = chat_body(stream=True, stream_options={"include_usage": True, "include_obfuscation": False})
    assert parse_request(ChatCompletionRequest, options).ignored_fields() == set()


def test_neutral_values_of_refused_fields_are_accepted():
    neutral = {
        "n": 1,
        "logprobs": False,
        "top_logprobs": 0,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "functions": [],
        "modalities": ["text"],
        "audio": None,
        "top_k": -1,
        "min_p": 0,
        "repetition_penalty": 1,
    }
    assert parse_request(ChatCompletionRequest, chat_body(**neutral)).n == 1
    assert parse_request(CompletionRequest, body(echo=False, best_of=1, suffix="", logprobs=None)).prompt == "hi"
    nulls = parse_request(CompletionRequest, body(temperature=None, top_p=None, n=None, max_tokens=None, stop=None))
    assert (nulls.temperature, nulls.top_p, nulls.n, nulls.max_tokens, nulls.stop) == (1.0, 1.0, 1, 16, [])


def test_max_completion_tokens_wins_and_chat_has_no_default_budget():
    chat = parse_request(ChatCompletionRequest, chat_body(max_tokens=9, max_completion_tokens=5))
    assert (chat.new_tokens, chat.new_tokens_field) == (5, "max_completion_tokens")
    assert parse_request(ChatCompletionRequest, chat_body(max_tokens=9)).new_tokens == 9
    assert parse_request(ChatCompletionRequest, chat_body()).new_tokens is None  # the server: what fits
    assert parse_request(CompletionRequest, body()).new_tokens == 16  # OpenAI's default for completions
    assert parse_request(CompletionRequest, body(max_completion_tokens=3)).new_tokens == 3


def test_content_parts_roles_and_names_render_as_the_template_expects():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "name": "ada", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None, "refusal": None},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    request = parse_request(ChatCompletionRequest, chat_body(messages))
    assert request.conversation() == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "one\ntwo", "name": "ada"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert request.ignored_fields() == set()


def test_a_single_prompt_in_a_list_is_that_prompt():
    assert parse_request(CompletionRequest, body(prompt=["hello"])).prompts == ["hello"]


def test_chat_template_refusals_are_400(tiny_model):
    from madapt.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert "hi" in chat_prompt(tokenizer, turns)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ProtocolError) as caught:
        chat_prompt(tokenizer, turns)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_chat_template", "messages")
    assert "System role not supported" in caught.value.message
    tokenizer.chat_template = "{{ messages[0]['content'] + 1 }}"  # a template that fails on this input
    with pytest.raises(ProtocolError, match="could not render"):
        chat_prompt(tokenizer, turns)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{oops", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"model": "coding", "prompt": "hi", "temperature": NaN}', "invalid_json"),
        (b'{"model": "coding", "prompt": "hi", "x": Infinity}', "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, "nesting_too_deep"),
        (b"[" * 100_000, "nesting_too_deep"),
        (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "nesting_too_deep"),
        (b'{"model": "coding", "prompt": "hi", "seed": 1' + b"0" * 5000 + b"}", "number_too_long"),
        (b'{"model": "coding", "prompt": "hi", "temperature": 0.' + b"0" * 5000 + b"1}", "number_too_long"),
        (b'{"model": "coding", "prompt": "hi", "top_p": 1e' + b"9" * 200 + b"}", "number_too_long"),
    ],
)
def test_bodies_are_bounded_before_parsing(raw, code):
    with pytest.raises(ProtocolError) as caught:
        parse_request(CompletionRequest, raw)
    assert (caught.value.status, caught.value.code) == (400, code)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "coding", "prompt": "\\ud800"}', "prompt"),
        (b'{"model": "coding", "prompt": ["ok", "a\\udfffb"]}', "prompt[1]"),
        (b'{"model": "coding", "prompt": "hi", "stop": ["\\ud83d"]}', "stop[0]"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(raw, param):
    """Valid JSON, but no text: the tokenizer could not encode it (it was a 500)."""
    with pytest.raises(ProtocolError) as caught:
        parse_request(CompletionRequest, raw)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert "lone UTF-16 surrogate" in caught.value.message
    message = b'{"model": "coding", "messages": [{"role": "user", "content": "\\udc00"}]}'
    with pytest.raises(ProtocolError) as caught:
        parse_request(ChatCompletionRequest, message)
    assert caught.value.param == "messages[0].content"
    pair = b'{"model": "coding", "prompt": "\\ud83d\\ude00"}'  # a surrogate pair is one character: fine
    assert parse_request(CompletionRequest, pair).prompt == "\U0001f600"


def test_bounds_do_not_count_strings():
    deep_text = "[" * 100_000 + '\\"' + "9" * 5000  # brackets, an escaped quote, digits: all inside the prompt
    assert parse_request(CompletionRequest, body(prompt=deep_text)).prompt == deep_text
    nested = {"model": "coding", "prompt": "hi", "metadata": {}}
    inner = nested["metadata"]
    for _ in range(MAX_DEPTH - 3):  # the body's object, metadata, then MAX_DEPTH - 2 more levels: exactly MAX_DEPTH
        inner["a"] = {}
        inner = inner["a"]
    assert parse_request(CompletionRequest, json.dumps(nested).encode()).prompt == "hi"
    assert parse_request(CompletionRequest, body(seed=int("9" * (MAX_NUMBER_DIGITS - 1)) % 2**63)).seed


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("coding@" + "1" * 5000, "longer than"),
        ("x" * 101, "longer than"),
        ("coding@\u0663", "ASCII"),  # Arabic-Indic digit three: int() would read it as 3
        ("coding@0123456789", "version"),
        ("coding@", "version"),
        ("coding@1.0", "version"),
        ("coding@-1", "version"),
        ("coding\n", "ASCII"),
    ],
)
def test_model_ids_are_bounded(model, needle):
    with pytest.raises(ProtocolError) as caught:
        check_model_id(model)
    assert (caught.value.status, caught.value.param) == (400, "model")
    assert "invalid adapter reference" in caught.value.message and needle in caught.value.message
    assert len(caught.value.message) < 200


@pytest.mark.parametrize("model", ["coding", "coding@1", "coding@latest", "coding@123456789", "base"])
def test_good_model_ids_pass(model):
    assert check_model_id(model) == model


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (400, "invalid_request_error", "invalid_request"),
        (401, "invalid_request_error", "invalid_api_key"),
        (404, "invalid_request_error", "not_found"),
        (405, "invalid_request_error", "method_not_allowed"),
        (413, "invalid_request_error", "request_too_large"),
        (500, "server_error", "internal_error"),
        (503, "server_error", "service_unavailable"),
    ],
)
def test_errors_have_openai_types_and_string_codes(status, kind, code):
    from openai.types.shared import ErrorObject

    error = ProtocolError(status, "no")
    assert error.body() == {"error": {"message": "no", "type": kind, "param": None, "code": code}}
    assert ErrorObject.model_validate(error.body()["error"]).code == code
    assert ("Retry-After" in error.headers) == (status == 503)
    assert ProtocolError(404, "gone", param="model", code="model_not_found").body()["error"]["code"] == (
        "model_not_found"
    )
    assert status_for(code) == status  # what a stream's reader gets back from an error event


def test_every_code_maps_back_to_its_status():
    assert [status_for(code) for code in CODES_400] == [400] * len(CODES_400)
    assert (status_for("model_not_found"), status_for("unknown_url"), status_for(503)) == (404, 404, 503)
    assert status_for("something_new") == status_for(None) == 500


def test_response_shapes_parse_with_the_openai_types():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    used = UsageInfo.of(3, 2)
    assert used.total_tokens == 5

    def one(text, finish_reason, *, chat, chunk=False):
        return [choice(0, text, finish_reason, None, chat=chat, chunk=chunk)]

    whole = CompletionResponse(
        id="cmpl-1", created=1, model="coding", choices=one("ab", "length", chat=False), usage=used
    )
    text = Completion.model_validate(whole.model_dump())
    assert text.choices[0].text == "ab" and text.usage.completion_tokens == 2
    answer = ChatCompletionResponse(
        id="chatcmpl-1", created=1, model="coding", choices=one("ab", "stop", chat=True), usage=used
    )
    chat = ChatCompletion.model_validate(answer.model_dump())
    assert chat.choices[0].message.content == "ab"
    delta = ChatCompletionStreamResponse(
        id="chatcmpl-1", created=1, model="coding", choices=one("a", None, chat=True, chunk=True)
    )
    assert "usage" not in delta.model_dump() and "role" not in delta.model_dump()["choices"][0]["delta"]
    chunk = ChatCompletionChunk.model_validate(delta.model_dump())
    assert chunk.choices[0].delta.content == "a" and chunk.choices[0].finish_reason is None


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_are_valid(path):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from madapt.serve.app import build_app
    from madapt.serve.args import ServeArgs

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


def test_sampling_fields_reach_the_replica_as_given():
    chat = parse_request(
        ChatCompletionRequest,
        chat_body(n=2, logprobs=True, top_logprobs=3, top_k=5, min_p=0.1, repetition_penalty=1.2, seed=4, max_tokens=7),
    )
    assert chat.sampling() == {
        "temperature": 1.0,
        "top_p": 1.0,
        "stop": [],
        "seed": 4,
        "n": 2,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": 7,
        "logprobs": 3,
    }
    assert parse_request(ChatCompletionRequest, chat_body(logprobs=True)).sampling()["logprobs"] == 0
    assert parse_request(ChatCompletionRequest, chat_body(top_logprobs=0)).sampling()["logprobs"] is None
    text = parse_request(CompletionRequest, body(prompt=["a", "b"], logprobs=0, echo=True, presence_penalty=-2))
    assert text.prompts == ["a", "b"]
    assert (text.sampling()["logprobs"], text.sampling()["echo"], text.sampling()["presence_penalty"]) == (0, True, -2)
    nulls = parse_request(CompletionRequest, body(top_k=None, min_p=None, echo=None, repetition_penalty=None))
    assert (nulls.top_k, nulls.min_p, nulls.echo, nulls.repetition_penalty) == (0, 0.0, False, 1.0)
