"""`/v1/chat/completions`, as vLLM's `serving_chat.py`: a conversation (rendered by the replica with the base
model's chat template: `chat_template`), answered as `chat.completion` objects or `chat.completion.chunk`s,
each choice's stream opening with the assistant's role. With tools (`tools`), the replica renders them, a
`required` or named `tool_choice` constrains the output (its schema sent as the row's `response_format`),
and the choices are read back as calls (`choices.ToolReader`)."""

from __future__ import annotations

import time
from typing import Any

from madapt.serve.openai.choices import Choice, Choices, ToolReader
from madapt.serve.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    SamplingRequest,
    UsageInfo,
    WireModel,
)
from madapt.serve.openai.serving import OpenAIServing


class OpenAIServingChat(OpenAIServing):
    kind = ChatCompletionRequest
    id_prefix = "chatcmpl"

    def prompts(self, body: SamplingRequest) -> dict[str, Any]:
        assert isinstance(body, ChatCompletionRequest)
        plan = body.tool_plan
        return {"messages": body.conversation(), "tools": plan.tools if plan else None}

    def payload(self, body: SamplingRequest, ref: str, merge: Any) -> dict[str, Any]:
        """The replica's payload; a `required` or named tool_choice's schema is the rows' constraint."""
        payload = super().payload(body, ref, merge)
        assert isinstance(body, ChatCompletionRequest)
        constraint = body.tool_plan.constraint() if body.tool_plan else None
        return payload | ({"response_format": {"type": "json_schema", "schema": constraint}} if constraint else {})

    def choices(self, body: SamplingRequest, first: dict[str, Any]) -> Choices:
        assert isinstance(body, ChatCompletionRequest)
        plan = body.tool_plan
        tools = ToolReader(plan, first.get("tool_format")) if plan and plan.choice != "none" else None
        return Choices(body.n, chat=True, n=body.n, logprobs=body.logprobs_top is not None, tools=tools)

    def whole(self, request_id: str, model: str, choices: list[Choice], usage: UsageInfo) -> ChatCompletionResponse:
        whole = [c for c in choices if isinstance(c, ChatCompletionResponseChoice)]
        assert len(whole) == len(choices)
        return ChatCompletionResponse(id=request_id, created=int(time.time()), model=model, choices=whole, usage=usage)

    def chunk(
        self, request_id: str, model: str, choices: list[Choice], usage: UsageInfo | None = None
    ) -> ChatCompletionStreamResponse:
        deltas = [c for c in choices if isinstance(c, ChatCompletionResponseStreamChoice)]
        assert len(deltas) == len(choices)
        created = int(time.time())
        return ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=deltas, usage=usage)

    def opening(self, request_id: str, model: str, choices: Choices) -> list[WireModel]:
        """Each choice's first chunk: a delta with the assistant's role and empty content (no content with
        tools, as OpenAI opens a stream of calls: content stays null unless the model writes some)."""
        content = None if choices.tools else ""
        return [
            self.chunk(
                request_id,
                model,
                [
                    ChatCompletionResponseStreamChoice(
                        index=index,
                        delta=DeltaMessage(content=content, role="assistant"),
                        finish_reason=None,
                        logprobs=None,
                    )
                ],
            )
            for index in range(choices.count)
        ]
