"""`OpenAIServing`: what the completions and chat completions endpoints share, as vLLM's `serving_engine.py`:
admission (the body read within `max_request_bytes`, parsed, held to this server's limits), the resolved
adapter, the replica's events turned into a whole response or an SSE stream, and the split metrics.

The endpoints (`serving_completion`, `serving_chat`) say what differs: the request model, the replica's
payload, the response models. A replica that dies mid-request turns its in-flight requests into
retryable 503s while Serve replaces it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from madapt.predict import BASE_ID
from madapt.serve.args import ACTIVE_ALIAS, ServeArgs
from madapt.serve.metrics import SplitMetrics
from madapt.serve.openai.choices import Choice, Choices
from madapt.serve.openai.errors import ProtocolError
from madapt.serve.openai.parsing import ignored_header, parse_request
from madapt.serve.openai.protocol import SamplingRequest, UsageInfo, WireModel
from madapt.serve.openai.serving_models import OpenAIServingModels, _user
from madapt.serve.request_merges import recipe_id
from madapt.store.releases import Resolution

MULTIPLEX_HEADER = "serve_multiplexed_model_id"
REPLICA_GONE = (RayActorError, BackPressureError, DeploymentUnavailableError)
"""What the handle raises when no replica can take or finish a request: the client should retry (503)."""

Events = AsyncIterator[dict[str, Any]]


def _unavailable(ref: str, error: Exception) -> ProtocolError:
    """A request that lost its replica (killed, restarting, overloaded): safe to send again."""
    return ProtocolError(503, f"the replica serving {ref!r} became unavailable ({type(error).__name__}); retry")


async def _events(events: Events, ref: str) -> Events:
    """The replica's events, with a lost replica turned into one 503 error event."""
    try:
        async for event in events:
            yield event
    except REPLICA_GONE as error:
        gone = _unavailable(ref, error)
        yield {"status": gone.status, "error": gone.message}


def _status(last: dict[str, Any]) -> str:
    """A finished stream's status from its last event: 200, the error's status, or 499 (client went away)."""
    return "200" if "usage" in last else str(last.get("status", 499))


async def _observed(events: Events, on_end: Callable[[dict[str, Any]], None]) -> Events:
    """`events` unchanged; `on_end` gets the last one when the stream ends, however it ends."""
    last: dict[str, Any] = {}
    try:
        async for event in events:
            last = event
            yield event
    finally:
        on_end(last)


