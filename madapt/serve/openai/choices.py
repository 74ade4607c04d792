"""A request's `choices`, built from the replica's per-choice events, whole or as stream chunks.

Choice `i` is choice `i % n` of prompt `i // n` (OpenAI's and vLLM's order). With `echo`, a choice's text
starts with its prompt, and with logprobs, the prompt tokens' entries come first (the first one null).
Logprobs are OpenAI's chat shape (`content[]`) or the legacy completions shape (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`), whose offsets run on across a stream's chunks.

A chat with tools (`ToolReader`) reads each choice's whole text back as calls (`tools.read_output`), so a
stream holds back the text that could be a call until its choice ends (under `auto`, text before any
call streams as it comes), then sends it as OpenAI streams calls: per call, a delta with its `index`,
`id`, `type` and name, then one with its `arguments`, and the finish reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from madapt.serve.openai.protocol import (
    AssistantMessage,
    ChatCompletionLogProbs,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatLogProb,
    ChatLogProbsContent,
    CompletionLogProbs,
    CompletionResponseChoice,
    DeltaMessage,
    FunctionCall,
    ToolCall,
)
from madapt.serve.openai.tools import ToolPlan, read_output, surely_content

Choice = CompletionResponseChoice | ChatCompletionResponseChoice | ChatCompletionResponseStreamChoice
Logprobs = CompletionLogProbs | ChatCompletionLogProbs


@dataclass(frozen=True)
class ToolReader:
    """How a chat's choices are read back as calls: the request's plan, and the format the replica's chat
    template writes calls in (`chat_template.tool_format`)."""

    plan: ToolPlan
    tool_format: str | None

    def surely_content(self, text: str) -> int:
        """How much of a choice's text so far is content whatever follows: none of it unless `auto`."""
        return surely_content(text, self.tool_format) if self.plan.choice == "auto" else 0

    def read(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall], str | None]:
        content, calls, finish_reason = read_output(self.plan, text, finish_reason, self.tool_format)
        return (
            content,
            [ToolCall(**call | {"function": FunctionCall(**call["function"])}) for call in calls],
            finish_reason,
        )


class Choices:
    def __init__(
        self,
        count: int,
        *,
        chat: bool,
        n: int = 1,
        echo: list[str] | None = None,
        logprobs: bool = False,
        tools: ToolReader | None = None,
    ):
        self.count, self.chat, self.n, self.echo, self.logprobs, self.tools = count, chat, n, echo, logprobs, tools
        self.texts: list[list[str]] = [[] for _ in range(count)]
        self.entries: list[list[dict[str, Any]]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.offsets = [0] * count
        self.started: set[int] = set()
        self.sent = [0] * count  # characters of content streamed so far, per choice (with tools)

    def chunk(self, event: dict[str, Any]) -> Choice:
        """A stream chunk's choice for one event: the text delta, its logprobs, the finish reason."""
        index, text, entries = self._take(event)
        return choice(index, text, event.get("finish_reason"), self._format(index, entries), chat=self.chat, chunk=True)

    def chunks(self, event: dict[str, Any]) -> list[Choice]:
        """A stream's choices for one event: its chunk; with tools, the text that cannot be part of a call
        (`auto`: `tools.surely_content`) as it comes, the rest once the choice ends (`tool_chunks`)."""
        if self.tools is None:
            return [self.chunk(event)]
        self.add(event)
        index, text = event["index"], "".join(self.texts[event["index"]])
        if event.get("finish_reason") is None:
            ready = max(self.tools.surely_content(text), self.sent[index])
            piece, self.sent[index] = text[self.sent[index] : ready], ready
            return [delta_choice(index, DeltaMessage(content=piece))] if piece else []
        content, calls, finish = self.tools.read(text, self.finish[index])
        rest: str | None = (content or "")[self.sent[index] :] if calls else text[self.sent[index] :]
        if not rest and (calls or self.sent[index]):
            rest = None  # nothing left to say (an answer with no text at all still says "", as without tools)
        return tool_chunks(index, rest, calls, finish, self._format(index, self.entries[index]))

    def add(self, event: dict[str, Any]) -> None:
        """Take one event into the whole response."""
        index, text, entries = self._take(event)
        self.texts[index].append(text)
        self.entries[index] += entries
        self.finish[index] = event.get("finish_reason", self.finish[index])

    def whole(self) -> list[Choice]:
        if self.tools is not None:
            return [self._with_calls(i) for i in range(self.count)]
        return [
            choice(
                i, "".join(self.texts[i]), self.finish[i], self._format(i, self.entries[i]), chat=self.chat, chunk=False
            )
            for i in range(self.count)
        ]

    def _with_calls(self, index: int) -> Choice:
        assert self.tools is not None and self.chat
        content, calls, finish = self.tools.read("".join(self.texts[index]), self.finish[index])
        logprobs = self._format(index, self.entries[index])
        assert logprobs is None or isinstance(logprobs, ChatCompletionLogProbs)
        message = AssistantMessage(content=content, tool_calls=calls or None)
        return ChatCompletionResponseChoice(index=index, message=message, finish_reason=finish, logprobs=logprobs)

    def _take(self, event: dict[str, Any]) -> tuple[int, str, list[dict[str, Any]]]:
        index = event["index"]
        text = event.get("text", "")
        if self.echo is not None and index not in self.started:
            text = self.echo[index // self.n] + text
        self.started.add(index)
        return index, text, [*event.get("prompt_logprobs", ()), *event.get("logprobs", ())]

    def _format(self, index: int, entries: list[dict[str, Any]]) -> Logprobs | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries)
        formatted = text_logprobs(entries, self.offsets[index])
        self.offsets[index] += sum(len(e["token"]) for e in entries)
        return formatted


def choice(
    index: int, text: str, finish_reason: str | None, logprobs: Logprobs | None, *, chat: bool, chunk: bool
) -> Choice:
    """One entry of `choices`: a chunk's `delta` or a whole `message` (chat), or `text` (completions)."""
    if not chat:
        assert logprobs is None or isinstance(logprobs, CompletionLogProbs)
        return CompletionResponseChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)
    assert logprobs is None or isinstance(logprobs, ChatCompletionLogProbs)
    if chunk:
        delta = DeltaMessage(content=text)
        return ChatCompletionResponseStreamChoice(
            index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs
        )
    message = AssistantMessage(content=text)
    return ChatCompletionResponseChoice(index=index, message=message, finish_reason=finish_reason, logprobs=logprobs)


