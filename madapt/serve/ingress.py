"""`OpenAIIngress`: the OpenAI-compatible HTTP API in front of the `AdapterServer` replicas.

The ingress authenticates, bounds and parses each request, resolves `coding` to the version it serves
(labels, traffic splits, the newest: `madapt.releases`; `default` is the `active` adapter), fills in the
`generation` defaults the request does not set, and sets the resolved id on the handle, which lets Serve
route to replicas that already hold the adapter. Every error, Starlette's own included, answers in
OpenAI's shape; a replica that dies mid-request turns its in-flight requests into retryable 503s while
Serve replaces it.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` as a class, not a string.
import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable
from typing import Any

import pyarrow.fs as pafs
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from madapt.predict import BASE_ID
from madapt.releases import Resolution, Resolver
from madapt.serve.args import ACTIVE_ALIAS, ServeArgs, sampling_defaults
from madapt.serve.auth import UNAUTHORIZED, ApiKeys
from madapt.serve.choices import Choices
from madapt.serve.metrics import SECONDS
from madapt.serve.protocol import (
    MAX_MODEL_ID,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    SamplingRequest,
    check_model_id,
    completion,
    ignored_header,
    new_id,
    parse_request,
    response,
    sse,
    usage,
)
from madapt.serve.registry import error_status
from madapt.serve.request_merges import Recipe, recipe_id, requested_merge
from madapt.store import AdapterStore, Manifest, StoreError

log = logging.getLogger(__name__)
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
REPLICA_GONE = (RayActorError, BackPressureError, DeploymentUnavailableError)
READY_TIMEOUT_S = 5.0
"""What the handle raises when no replica can take or finish a request: the client should retry (503)."""

# The docs routes are the ingress's own (below), so that they need the API key when keys are on.
api = FastAPI(
    title="madapt",
    description="OpenAI-compatible multi-adapter LoRA serving.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@api.exception_handler(ProtocolError)
async def protocol_error(_: Request, error: ProtocolError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@api.exception_handler(HTTPException)
async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own answers (an unknown route, a wrong method) in OpenAI's error shape."""
    where = f"{request.method} {request.url.path[:200]}"
    if error.status_code == 404:
        refusal = ProtocolError(404, f"unknown URL: {where}", code="unknown_url")
    elif error.status_code == 405:
        refusal = ProtocolError(405, f"method not allowed: {where}", headers=error.headers)
    else:
        refusal = ProtocolError(error.status_code, str(error.detail), headers=error.headers)
    return await protocol_error(request, refusal)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first: dict[str, Any] = next(iter(error.errors()), {})
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    refusal = ProtocolError(
        400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param, code="invalid_value"
    )
    return await protocol_error(request, refusal)


@api.exception_handler(Exception)
async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """The last resort: a bug is a 500 in OpenAI's shape, naming only the exception's type."""
    log.error("%s %s failed", request.method, request.url.path[:200], exc_info=error)
    return await protocol_error(request, ProtocolError(500, f"internal server error ({type(error).__name__})"))


# Helpers the ingress calls come before it: `serve.ingress` builds a class that Ray pickles by value.


def _unavailable(ref: str, error: Exception) -> ProtocolError:
    """A request that lost its replica (killed, restarting, overloaded): safe to send again."""
    return ProtocolError(503, f"the replica serving {ref!r} became unavailable ({type(error).__name__}); retry")


async def _events(events: AsyncIterator[dict[str, Any]], ref: str) -> AsyncIterator[dict[str, Any]]:
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


async def _observed(
    events: AsyncIterator[dict[str, Any]], on_end: Callable[[dict[str, Any]], None]
) -> AsyncIterator[dict[str, Any]]:
    """`events` unchanged; `on_end` gets the last one when the stream ends, however it ends."""
    last: dict[str, Any] = {}
    try:
        async for event in events:
            last = event
            yield event
    finally:
        on_end(last)


