"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of `AdapterServer` replicas.

Each `AdapterServer` replica loads the base model once and any published adapter on demand through
`@serve.multiplexed` (LRU, `max_adapters_per_replica`), fetching verified tensors from the registry
actor's hot copies in Ray's object store. Requests that arrive together run as one mixed-adapter batch.
The ingress validates input, resolves `coding` to the latest `coding@N` (so versions published later are
served without a restart) and sets that id on the handle, which lets Serve route to replicas that
already hold the adapter.

`import_path: madapt.serve.app:build_app` with `args:` (see `ServeArgs`) works with `serve run` and
`serve deploy`; `run_config` starts the same config in-process for `madapt serve` and the demo.

Failures stay contained: a bad request is a 4xx naming the problem, an adapter that fails to load is
remembered as failed for `adapter_retry_s` (its requests get the same error without re-reading the
store), and a replica that dies mid-request turns its in-flight requests into retryable 503s while Serve
replaces it. Optional API keys, a body-size and a `max_tokens` limit guard the HTTP API.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` as a class, not a string.
import asyncio
import contextlib
import logging
import os
import time
from collections import Counter as Tally
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, Literal, TypeAlias

import pyarrow.fs as pafs
import torch
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import ObjectLostError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from madapt.config import StorageConfig
from madapt.models import load_base
from madapt.predict import BASE_ID
from madapt.releases import Resolution, Resolver
from madapt.serve.auth import UNAUTHORIZED, ApiKeys, read_keys
from madapt.serve.batching import BASE_SLOT, MultiLora, UnsupportedAdapter, adapter_matrices
from madapt.serve.engine import Engine, Row
from madapt.serve.protocol import (
    MAX_MODEL_ID,
    MAX_TOKENS_LIMIT,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    SamplingRequest,
    chat_prompt,
    check_model_id,
    completion,
    ignored_header,
    new_id,
    parse_request,
    sse,
    usage,
)
from madapt.serve.registry import error_status, get_registry
from madapt.serve.scheduler import ContinuousBatcher, row_events
from madapt.store import AdapterStore, Manifest, StoreError, storage_runtime_env

log = logging.getLogger(__name__)
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
REPLICA_GONE = (RayActorError, BackPressureError, DeploymentUnavailableError)
READY_TIMEOUT_S = 5.0
"""What the handle raises when no replica can take or finish a request: the client should retry (503)."""
Events: TypeAlias = asyncio.Queue[tuple[str, Any]]
"""One request's events from the decode thread: ('text', delta)..., then ('done', None) or ('error', message)."""


class ServeArgs(BaseModel):
    """The `args:` of a serve config: what every replica needs to build its engine."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field("smollm2-135m", description="Embedded name, local directory or HF id.")
    store: str = Field(default_factory=lambda: StorageConfig().uri, description="Adapter store URI.")
    max_adapters_per_replica: int = Field(8, ge=1, description="Multiplexing LRU size per replica.")
    max_batch_size: int = Field(32, ge=1, description="Rows decoded together in one mixed-adapter batch.")
    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: requests join and leave the running batch at every decode step; "
        "static: a batch collected for batch_wait_ms is decoded to its end.",
    )
    step_tokens: int = Field(
        512, ge=1, description="continuous: tokens one step may spend (1 per running row + admitted prompts)."
    )
    batch_wait_ms: float = Field(10.0, ge=0, description="static: how long a batch waits for more requests.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = Field(None, description="Default: cuda when available, else cpu.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch in each replica.")
    registry_detached: bool = Field(True, description="Keep hot adapter copies after the app is deleted.")
    adapter_retry_s: float = Field(30.0, ge=0, description="How long a failed adapter load is remembered.")
    resolve_ttl_s: float = Field(
        2.0, ge=0, description="How long the ingress caches name resolution (labels, splits) and /v1/models."
    )
    max_tokens: int = Field(512, ge=1, le=MAX_TOKENS_LIMIT, description="The largest max_tokens a request may ask.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies are refused (413).")
    api_keys_file: str | None = Field(None, description="API keys, one per line; turns authentication on.")
    api_keys_env: str | None = Field(None, description="Env var of comma-separated API keys; turns authentication on.")


class AdapterLoadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class FailedLoads:
    """Adapters whose load failed, remembered for `retry_s`: their requests get the same error at once
    instead of re-reading (and re-verifying) the store each time; after `retry_s` the next request tries
    again, so a repaired store heals without a restart."""

    def __init__(self, retry_s: float):
        self.retry_s = retry_s
        self.until: dict[str, tuple[float, AdapterLoadError]] = {}

    def check(self, ref: str) -> None:
        until, error = self.until.get(ref, (0.0, None))
        left = until - time.monotonic()
        if error is not None and left > 0:
            raise AdapterLoadError(error.status, f"{error} (load failed; tried again in {left:.0f} s)")

    def record(self, ref: str, error: AdapterLoadError) -> None:
        self.until[ref] = (time.monotonic() + self.retry_s, error)

    def clear(self, ref: str) -> None:
        self.until.pop(ref, None)


class LoadedAdapter:
    """What Serve's multiplexing caches per adapter; Serve calls `__del__` when it evicts it."""

    def __init__(self, server: "AdapterServer", ref: str, slot: int):
        self.server, self.ref, self.slot, self.live = server, ref, slot, True

    def __del__(self) -> None:
        if self.live:  # Serve calls this on eviction, the garbage collector again later
            self.live = False
            self.server.lora.unload(self.ref)
            self.server.metrics["cache"].inc(tags={"event": "evict"})


class Batcher:
    """Collects requests that arrive within `wait_s` (up to `max_size`) into one mixed-adapter batch and
    decodes it on a worker thread, so the replica's event loop keeps accepting and streaming."""

    def __init__(self, engine: Engine, max_size: int, wait_s: float):
        self.engine, self.max_size, self.wait_s = engine, max_size, wait_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="madapt-decode")
        self.queue: asyncio.Queue[tuple[Row, Events]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.largest = 0

    async def submit(self, row: Row) -> AsyncGenerator[tuple[str, Any]]:
        loop = asyncio.get_running_loop()
        queue = self.queue
        if queue is None:  # set together with `task`, by the first request
            queue = self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run(queue))
        events: Events = asyncio.Queue()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("text", text))

        row.on_text = on_text
        await queue.put((row, events))
        async with contextlib.aclosing(row_events(row, events)) as stream:  # closed with us: cancels the row
            async for event in stream:  # a cancelled row stops taking tokens; its batch runs on
                yield event

    async def _run(self, queue: asyncio.Queue[tuple[Row, Events]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_size:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            self.largest = max(self.largest, len(batch))
            outcome: tuple[str, str | None]
            try:
                await loop.run_in_executor(self.executor, self.engine.generate, [row for row, _ in batch])
                outcome = ("done", None)
            except Exception as error:
                log.exception("batch of %d failed", len(batch))
                outcome = ("error", f"generation failed: {type(error).__name__}: {error}")
            for row, events in batch:
                events.put_nowait(("error", row.error) if row.error else outcome)  # a row that failed alone


@serve.deployment(
    name="AdapterServer", max_ongoing_requests=64, health_check_period_s=2, ray_actor_options={"num_cpus": 1}
)
class AdapterServer:
    """One base model per replica; adapters multiplexed on demand; mixed-adapter batches."""

    base_loads = 0  # per replica process: the base must load exactly once however many adapters serve

    def __init__(self, args: dict[str, Any]):
        self.settings = settings = ServeArgs.model_validate(args)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.base = load_base(settings.base_model, dtype=getattr(torch, settings.dtype), device=device)
        type(self).base_loads += 1
        self.base.model.eval()
        self.lora = MultiLora(self.base.model, slots=settings.max_adapters_per_replica + 1)
        context = getattr(self.base.model.config, "max_position_embeddings", 2048)
        self.engine = Engine(self.lora, self.base.tokenizer, context_length=context)
        self.batcher: Batcher | ContinuousBatcher
        if settings.scheduler == "continuous" and self.engine.continuous_ok:
            self.batcher = ContinuousBatcher(self.engine, settings.max_batch_size, settings.step_tokens)
        else:  # asked for, or a model whose KV cache the continuous batch cannot splice (sliding windows)
            if settings.scheduler == "continuous":
                log.warning("%s: continuous batching unsupported for this cache; static batches", settings.base_model)
            self.batcher = Batcher(self.engine, settings.max_batch_size, settings.batch_wait_ms / 1000)
        self.registry = get_registry(settings.store, detached=settings.registry_detached)
        self.failed = FailedLoads(settings.adapter_retry_s)
        self.load_attempts: Tally[str] = Tally()
        self.get_adapter: Callable[[str], Awaitable[LoadedAdapter]] = serve.multiplexed(
            max_num_models_per_replica=settings.max_adapters_per_replica
        )(self._multiplexed_loader())
        self.metrics = {
            "requests": Counter("madapt_requests", "Requests per adapter.", tag_keys=("adapter", "status")),
            "tokens": Counter(
                "madapt_tokens", "Tokens per adapter (rate() gives tokens/s).", tag_keys=("adapter", "kind")
            ),
            "cache": Counter("madapt_adapter_cache", "Adapter cache hits, loads, evictions.", tag_keys=("event",)),
            "load_ms": Histogram(
                "madapt_adapter_load_ms",
                "Adapter load latency by source (store or object store).",
                boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000],
                tag_keys=("source",),
            ),
        }

    def _multiplexed_loader(self) -> Callable[[str], Awaitable[LoadedAdapter]]:
        async def load_adapter(ref: str) -> LoadedAdapter:  # a function, so Serve can keep its LRU on it
            return await self._load(ref)

        return load_adapter

    async def _load(self, ref: str) -> LoadedAdapter:
        start = time.perf_counter()
        self.load_attempts[ref] += 1
        found, (config, tensors) = await self._fetch(ref)
        try:
            matrices = adapter_matrices(found["ref"], config, tensors)
            slot = await asyncio.to_thread(self.lora.load, matrices)
        except UnsupportedAdapter as error:
            raise AdapterLoadError(422, str(error)) from None
        self.metrics["load_ms"].observe((time.perf_counter() - start) * 1000, tags={"source": found["source"]})
        self.metrics["cache"].inc(tags={"event": "load"})
        return LoadedAdapter(self, ref, slot)

    async def _fetch(self, ref: str) -> tuple[dict[str, Any], tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """The registry's answer and the adapter's (config, tensors). The registry holds only caches, so one
        that died (its process, or the replica that owned it) is replaced and asked again, once."""
        for attempt in range(2):
            try:
                found: dict[str, Any] = await self.registry.fetch.remote(ref, self.base.fingerprint)
                if "error" in found:
                    raise AdapterLoadError(found["status"], found["error"])
                return found, await found["object"][0]
            except (RayActorError, ObjectLostError):
                if attempt:
                    raise
                log.warning("the adapter registry is gone; starting a new one")
                self.registry = get_registry(self.settings.store, detached=self.settings.registry_detached)
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "base_loads": type(self).base_loads,
            "adapters": sorted(self.lora.by_ref),
            "largest_batch": self.batcher.largest,
            "load_attempts": dict(self.load_attempts),
        }

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream {'prompt_tokens'} then {'text'} deltas then {'finish_reason', 'completion_tokens'},
        or a single {'status', 'error'}. Never raises: one bad request must not take the replica down."""
        ref = request["adapter"]
        try:
            held = await self._acquire(ref)
        except AdapterLoadError as error:
            self.metrics["requests"].inc(tags={"adapter": ref, "status": str(error.status)})
            yield {"status": error.status, "error": str(error)}
            return
        try:
            async with aclosing(self._generate(ref, held, request)) as events:  # closed at once on a disconnect
                async for event in events:
                    yield event
        except Exception as error:
            log.exception("request for %s failed", ref)
            yield {"status": 500, "error": f"generation with {ref!r} failed: {type(error).__name__}"}
        finally:
            self.lora.unpin([held])

    async def _acquire(self, ref: str) -> int:
        """The adapter's slot, pinned until the request ends (Serve may evict it meanwhile)."""
        if ref == BASE_ID:
            self.lora.pin([BASE_SLOT])
            return BASE_SLOT
        self.failed.check(ref)
        self.metrics["cache"].inc(tags={"event": "hit" if self.lora.slot(ref) is not None else "miss"})
        try:
            loaded = await self.get_adapter(ref)
        except Exception as error:
            if not isinstance(error, AdapterLoadError):
                log.exception("loading %s failed", ref)
                error = AdapterLoadError(500, f"loading adapter {ref!r} failed: {type(error).__name__}")
            self.failed.record(ref, error)
            raise error from None
        self.failed.clear(ref)
        self.lora.pin([loaded.slot])
        return loaded.slot

    async def _generate(self, ref: str, slot: int, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
        tokenizer = self.base.tokenizer
        try:
            text = chat_prompt(tokenizer, request["messages"]) if request.get("messages") else request["prompt"]
        except ProtocolError as error:  # the chat template refused the messages
            self.metrics["requests"].inc(tags={"adapter": ref, "status": "400"})
            yield {"status": 400, "error": error.message, "code": error.code}
            return
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        room = self.engine.context_length - len(prompt_ids)
        max_tokens = request["max_tokens"]
        if max_tokens is None:  # a chat request without a budget: what fits the context, up to the server's limit
            max_tokens = min(self.settings.max_tokens, room)
            problem = f"prompt ({len(prompt_ids)} tokens) leaves no room for new tokens"
        else:
            problem = f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds"
        if max_tokens < 1 or max_tokens > room:
            self.metrics["requests"].inc(tags={"adapter": ref, "status": "400"})
            yield {
                "status": 400,
                "error": f"{problem} the context length of {self.engine.context_length} tokens",
                "code": "context_length_exceeded",
            }
            return
        row = Row(
            prompt_ids=prompt_ids,
            slot=slot,
            max_tokens=max_tokens,
            temperature=request["temperature"],
            top_p=request["top_p"],
            stop=request["stop"],
            seed=request["seed"],
        )
        yield {"prompt_tokens": len(prompt_ids)}
        async with aclosing(self.batcher.submit(row)) as events:  # closing it cancels the row
            async for kind, value in events:
                if kind == "text":
                    yield {"text": value}
                elif kind == "error":
                    self.metrics["requests"].inc(tags={"adapter": ref, "status": "500"})
                    yield {"status": 500, "error": value}
                    return
        self.metrics["requests"].inc(tags={"adapter": ref, "status": "200"})
        for kind, count in (("prompt", len(prompt_ids)), ("completion", len(row.ids))):
            if count:
                self.metrics["tokens"].inc(count, tags={"adapter": ref, "kind": kind})
        yield {"finish_reason": row.finish_reason, "completion_tokens": len(row.ids)}


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
    return "200" if "finish_reason" in last else str(last.get("status", 499))


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
    prompt_tokens: int,
    *,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    if chat:
        opening = completion(request_id, model, "", None, None, chat=True)
        opening["choices"][0]["delta"]["role"] = "assistant"
        yield sse(opening)
    async for event in events:
        if "error" in event:
            yield sse(ProtocolError(event["status"], event["error"], code=event.get("code")).body())
            break
        if "text" in event:
            yield sse(completion(request_id, model, event["text"], None, None, chat=chat))
        else:
            yield sse(completion(request_id, model, "", event["finish_reason"], None, chat=chat))
            if include_usage:
                last = completion(request_id, model, "", None, None, chat=chat)
                last["choices"], last["usage"] = [], usage(prompt_tokens, event["completion_tokens"])
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
            "latency_ms": Histogram(
                "madapt_split_latency_ms",
                "Request latency per traffic-split arm (until the last token).",
                boundaries=[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
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
        return {"object": "list", "data": [self._base_card(), *cards]}

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model: `base`, an adapter (what `NAME` serves) or `NAME@VERSION`, `NAME@LABEL`, `NAME@latest`."""
        self._authorize(request)
        if model_id == BASE_ID:
            return self._base_card()
        _check_requested(model_id)
        try:
            return await asyncio.to_thread(self.resolver.card, model_id)
        except StoreError as error:
            raise _store_refusal(error) from None

    def _base_card(self) -> dict[str, Any]:
        return {"id": BASE_ID, "object": "model", "created": 0, "owned_by": "madapt", "root": self.settings.base_model}

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
        request = parse_request(kind, bytes(body))
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
        resolution = await self._resolve(requested, _user(body))
        ref, arm = resolution.ref, resolution.arm
        headers = {**headers, "X-Madapt-Adapter": ref}

        def count(status: str, last: dict[str, Any] | None = None, prompt_tokens: int = 0) -> None:
            if arm is not None:
                self._count_arm(requested, arm, status, started, last, prompt_tokens)

        payload = {
            "adapter": ref,
            "prompt": body.prompt if isinstance(body, CompletionRequest) else None,  # the routes: chat iff a chat body
            "messages": body.conversation() if isinstance(body, ChatCompletionRequest) else None,
            "max_tokens": body.new_tokens,  # None (chat only): what fits the context, up to the server's limit
            **body.model_dump(include={"temperature", "top_p", "stop", "seed"}),
        }
        routing = {} if ref == BASE_ID else {"multiplexed_model_id": ref}  # the base is on every replica
        handle = self.server.options(stream=True, **routing)
        events = _events(handle.generate.remote(payload), ref)
        first = await events.__anext__()
        if "error" in first:
            status = first["status"]
            count(str(status))
            about_model = status in (404, 409, 422)
            code = first.get("code") or ("model_not_found" if status == 404 else None)
            raise ProtocolError(status, first["error"], param="model" if about_model else None, code=code)
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            if arm is not None:
                events = _observed(events, lambda last: count(_status(last), last, first["prompt_tokens"]))
            stream = _sse(events, request_id, requested, first["prompt_tokens"], chat=chat, include_usage=include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        parts, last = [], first
        async for event in events:
            if "error" in event:
                count(str(event["status"]))
                raise ProtocolError(event["status"], event["error"], code=event.get("code"))
            parts.append(event.get("text", ""))
            last = event
        count("200", last, first["prompt_tokens"])
        used = usage(first["prompt_tokens"], last["completion_tokens"])
        answer = completion(request_id, requested, "".join(parts), last["finish_reason"], used, chat=chat)
        return JSONResponse(answer, headers=headers)

    async def _resolve(self, requested: str, user: str | None = None) -> Resolution:
        """The ref serving `requested` by the rule in madapt.releases ('base' stays; 'coding' is a split arm,
        the `prod` label's version or the newest; 'coding@prod' a label; 'coding@3' that version, 404 once
        deleted, even while a replica still holds it). Cached for `resolve_ttl_s`: no store round trip in
        the steady state. Unknown ids are 404, malformed ones 400."""
        if requested == BASE_ID:
            return Resolution(BASE_ID)
        _check_requested(requested)
        try:
            if self.resolver.fresh(requested):
                return self.resolver.resolve(requested, user)
            return await asyncio.to_thread(self.resolver.resolve, requested, user)
        except StoreError as error:
            raise _store_refusal(error) from None

    def _count_arm(
        self, model: str, arm: str, status: str, started: float, last: dict[str, Any] | None, prompt_tokens: int
    ) -> None:
        """Per-arm metrics of a request a traffic split routed: status, tokens, latency."""
        self.arms[(model, arm, status)] += 1
        self.arm_metrics["requests"].inc(tags={"model": model, "arm": arm, "status": status})
        if status != "200" or last is None:
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.arm_metrics["latency_ms"].observe(elapsed_ms, tags={"model": model, "arm": arm})
        for kind, tokens in (("prompt", prompt_tokens), ("completion", last.get("completion_tokens", 0))):
            if tokens:
                self.arm_metrics["tokens"].inc(tokens, tags={"model": model, "arm": arm, "kind": kind})

    def split_stats(self) -> dict[str, int]:
        """Requests per split arm and status seen by this ingress replica, as 'model|arm|status' -> count."""
        return {"|".join(key): n for key, n in sorted(self.arms.items())}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for `import_path: madapt.serve.app:build_app`; `args` are `ServeArgs`."""
    try:
        settings = ServeArgs.model_validate(args or {})
    except ValidationError as error:
        raise ValueError(f"invalid serve args: {error}") from None
    return application(settings)


def application(settings: ServeArgs, *, replicas: int | None = None) -> serve.Application:
    """The ingress bound to `AdapterServer`; `replicas` fixes its replica count (else the deployment's own)."""
    plain = settings.model_dump()
    server: serve.Deployment = AdapterServer
    ingress: serve.Deployment = OpenAIIngress
    runtime_env = storage_runtime_env()  # both read the store; the registry actor inherits it from them
    if runtime_env:
        server, ingress = (
            d.options(ray_actor_options={**d.ray_actor_options, "runtime_env": runtime_env}) for d in (server, ingress)
        )
    if replicas:
        server = server.options(num_replicas=replicas)
    return ingress.bind(server.bind(plain), plain)


def run_config(path: str, *, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 600) -> str:
    """Deploy a serve config file on a local Ray (started if needed), as `serve run` does; return the URL.

    A relative `store` in the args is resolved against the current directory here, since the replicas'
    working directory is Ray's, not the caller's.
    """
    import ray
    import yaml
    from ray.serve._private import api as serve_api  # what `serve run CONFIG` calls; private, kept here only
    from ray.serve.schema import ServeDeploySchema

    with open(path) as handle:
        document = yaml.safe_load(handle)
    document["http_options"] = {**document.get("http_options", {}), "host": host, "port": port}
    for application in document.get("applications", []):
        args = application.setdefault("args", {})
        if "store" in args and "://" not in args["store"]:
            args["store"] = os.path.abspath(args["store"])
    schema = ServeDeploySchema.model_validate(document)
    if not ray.is_initialized():
        ray.init(namespace="serve", log_to_driver=False)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump())
    client.deploy_apps(schema, _blocking=False)
    url = f"http://{host}:{port}"
    wait_ready(url, timeout_s, api_key=probe_key(document))
    return url


def probe_key(document: dict[str, Any]) -> str | None:
    """A key the readiness probe can send when the config turns authentication on (as the replicas will
    see them: this process's environment is the local workers' environment)."""
    for application in document.get("applications", []):
        args = application.get("args", {})
        if args.get("api_keys_file") or args.get("api_keys_env"):
            return read_keys(args.get("api_keys_file"), args.get("api_keys_env"))[0]
    return None


def wait_ready(url: str, timeout_s: float, *, api_key: str | None = None) -> None:
    """Block until the ingress answers and a replica answers a one-token base request."""
    import json
    import urllib.error
    import urllib.request

    probe = json.dumps({"model": BASE_ID, "prompt": "hi", "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            request = urllib.request.Request(f"{url}/v1/completions", probe, headers)
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the serve application at {url} was not ready after {timeout_s:.0f} s")
        time.sleep(1)


def ask_all(
    config_path: str, adapters: list[str], prompts: list[str], *, port: int = 8000, max_tokens: int = 32
) -> dict[str, dict[str, str]]:
    """Start `config_path`, send each prompt to each adapter over HTTP (greedy chat), shut down.

    What `make demo` ends with: proof that the published adapters are servable end to end.
    Returns {prompt: {adapter: text}}.
    """
    import json
    import urllib.request

    url = run_config(config_path, port=port)
    answers: dict[str, dict[str, str]] = {}
    try:
        for prompt in prompts:
            for adapter in adapters:
                body: dict[str, Any] = {"model": adapter, "messages": [{"role": "user", "content": prompt}]}
                body |= {"max_tokens": max_tokens, "temperature": 0}
                request = urllib.request.Request(
                    f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=300) as response:
                    text = json.loads(response.read())["choices"][0]["message"]["content"]
                answers.setdefault(prompt, {})[adapter] = text
    finally:
        serve.shutdown()
    return answers
