"""Tool calls without Ray: the request's tools read into a plan, the chat template's rendering of tools and
of calls in the history (the tiny model's SmolLM2 template has no tools: madapt's system prompt; a template
with tools renders them itself), `required` and named choices decoded under the grammar on the tiny model
(the arguments always valid against the schema), free text read back in the Hermes and Llama 3.1 formats,
and the choices whole and streamed, rebuilt by the official client's stream accumulator."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from madapt.serve.constrain import Grammars
from madapt.serve.engine import Engine, Row
from madapt.serve.multilora import BASE_SLOT, MultiLora
from madapt.serve.openai.chat_template import chat_prompt, tool_format
from madapt.serve.openai.choices import Choices, ToolReader
from madapt.serve.openai.errors import ProtocolError
from madapt.serve.openai.parsing import parse_request
from madapt.serve.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    UsageInfo,
)
from madapt.serve.openai.tools import HERMES, LLAMA_JSON, NAMED, PYTHON_TAG, read_calls, read_output, read_tools

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CALL = '{"name": "get_time", "arguments": {"zone": "UTC"}}'
QWEN_LIKE = (  # the parts of Qwen2.5's template that matter here: tools in the system turn, calls as tags
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{%- endfor %}<|im_end|>\n{%- endfor %}<|im_start|>assistant\n"
)


def request(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS, **fields}
    return parse_request(ChatCompletionRequest, json.dumps(body).encode())


def test_tool_choice_defaults_and_plans():
    assert request().tool_plan.choice == "auto"
    assert request(tools=None).tool_plan is None and request(tools=[], tool_choice="none").tool_plan is None
    named = request(tool_choice={"type": "function", "function": {"name": "get_time"}}).tool_plan
    assert (named.choice, named.name, named.constraint()) == (NAMED, "get_time", TIME)
    assert request(tool_choice="auto").tool_plan.constraint() is None
    required = request(tool_choice="required", parallel_tool_calls=False).tool_plan.constraint()
    assert required["maxItems"] == 1 and "maxItems" not in read_tools(TOOLS, "required", None).constraint()
    call = [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]
    jsonschema.validate(call, required)
    for wrong in ([{"name": "get_time", "arguments": {"city": "Oslo", "days": 2}}], [], call * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, required)


def test_required_hoists_the_functions_defs_and_refuses_clashing_ones():
    def with_city(*cities):
        city = {"$defs": {"City": {"enum": list(cities)}}, "properties": {"c": {"$ref": "#/$defs/City"}}}
        return {"type": "object", "required": ["c"], "additionalProperties": False} | city

    tools = [{"type": "function", "function": {"name": n, "parameters": with_city("a", "b")}} for n in ("f", "g")]
    schema = request(tools=tools, tool_choice="required").tool_plan.constraint()
    jsonschema.validate([{"name": "g", "arguments": {"c": "b"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "g", "arguments": {"c": "x"}}], schema)
    tools[1]["function"]["parameters"] = with_city("x")
    with pytest.raises(ProtocolError) as clash:
        request(tools=tools, tool_choice="required")
    assert clash.value.param == "tools[1].function.parameters" and "$defs/City" in clash.value.message


@pytest.fixture(scope="module")
def engine(base):
    return Engine(MultiLora(base.model), base.tokenizer, context_length=1024)


@pytest.fixture(scope="module")
def grammars(base):
    return Grammars(base.tokenizer)


@pytest.mark.parametrize(
    ("tool_choice", "parallel"),
    [("required", False), ("required", True), ({"type": "function", "function": {"name": "get_weather"}}, True)],
)
def test_required_and_named_calls_decode_under_the_grammar(engine, grammars, tool_choice, parallel):
    """A random model, greedy and sampled: every answer is a call whose arguments are valid for its function."""
    body = request(tool_choice=tool_choice, parallel_tool_calls=parallel)
    prompt_ids = engine.tokenizer(chat_prompt(engine.tokenizer, body.conversation(), body.tool_plan.tools)).input_ids
    rows = [
        Row(prompt_ids, BASE_SLOT, 120, grammar=grammars.row({"schema": body.tool_plan.constraint()})),
        Row(
            prompt_ids,
            BASE_SLOT,
            120,
            temperature=1.0,
            seed=3,
            grammar=grammars.row({"schema": body.tool_plan.constraint()}),
        ),
    ]
    for row in engine.generate(rows):
        content, calls, finish = read_output(body.tool_plan, row.text, row.finish_reason, HERMES)
        assert (content, finish) == (None, "tool_calls") and calls, row.text
        assert len(calls) == 1 or parallel
        for call in calls:
            assert call["id"].startswith("call_") and call["type"] == "function"
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
        if body.tool_plan.choice == NAMED:
            assert calls[0]["function"]["name"] == "get_weather"


def test_free_text_is_read_in_the_templates_format():
    weather = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    content, calls = read_calls(f"Let me look.\n<tool_call>\n{json.dumps(weather)}\n</tool_call>", HERMES)
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    two = "".join(f"<tool_call>{json.dumps(weather | {'arguments': {'days': d}})}</tool_call>" for d in (1, 2))
    assert [json.loads(c["function"]["arguments"])["days"] for c in read_calls(two, HERMES)[1]] == [1, 2]
    llama = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC; CET"}}; {"name": "f", "parameters": {}}'
    content, calls = read_calls(llama, LLAMA_JSON)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time", "f"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC; CET"}
    for text, form in [
        ("It is sunny.", HERMES),
        ("<tool_call>{not json}</tool_call>", HERMES),
        ('<tool_call>{"name": "f"}</tool_call>', HERMES),  # no arguments object
        ('{"answer": 42}', LLAMA_JSON),
        ('{"name": "f", "parameters": {}} and then text', LLAMA_JSON),
    ]:
        assert read_calls(text, form) == (text, [])
    auto = request().tool_plan
    assert read_output(auto, "It is sunny.", "stop", HERMES) == ("It is sunny.", [], "stop")
    assert read_output(auto, two, "stop", HERMES)[2] == "tool_calls"
    assert read_output(request(tool_choice="none").tool_plan, two, "stop", HERMES) == (two, [], "stop")
    cut = read_output(request(tool_choice="required").tool_plan, '[{"name": "get_ti', "length", HERMES)
    assert cut == ('[{"name": "get_ti', [], "length")


def test_tools_and_calls_in_the_history_are_rendered(base):
    tokenizer = base.tokenizer
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, clear"},
    ]
    body = request(messages=history)
    assert body.conversation()[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 1}
    assert tool_format(tokenizer) == HERMES and "tools" not in tokenizer.chat_template  # SmolLM2: madapt's words
    prompt = chat_prompt(tokenizer, body.conversation(), body.tool_plan.tools)
    assert '"name": "get_weather"' in prompt and '"description": "Forecast"' in prompt and "<tool_call>" in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}</tool_call>' in prompt
    assert "<tool_response>\n18C, clear\n</tool_response>" in prompt
    assert chat_prompt(tokenizer, body.conversation()[:1]) == chat_prompt(
        tokenizer, [{"role": "user", "content": "Weather in Paris?"}]
    )

    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = QWEN_LIKE  # a template that renders tools itself
        prompt = chat_prompt(tokenizer, body.conversation(), body.tool_plan.tools)
        assert prompt.startswith("<|im_start|>system\n# Tools\n<tools>") and "You can call" not in prompt
        assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}</tool_call>' in prompt
        assert tool_format(tokenizer) == HERMES
        tokenizer.chat_template = QWEN_LIKE.replace("<tool_call>", "<|python_tag|>")  # Llama 3.1's marker
        assert tool_format(tokenizer) == LLAMA_JSON
    finally:
        tokenizer.chat_template = original


def test_calls_whole_and_streamed_as_openai_sends_them():
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    text = 'Checking.<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    events = [{"index": 0, "text": text[:12]}, {"index": 0, "text": text[12:]}, {"index": 0, "finish_reason": "stop"}]
    reader = ToolReader(request().tool_plan, HERMES)
    whole = Choices(1, chat=True, tools=reader)
    for event in events:
        whole.add(event)
    answer = ChatCompletionResponse(id="c", created=0, model="m", choices=whole.whole(), usage=UsageInfo.of(1, 1))
    done = ChatCompletion.model_validate(answer.model_dump())
    [call] = done.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"zone": "CET"})
    assert done.choices[0].message.content == "Checking." and done.choices[0].finish_reason == "tool_calls"

    streamed, state = Choices(1, chat=True, tools=reader), ChatCompletionStreamState()
    pieces = [piece for event in events for piece in streamed.chunks(event)]
    assert len(pieces) == 4  # content, the call's opening (id, name), its arguments, the finish
    for piece in pieces:
        chunk = ChatCompletionStreamResponse(id="c", created=0, model="m", choices=[piece]).model_dump()
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    rebuilt = state.get_final_completion().choices[0]
    assert pieces[0].delta.content == "Checking." and pieces[1].delta.tool_calls[0].function.name == "get_time"
    assert rebuilt.finish_reason == "tool_calls" and rebuilt.message.content == "Checking."
    [again] = rebuilt.message.tool_calls
    assert again.id.startswith("call_") and again.type == "function"
    assert (again.function.name, again.function.arguments) == ("get_time", call.function.arguments)


def test_auto_streams_the_text_that_cannot_be_a_call_as_it_comes():
    def stream(texts, tool_format):
        choices = Choices(1, chat=True, tools=ToolReader(request().tool_plan, tool_format))
        events = [{"index": 0, "text": text} for text in texts] + [{"index": 0, "finish_reason": "length"}]
        return [[piece.delta.content for piece in choices.chunks(event)] for event in events]

    assert stream(["Sunny \n<too", "l today", "."], HERMES) == [["Sunny"], [" \n<tool today"], ["."], [None]]
    assert stream(["It is", " sunny"], LLAMA_JSON) == [["It is"], [" sunny"], [None]]
    assert stream([' {"na', "me"], LLAMA_JSON) == [[], [], [' {"name', None]]  # could be a call: held, then content
    assert stream([], HERMES) == [["", None]]  # no text at all: content "", as a whole answer says
    held = stream(["<tool_call>", '{"name": "get_time", "arguments": {}}', "</tool_call>"], HERMES)
    assert held[:3] == [[], [], []] and held[3][0] is None and len(held[3]) == 3  # the call's opening, arguments, end


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["Hi", " ", "\n", "<tool", "_call>", CALL, "</tool_call>", "{", PYTHON_TAG, "x;"]), max_size=8
    ),
    st.sampled_from([HERMES, LLAMA_JSON]),
)
def test_a_stream_adds_up_to_the_whole_answer(texts, tool_format):
    reader = ToolReader(request().tool_plan, tool_format)
    whole, streamed = Choices(1, chat=True, tools=reader), Choices(1, chat=True, tools=reader)
    pieces = []
    for event in [{"index": 0, "text": text} for text in texts] + [{"index": 0, "finish_reason": "stop"}]:
        whole.add(event)
        pieces += streamed.chunks(event)
    [answer] = whole.whole()
    said = [piece.delta.content for piece in pieces if piece.delta.content is not None]
    assert ("".join(said) if said else None) == answer.message.content
    names = [call.function.name for piece in pieces for call in piece.delta.tool_calls or [] if call.function.name]
    assert names == [call.function.name for call in answer.message.tool_calls or []]
    assert pieces[-1].finish_reason == answer.finish_reason
