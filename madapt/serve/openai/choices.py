"""A request's `choices`, built from the replica's per-choice events, whole or as stream chunks.

Choice `i` is choice `i % n` of prompt `i // n` (OpenAI's and vLLM's order). With `echo`, a choice's text
starts with its prompt, and with logprobs, the prompt tokens' entries come first (the first one null).
Logprobs are OpenAI's chat shape (`content[]`) or the legacy completions shape (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`), whose offsets run on across a stream's chunks.
"""

from __future__ import annotations

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
)

Choice = CompletionResponseChoice | ChatCompletionResponseChoice | ChatCompletionResponseStreamChoice
Logprobs = CompletionLogProbs | ChatCompletionLogProbs


class Choices:
    def __init__(self, count: int, *, chat: bool, n: int = 1, echo: list[str] | None = None, logprobs: bool = False):
        self.count, self.chat, self.n, self.echo, self.logprobs = count, chat, n, echo, logprobs
        self.texts: list[list[str]] = [[] for _ in range(count)]
        self.entries: list[list[dict[str, Any]]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.offsets = [0] * count
        self.started: set[int] = set()

    def chunk(self, event: dict[str, Any]) -> Choice:
        """A stream chunk's choice for one event: the text delta, its logprobs, the finish reason."""
        index, text, entries = self._take(event)
        return choice(index, text, event.get("finish_reason"), self._format(index, entries), chat=self.chat, chunk=True)

    def add(self, event: dict[str, Any]) -> None:
        """Take one event into the whole response."""
        index, text, entries = self._take(event)
        self.texts[index].append(text)
        self.entries[index] += entries
        self.finish[index] = event.get("finish_reason", self.finish[index])

    def whole(self) -> list[Choice]:
        return [
            choice(
                i, "".join(self.texts[i]), self.finish[i], self._format(i, self.entries[i]), chat=self.chat, chunk=False
            )
            for i in range(self.count)
        ]

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