async def _sse(
    events: AsyncIterator[dict[str, Any]],
    request_id: str,
    model: str,
    choices: Choices,
    *,
    include_usage: bool,
) -> AsyncIterator[str]:
    for index in range(choices.count if choices.chat else 0):
        opening = completion(request_id, model, "", None, None, chat=True, index=index)
        opening["choices"][0]["delta"]["role"] = "assistant"
        yield sse(opening)
    async for event in events:
        if "error" in event:
            yield sse(ProtocolError(event["status"], event["error"], code=event.get("code")).body())
            break
        if "usage" not in event:
            yield sse(response(request_id, model, [choices.chunk(event)], None, chat=choices.chat))
        elif include_usage:
            last = response(request_id, model, [], None, chat=choices.chat)
            last["usage"] = usage(**event["usage"])
            yield sse(last)
    yield sse("[DONE]")


_skipped: set[str] = set()


def _skip(entry: str, error: Exception) -> None:
    """Log a store entry that cannot be listed, once per process."""
    if entry not in _skipped and len(_skipped) < 1024:
        _skipped.add(entry)
        log.warning("/v1/models: skipping store entry %s: %s", entry[:200], error)


def _readable_manifests(store: AdapterStore) -> list[Manifest]:
    """Every manifest the store can read. An entry that fails to read (a stray directory such as
    lost+found, a corrupt manifest) is skipped and logged: it must not hide the others, nor make the
    listing a 500. The store's own listing first; entry by entry if that fails."""
    try:
        return store.list()
    except Exception as error:
        _skip("(the whole listing)", error)
    manifests: list[Manifest] = []
    for entry in store.fs.get_file_info(pafs.FileSelector(store.root, allow_not_found=True)):
        name = entry.base_name
        if entry.type != pafs.FileType.Directory or name.startswith("."):
            continue
        try:
            versions = store.versions(name)
        except Exception as error:
            _skip(name, error)
            continue
        for version in versions:
            try:
                manifests.append(store.manifest(f"{name}@{version}"))
            except Exception as error:
                _skip(f"{name}@{version}", error)
    return sorted(manifests, key=lambda m: (m.name, m.version))


def _check_requested(value: str) -> str:
    """`check_model_id`, letting a label (`coding@prod`) stand after the '@' where it expects a version; the
    label itself is validated by the resolver."""
    name, at, suffix = value.partition("@")
    is_label = at and suffix != "latest" and not suffix.isdigit() and suffix.isascii() and suffix.isprintable()
    check_model_id(value if not is_label or len(value) > MAX_MODEL_ID else name)
    return value


def _user(body: SamplingRequest) -> str | None:
    """The OpenAI `user` field, which makes a traffic split sticky (a string; anything else is ignored)."""
    user = getattr(body, "user", None)
    return user[:256] if isinstance(user, str) and user else None


