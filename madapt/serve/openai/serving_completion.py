"""`/v1/completions`, as vLLM's `serving_completion.py`: raw prompts (a text or a list of texts, `n` choices
each, `echo`), answered as `text_completion` objects."""

from __future__ import annotations

import time
from typing import Any

from madapt.serve.openai.choices import Choice, Choices
from madapt.serve.openai.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    SamplingRequest,
    UsageInfo,
)
from madapt.serve.openai.serving import OpenAIServing


def _completion_choices(choices: list[Choice]) -> list[CompletionResponseChoice]:
    texts = [c for c in choices if isinstance(c, CompletionResponseChoice)]
    assert len(texts) == len(choices)
    return texts


class OpenAIServingCompletion(OpenAIServing):
    kind = CompletionRequest
    id_prefix = "cmpl"

    def prompts(self, body: SamplingRequest) -> dict[str, Any]:
        assert isinstance(body, CompletionRequest)
        return {"prompts": body.prompts}

    def choices(self, body: SamplingRequest, first: dict[str, Any]) -> Choices:
        assert isinstance(body, CompletionRequest)
        echo = body.prompts if body.echo else None
        count = len(body.prompts) * body.n
        return Choices(count, chat=False, n=body.n, echo=echo, logprobs=body.logprobs_top is not None)

    def whole(self, request_id: str, model: str, choices: list[Choice], usage: UsageInfo) -> CompletionResponse:
        return self.chunk(request_id, model, choices, usage)

    def chunk(
        self, request_id: str, model: str, choices: list[Choice], usage: UsageInfo | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=request_id, created=int(time.time()), model=model, choices=_completion_choices(choices), usage=usage
        )