def tool_chunks(
    index: int, content: str | None, calls: list[ToolCall], finish_reason: str | None, logprobs: Logprobs | None
) -> list[Choice]:
    """A finished choice of a chat with tools, as stream chunks: its content (unless None), each call's opening
    piece (index, id, type, name) and its arguments, then the finish reason (with the choice's logprobs)."""
    deltas = [] if content is None else [DeltaMessage(content=content)]
    for k, call in enumerate(calls):
        name, arguments = call.function.name, call.function.arguments
        opening = ToolCall(index=k, id=call.id, type="function", function=FunctionCall(name=name, arguments=""))
        deltas += [
            DeltaMessage(tool_calls=[opening]),
            DeltaMessage(tool_calls=[ToolCall(index=k, function=FunctionCall(arguments=arguments))]),
        ]
    return [
        *(delta_choice(index, delta) for delta in deltas),
        delta_choice(index, DeltaMessage(), finish_reason, logprobs),
    ]


def delta_choice(
    index: int, delta: DeltaMessage, finish_reason: str | None = None, logprobs: Logprobs | None = None
) -> ChatCompletionResponseStreamChoice:
    assert logprobs is None or isinstance(logprobs, ChatCompletionLogProbs)
    return ChatCompletionResponseStreamChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)


def chat_logprobs(entries: list[dict[str, Any]]) -> ChatCompletionLogProbs:
    """OpenAI's chat `logprobs` of the replica's entries (`{"token", "logprob", "top": [[token, logprob]]}`)."""

    def entry(token: str, logprob: float) -> ChatLogProb:
        return ChatLogProb(token=token, logprob=logprob, bytes=list(token.encode()))

    content = [
        ChatLogProbsContent(
            token=e["token"],
            logprob=e["logprob"],
            bytes=list(e["token"].encode()),
            top_logprobs=[entry(t, lp) for t, lp in e["top"]],
        )
        for e in entries
    ]
    return ChatCompletionLogProbs(content=content)


def text_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> CompletionLogProbs:
    """The legacy completions `logprobs`; `text_offset` counts characters from `offset` (a stream's so far).
    An entry without a logprob (a prompt's first token) has null ones."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return CompletionLogProbs(
        tokens=[e["token"] for e in entries],
        token_logprobs=[e["logprob"] for e in entries],
        top_logprobs=[None if e["logprob"] is None else dict(e["top"]) for e in entries],
        text_offset=offsets,
    )