def sse(data: WireModel | dict[str, Any] | str) -> str:
    """One server-sent event of `data` (a response model, an error body or `[DONE]`)."""
    body = data.model_dump() if isinstance(data, WireModel) else data
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class OpenAIServing:
    """One endpoint: its request model (`kind`), response ids (`id_prefix`), payload and response models."""

    kind: ClassVar[type[SamplingRequest]]
    id_prefix: ClassVar[str]

    def __init__(
        self,
        server: DeploymentHandle,
        settings: ServeArgs,
        defaults: dict[str, Any],
        models: OpenAIServingModels,
        splits: SplitMetrics,
    ):
        self.server, self.settings, self.defaults, self.models, self.splits = server, settings, defaults, models, splits

    # -- what each endpoint says ------------------------------------------------------------------------

    def prompts(self, body: SamplingRequest) -> dict[str, Any]:
        """The request's input in the replica's payload (`prompts` or `messages`)."""
        raise NotImplementedError

    def choices(self, body: SamplingRequest, first: dict[str, Any]) -> Choices:
        """How the request's choices are built; `first` is the replica's first event ({'prompt_tokens', ...})."""
        raise NotImplementedError

    def whole(self, request_id: str, model: str, choices: list[Choice], usage: UsageInfo) -> WireModel:
        raise NotImplementedError

    def chunk(self, request_id: str, model: str, choices: list[Choice], usage: UsageInfo | None = None) -> WireModel:
        raise NotImplementedError

    def opening(self, request_id: str, model: str, choices: Choices) -> list[WireModel]:
        """Chunks a stream starts with, before the replica's first event."""
        return []

    # -- shared ---------------------------------------------------------------------------------------------

    async def create(self, http: Request) -> Response:
        """The answer, or the error, with the request's ignored fields named in a header."""
        body = await self.admit(http)
        ignored = ignored_header(body.ignored_fields())
        try:
            return await self.answer(http, body, ignored)
        except ProtocolError as error:
            error.headers.update(ignored)
            raise

    async def admit(self, http: Request) -> SamplingRequest:
        """Read at most `max_request_bytes`, then parse and apply this server's limits."""
        limit = self.settings.max_request_bytes
        too_large = ProtocolError(413, f"request body is larger than this server's limit of {limit} bytes")
        declared = http.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise too_large
        body = bytearray()
        async for chunk in http.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        unnamed = ACTIVE_ALIAS if self.settings.active_for_unnamed else None
        request = parse_request(self.kind, bytes(body), default_model=unnamed)
        asked, field = request.new_tokens, request.new_tokens_field
        if asked is not None and asked > self.settings.max_tokens:
            raise ProtocolError(
                400,
                f"{field} {asked} is above this server's limit of {self.settings.max_tokens}",
                param=field,
                code="invalid_value",
            )
        return request

    def payload(self, body: SamplingRequest, ref: str, merge: Any) -> dict[str, Any]:
        """What the replica's `generate` takes: the adapter (or merge), the input, the sampling settings,
        with the config's `generation` defaults for what the request does not set."""
        payload = {
            "adapter": "merge" if merge else ref,  # a merge's recipe is in "merge" (and the response header)
            "merge": merge,
            "prompts": None,
            "messages": None,
            **self.prompts(body),
            **body.sampling(),  # max_tokens None (chat only): what fits the context, up to the server's limit
            **body.model_dump(include={"response_format"}),
        }
        said = body.model_fields_set | ({"max_tokens"} if "max_completion_tokens" in body.model_fields_set else set())
        return payload | {key: value for key, value in self.defaults.items() if key not in said}

    async def answer(self, http: Request, body: SamplingRequest, headers: dict[str, str]) -> Response:
        requested = http.headers.get(MULTIPLEX_HEADER) or body.model
        started = time.perf_counter()
        merge = await self.models.resolve_merge(requested, body)
        resolution = Resolution(recipe_id(merge)) if merge else await self.models.resolve(requested, _user(body))
        ref, arm = resolution.ref, resolution.arm
        headers = {**headers, "X-Madapt-Adapter": ref}

        def count(status: str, last: dict[str, Any] | None = None, prompt_tokens: int = 0) -> None:
            if arm is not None:
                self.splits.count(requested, arm, status, started, last, prompt_tokens)

        routing = {} if ref == BASE_ID or merge else {"multiplexed_model_id": ref}  # the base: on every replica
        handle = self.server.options(stream=True, **routing)
        events = _events(handle.generate.remote(self.payload(body, ref, merge)), ref)
        first = await events.__anext__()
        if "error" in first:
            status = first["status"]
            count(str(status))
            about_model = status in (404, 409, 422)
            code = first.get("code") or ("model_not_found" if status == 404 else None)
            param = first.get("param") or ("model" if about_model else None)
            raise ProtocolError(status, first["error"], param=param, code=code)
        request_id, choices = new_id(self.id_prefix), self.choices(body, first)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            if arm is not None:
                events = _observed(events, lambda last: count(_status(last), last, first["prompt_tokens"]))
            stream = self._sse(events, request_id, requested, choices, include_usage=include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        last = first
        async for event in events:
            if "error" in event:
                count(str(event["status"]))
                raise ProtocolError(event["status"], event["error"], code=event.get("code"))
            if "usage" in event:
                last = event
            else:
                choices.add(event)
        count("200", last, first["prompt_tokens"])
        answer = self.whole(request_id, requested, choices.whole(), UsageInfo.of(**last["usage"]))
        return JSONResponse(answer.model_dump(), headers=headers)

    async def _sse(
        self, events: Events, request_id: str, model: str, choices: Choices, *, include_usage: bool
    ) -> AsyncIterator[str]:
        for opening in self.opening(request_id, model, choices):
            yield sse(opening)
        async for event in events:
            if "error" in event:
                yield sse(ProtocolError(event["status"], event["error"], code=event.get("code")).body())
                break
            if "usage" not in event:
                for piece in choices.chunks(event):
                    yield sse(self.chunk(request_id, model, [piece]))
            elif include_usage:
                yield sse(self.chunk(request_id, model, [], UsageInfo.of(**event["usage"])))
        yield sse("[DONE]")