def _store_refusal(error: StoreError) -> ProtocolError:
    status = error_status(error)
    code = {404: "model_not_found", 400: "invalid_value"}.get(status)
    return ProtocolError(status, str(error), param="model", code=code)


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, server: DeploymentHandle, args: dict[str, Any]):
        self.server = server
        self.settings = ServeArgs.model_validate(args)
        self.defaults = sampling_defaults(self.settings)
        self.store = AdapterStore(self.settings.store)
        self.resolver = Resolver(self.store, ttl_s=self.settings.resolve_ttl_s)
        self.keys = ApiKeys.load(self.settings.api_keys_file, self.settings.api_keys_env)
        self.arms: Tally[tuple[str, str, str]] = Tally()  # (model, arm, status): requests per split arm
        self.arm_metrics = {  # tagged by split arm: at most MAX_ARMS per split (madapt.releases)
            "requests": Counter(
                "madapt_split_requests", "Requests per traffic-split arm.", tag_keys=("model", "arm", "status")
            ),
            "tokens": Counter(
                "madapt_split_tokens", "Tokens per traffic-split arm.", tag_keys=("model", "arm", "kind")
            ),
            "latency_s": Histogram(
                "madapt_split_latency_seconds",
                "Request latency per traffic-split arm (until the last token).",
                boundaries=SECONDS,
                tag_keys=("model", "arm"),
            ),
        }

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """The ingress is up (it says nothing of the model replicas: that is /readyz)."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        """A model replica answers within READY_TIMEOUT_S: what a load balancer should route by."""
        try:
            await asyncio.wait_for(self.server.stats.remote(), timeout=READY_TIMEOUT_S)
        except (*REPLICA_GONE, TimeoutError) as error:
            raise ProtocolError(503, f"no model replica answered: {type(error).__name__}", code="not_ready") from None
        return {"status": "ready"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """Base and every adapter: what `NAME` serves (`version`), its `versions`, `aliases` and `split`.
        Cached for `resolve_ttl_s`; each version's manifest is read once."""
        self._authorize(request)
        try:
            cards = await asyncio.to_thread(self.resolver.cards, _skip)
        except Exception as error:  # the store itself cannot be listed (unreachable bucket, ...)
            log.exception("listing the adapter store failed")
            raise ProtocolError(503, f"the adapter store could not be listed ({type(error).__name__})") from None
        if self.settings.active is not None:
            try:
                default = [await asyncio.to_thread(self._default_card)]
            except StoreError as error:  # the active adapter is not published (yet)
                _skip(ACTIVE_ALIAS, error)
                default = []
            cards = [*default, *(card for card in cards if card["id"] != ACTIVE_ALIAS)]
        return {"object": "list", "data": [self._base_card(), *cards]}

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model: `base`, an adapter (what `NAME` serves) or `NAME@VERSION`, `NAME@LABEL`, `NAME@latest`."""
        self._authorize(request)
        if model_id == BASE_ID:
            return self._base_card()
        _check_requested(model_id)
        try:
            if model_id == ACTIVE_ALIAS and self.settings.active is not None:
                return await asyncio.to_thread(self._default_card)
            return await asyncio.to_thread(self.resolver.card, model_id)
        except StoreError as error:
            raise _store_refusal(error) from None

    def _base_card(self) -> dict[str, Any]:
        return {"id": BASE_ID, "object": "model", "created": 0, "owned_by": "madapt", "root": self.settings.base_model}

    def _default_card(self) -> dict[str, Any]:
        """`default`: the active adapter's card under that id, with `active` naming the adapter."""
        active = self.settings.active
        assert active is not None
        card = self._base_card() if active == BASE_ID else self.resolver.card(active)
        return {**card, "id": ACTIVE_ALIAS, "active": active}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._authorize(request)
        schema = request.scope.get("root_path", "") + "/openapi.json"
        return get_swagger_ui_html(openapi_url=schema, title="madapt API")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        self._authorize(request)
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="madapt API")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, await self._admit(request, CompletionRequest), chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, await self._admit(request, ChatCompletionRequest), chat=True)

    async def _serve(self, http: Request, body: SamplingRequest, *, chat: bool) -> Response:
        """The answer, or the error, with the request's ignored fields named in a header."""
        ignored = ignored_header(body.ignored_fields())
        try:
            return await self._answer(http, body, ignored, chat=chat)
        except ProtocolError as error:
            error.headers.update(ignored)
            raise

    def _authorize(self, http: Request) -> None:
        if self.keys is not None and not self.keys.allows(http.headers.get("authorization")):
            raise ProtocolError(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    async def _admit(self, http: Request, kind: type[SamplingRequest]) -> SamplingRequest:
        """Authenticate, then read at most `max_request_bytes`, then parse and apply this server's limits."""
        self._authorize(http)
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
        request = parse_request(kind, bytes(body), default_model=unnamed)
        asked, field = request.new_tokens, request.new_tokens_field
        if asked is not None and asked > self.settings.max_tokens:
            raise ProtocolError(
                400,
                f"{field} {asked} is above this server's limit of {self.settings.max_tokens}",
                param=field,
                code="invalid_value",
            )
        return request

    async def _answer(self, http: Request, body: SamplingRequest, headers: dict[str, str], *, chat: bool) -> Response:
        requested = http.headers.get(MULTIPLEX_HEADER) or body.model
        started = time.perf_counter()
        merge = await self._resolve_merge(requested, body)
        resolution = Resolution(recipe_id(merge)) if merge else await self._resolve(requested, _user(body))
        ref, arm = resolution.ref, resolution.arm
        headers = {**headers, "X-Madapt-Adapter": ref}

        def count(status: str, last: dict[str, Any] | None = None, prompt_tokens: int = 0) -> None:
            if arm is not None:
                self._count_arm(requested, arm, status, started, last, prompt_tokens)

        prompts = body.prompts if isinstance(body, CompletionRequest) else None  # the routes: chat iff a chat body
        payload = {
            "adapter": "merge" if merge else ref,  # a merge's recipe is in "merge" (and the response header)
            "merge": merge,
            "prompts": prompts,
            "messages": body.conversation() if isinstance(body, ChatCompletionRequest) else None,
            **body.sampling(),  # max_tokens None (chat only): what fits the context, up to the server's limit
            **body.model_dump(include={"response_format"}),
        }
        said = body.model_fields_set | ({"max_tokens"} if "max_completion_tokens" in body.model_fields_set else set())
        payload |= {key: value for key, value in self.defaults.items() if key not in said}  # the config's generation
        echo = prompts if isinstance(body, CompletionRequest) and body.echo else None
        count_choices = len(prompts or [""]) * body.n
        choices = Choices(count_choices, chat=chat, n=body.n, echo=echo, logprobs=body.logprobs_top is not None)
        routing = {} if ref == BASE_ID or merge else {"multiplexed_model_id": ref}  # the base: on every replica
        handle = self.server.options(stream=True, **routing)
        events = _events(handle.generate.remote(payload), ref)
        first = await events.__anext__()
        if "error" in first:
            status = first["status"]
            count(str(status))
            about_model = status in (404, 409, 422)
            code = first.get("code") or ("model_not_found" if status == 404 else None)
            param = first.get("param") or ("model" if about_model else None)
            raise ProtocolError(status, first["error"], param=param, code=code)
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            if arm is not None:
                events = _observed(events, lambda last: count(_status(last), last, first["prompt_tokens"]))
            stream = _sse(events, request_id, requested, choices, include_usage=include_usage)
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
        answer = response(request_id, requested, choices.whole(), usage(**last["usage"]), chat=chat)
        return JSONResponse(answer, headers=headers)

    async def _resolve(self, requested: str, user: str | None = None) -> Resolution:
        """The ref serving `requested` by the rule in madapt.releases ('base' stays; 'coding' is a split arm,
        the `prod` label's version or the newest; 'coding@prod' a label; 'coding@3' that version, 404 once
        deleted, even while a replica still holds it; 'default' the `active` adapter). Cached for
        `resolve_ttl_s`: no store round trip in the steady state. Unknown ids are 404, malformed ones 400."""
        if requested == ACTIVE_ALIAS and self.settings.active is not None:
            requested = self.settings.active
        if requested == BASE_ID:
            return Resolution(BASE_ID)
        _check_requested(requested)
        try:
            if self.resolver.fresh(requested):
                return self.resolver.resolve(requested, user)
            return await asyncio.to_thread(self.resolver.resolve, requested, user)
        except StoreError as error:
            raise _store_refusal(error) from None

    async def _resolve_merge(self, requested: str, body: SamplingRequest) -> Recipe | None:
        """The recipe of a per-request merge (`madapt.serve.request_merges`): each source resolved as a `model` is,
        sorted with its weight; None when the request names one adapter plainly."""
        asked = requested_merge(requested, body.adapters, self.settings.max_merge_sources)
        if asked is None:
            return None
        recipe = []
        for name, weight in asked:
            ref = (await self._resolve(name, _user(body))).ref
            if ref == BASE_ID:
                raise ProtocolError(400, "a merge cannot include 'base': it has no adapter", param="model")
            recipe.append((ref, weight))
        return tuple(sorted(recipe))

    def _count_arm(
        self, model: str, arm: str, status: str, started: float, last: dict[str, Any] | None, prompt_tokens: int
    ) -> None:
        """Per-arm metrics of a request a traffic split routed: status, tokens, latency."""
        self.arms[(model, arm, status)] += 1
        self.arm_metrics["requests"].inc(tags={"model": model, "arm": arm, "status": status})
        if status != "200" or last is None:
            return
        self.arm_metrics["latency_s"].observe(time.perf_counter() - started, tags={"model": model, "arm": arm})
        for kind, tokens in (("prompt", prompt_tokens), ("completion", last["usage"]["completion_tokens"])):
            if tokens:
                self.arm_metrics["tokens"].inc(tokens, tags={"model": model, "arm": arm, "kind": kind})

    def split_stats(self) -> dict[str, int]:
        """Requests per split arm and status seen by this ingress replica, as 'model|arm|status' -> count."""
        return {"|".join(key): n for key, n in sorted(self.arms.items())}
