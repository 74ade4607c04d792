"""A request's choices from the replica's events: order, echo, both logprobs shapes (parsed with the
official client's types), and stream chunks that add up to the whole response."""

from __future__ import annotations

from madapt.serve.openai.choices import Choices
from madapt.serve.openai.protocol import ChatCompletionResponse, CompletionResponse, UsageInfo


def response(request_id, model, choices, usage, *, chat):
    """The whole response's JSON, as the ingress sends it."""
    kind = ChatCompletionResponse if chat else CompletionResponse
    return kind(id=request_id, created=0, model=model, choices=choices, usage=usage).model_dump()


def usage(prompt_tokens, completion_tokens):
    return UsageInfo.of(prompt_tokens, completion_tokens)


def entry(token: str, logprob: float | None, *top: tuple[str, float]) -> dict:
    return {"token": token, "logprob": logprob, "top": [list(t) for t in top]}


EVENTS = [  # two prompts, n=1; prompt 1 ends first
    {"index": 1, "text": " b", "prompt_logprobs": [entry("Q", None), entry("!", -0.5, ("!", -0.5))]},
    {"index": 0, "text": " x", "prompt_logprobs": [entry("P", None)], "logprobs": [entry(" x", -1.0, (" x", -1.0))]},
    {"index": 1, "finish_reason": "length", "completion_tokens": 1, "logprobs": [entry(" b", -0.25, (" b", -0.25))]},
    {"index": 0, "text": "y", "logprobs": [entry("y", -2.0, ("z", -1.5))]},
    {"index": 0, "finish_reason": "stop", "completion_tokens": 2},
]


def test_echoed_completions_with_legacy_logprobs():
    from openai.types import Completion  # its types say float where OpenAI sends a null: built, not validated

    choices = Choices(2, chat=False, echo=["P", "Q!"], logprobs=True)
    for event in EVENTS:
        choices.add(event)
    done = Completion.construct(**response("cmpl-1", "m", choices.whole(), usage(3, 3), chat=False))
    assert [c.text for c in done.choices] == ["P xy", "Q! b"]
    assert [c.finish_reason for c in done.choices] == ["stop", "length"]
    first = done.choices[0].logprobs
    assert first.tokens == ["P", " x", "y"] and first.token_logprobs == [None, -1.0, -2.0]
    assert first.top_logprobs == [None, {" x": -1.0}, {"z": -1.5}] and first.text_offset == [0, 1, 3]
    assert done.choices[1].logprobs.token_logprobs == [None, -0.5, -0.25]

    streamed = Choices(2, chat=False, echo=["P", "Q!"], logprobs=True)
    chunks = [streamed.chunk(event).model_dump() for event in EVENTS]
    assert "".join(c["text"] for c in chunks if c["index"] == 0) == "P xy"
    offsets = [o for c in chunks if c["index"] == 0 for o in c["logprobs"]["text_offset"]]
    assert offsets == first.text_offset  # offsets run on across chunks


def test_chat_logprobs_in_openai_shape():
    from openai.types.chat import ChatCompletion

    choices = Choices(1, chat=True, logprobs=True)
    choices.add({"index": 0, "text": "h\u00e9", "logprobs": [entry("h\u00e9", -0.1, ("h\u00e9", -0.1), ("a", -3.0))]})
    choices.add({"index": 0, "finish_reason": "stop", "completion_tokens": 1, "logprobs": []})
    done = ChatCompletion.model_validate(response("c-1", "m", choices.whole(), usage(1, 1), chat=True))
    [token] = done.choices[0].logprobs.content
    assert (token.token, token.logprob, token.bytes) == ("h\u00e9", -0.1, [104, 195, 169])
    assert [(t.token, t.logprob) for t in token.top_logprobs] == [("h\u00e9", -0.1), ("a", -3.0)]
    plain = Choices(1, chat=True)
    plain.add({"index": 0, "text": "x"})
    assert plain.whole()[0].logprobs is None
