"""Structured output without Ray: `response_format` read and refused as the API does, the grammar's mask
over the tiny model's real token table, and constrained rows decoding next to free rows in one batch."""

from __future__ import annotations

import json

import jsonschema
import pytest

from madapt.config import ConfigError, parse_config
from madapt.serve.constrain import TEXT, GrammarError, Grammars, RowGrammar, read_response_format
from madapt.serve.engine import DecodeBatch, Engine, Row
from madapt.serve.multilora import BASE_SLOT, MultiLora
from madapt.serve.openai.errors import ProtocolError
from madapt.serve.openai.parsing import parse_request
from madapt.serve.openai.protocol import ChatCompletionRequest, CompletionRequest
from tests.helpers import PERSON

AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def engine(base):
    return Engine(MultiLora(base.model), base.tokenizer, context_length=512)


@pytest.fixture(scope="module")
def grammars(base):
    return Grammars(base.tokenizer)


def ids(engine: Engine, prompt: str) -> list[int]:
    return engine.tokenizer(prompt, add_special_tokens=False).input_ids


def test_response_formats_are_read_as_openai_defines_them():
    assert read_response_format(None) is None
    assert read_response_format({"type": "text"}) == TEXT
    assert read_response_format({"type": "json_object"}) == {"type": "json_schema", "schema": {"type": "object"}}
    assert read_response_format(AS_SCHEMA) == {"type": "json_schema", "schema": PERSON}
    request = parse_request(
        CompletionRequest, json.dumps({"model": "m", "prompt": "p", **{"response_format": AS_SCHEMA}}).encode()
    )
    assert request.response_format == {"type": "json_schema", "schema": PERSON}  # a vendor extension on completions


@pytest.mark.parametrize(
    ("response_format", "needle"),
    [
        ("json", "must be an object"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}, "cannot be enforced"),
        ({"type": "json_schema", "json_schema": {"name": 3, "schema": PERSON}}, "name"),
        ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}, "cannot be enforced"),
    ],
)
def test_a_bad_response_format_is_a_400_naming_it(response_format, needle):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": response_format}
    with pytest.raises(ProtocolError) as caught:
        parse_request(ChatCompletionRequest, json.dumps(body).encode())
    assert caught.value.status == 400 and caught.value.param == "response_format"
    assert needle in caught.value.message


def test_the_mask_allows_exactly_what_the_grammar_can_continue_with(engine, grammars):
    grammar = grammars.row(read_response_format({"type": "json_object"}))
    width = grammar.vocab + 7  # an embedding padded past the tokenizer's vocabulary
    allowed = grammar.allowed(width)
    assert allowed.shape == (width,) and not allowed[grammar.vocab :].any()
    chosen = allowed.nonzero().flatten().tolist()
    assert chosen and all(engine.tokenizer.decode([t]).startswith("{") for t in chosen)
    assert not allowed[ids(engine, "hello")[0]]
    for token in ids(engine, '{"a": [1, 2]}'):
        assert grammar.allowed(width)[token]
        complete = grammar.advance(token)
    assert complete  # the object is closed: nothing but the end may follow


def test_a_token_the_grammar_refuses_fails_only_that_row(engine, grammars):
    grammar = grammars.row(read_response_format({"type": "json_object"}))
    with pytest.raises(GrammarError, match="structured output failed"):
        grammar.advance(ids(engine, "hello")[0])


def test_constrained_and_free_rows_share_a_batch(engine, grammars):
    def rows() -> list[Row]:
        def person() -> RowGrammar:
            return grammars.row(read_response_format(AS_SCHEMA))

        anything = grammars.row(read_response_format({"type": "json_object"}))
        return [
            Row(ids(engine, "Describe a person"), BASE_SLOT, 40, grammar=person()),
            Row(ids(engine, "Describe a person"), BASE_SLOT, 40, temperature=1.0, seed=5, grammar=person()),
            Row(ids(engine, "Once upon a time"), BASE_SLOT, 6),
            Row(ids(engine, "hello"), BASE_SLOT, 8, grammar=anything),  # greedy: a random model's free JSON may not end
        ]

    alone = [engine.generate([row])[0] for row in rows()]
    static = engine.generate(rows())
    batch, continuous = DecodeBatch(engine), rows()
    batch.admit(continuous[:1])
    batch.step()
    batch.admit(continuous[1:])  # joins a running constrained row mid-flight
    while batch.rows:
        batch.step()
    for together in (static, continuous):
        assert [(r.text, r.finish_reason) for r in together] == [(r.text, r.finish_reason) for r in alone]
    greedy, sampled, free, anything = alone
    for person in (greedy, sampled):
        jsonschema.validate(json.loads(person.text), PERSON)
        assert person.finish_reason == "stop"
    assert isinstance(json.loads(anything.text), dict) and anything.finish_reason == "stop"
    assert free.finish_reason == "length"


def test_a_training_configs_decoder_schema_is_the_adapters_default(tiny_model, tmp_path):
    from tests.helpers import tiny_config

    feature = {"name": "response", "decoder": {"type": "text_parser", "json_schema": PERSON, "max_new_tokens": 9}}
    config = parse_config(tiny_config(tiny_model, str(tmp_path), output_features=[feature]))
    assert config.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": PERSON, "strict": True},
    }
    assert read_response_format(config.response_format) == {"type": "json_schema", "schema": PERSON}
    assert "output_features[0].decoder.max_new_tokens" in config.notes
    bad = {"name": "response", "decoder": {"type": "text_parser", "json_schema": {"type": "wat"}}}
    with pytest.raises(ConfigError, match=r"output_features\[0\]\.decoder\.json_schema: .*cannot be enforced"):
        parse_config(tiny_config(tiny_model, str(tmp_path), output_features=[bad]))
