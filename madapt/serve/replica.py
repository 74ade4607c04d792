"""`AdapterServer`, the model replica: one base model, adapters multiplexed on demand, one scheduler.

Each replica loads the base model once and any published adapter on demand through `@serve.multiplexed`
(LRU, `max_adapters_per_replica`), fetching verified tensors from the registry actor's hot copies in Ray's
object store. Requests run as rows of one mixed-adapter batch (`madapt.serve.scheduler`). An adapter that
fails to load is remembered as failed for `adapter_retry_s`: its requests get the same error without
re-reading the store. `generate` never raises: one bad request must not take the replica down.
"""

import asyncio
import logging
import os
import time
from collections import Counter as Tally
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import torch
from ray import serve
from ray.exceptions import ObjectLostError, RayActorError
from ray.serve.metrics import Counter, Histogram

from madapt.lowrank import LowRankError
from madapt.models import load_base
from madapt.predict import BASE_ID
from madapt.serve.args import ServeArgs
from madapt.serve.batching import BASE_SLOT, MultiLora, UnsupportedAdapter, adapter_matrices
from madapt.serve.constrain import TEXT, GrammarError, Grammars, RowGrammar, read_response_format
from madapt.serve.engine import Engine, Row
from madapt.serve.merges import MergeCache, Recipe, Source
from madapt.serve.protocol import (
    ProtocolError,
    chat_prompt,
)
from madapt.serve.registry import get_registry
from madapt.serve.scheduler import ContinuousBatcher, StaticBatcher

log = logging.getLogger(__name__)


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

    def __init__(self, server: "AdapterServer", ref: str, slot: int, response_format: dict[str, Any] | None = None):
        self.server, self.ref, self.slot, self.live = server, ref, slot, True
        self.response_format = response_format
        """The constraint its requests get when they name none (from its manifest), or None."""

    def __del__(self) -> None:
        if self.live:  # Serve calls this on eviction, the garbage collector again later
            self.live = False
            self.server.lora.unload(self.ref)
            self.server.metrics["cache"].inc(tags={"event": "evict"})


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
        self.grammars = Grammars(self.base.tokenizer)
        self.batcher: StaticBatcher | ContinuousBatcher
        if settings.scheduler == "continuous" and self.engine.continuous_ok:
            self.batcher = ContinuousBatcher(self.engine, settings.max_batch_size, settings.step_tokens)
        else:  # asked for, or a model whose KV cache the continuous batch cannot splice (sliding windows)
            if settings.scheduler == "continuous":
                log.warning("%s: continuous batching unsupported for this cache; static batches", settings.base_model)
            self.batcher = StaticBatcher(self.engine, settings.max_batch_size, settings.batch_wait_ms / 1000)
        self.registry = get_registry(settings.store, detached=settings.registry_detached)
        self.failed = FailedLoads(settings.adapter_retry_s)
        self.merges = MergeCache(self.lora, settings.max_cached_merges, self._source)
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
            default = read_response_format(found.get("response_format"), f"{found['ref']}'s default response_format")
            matrices = adapter_matrices(found["ref"], config, tensors)
            slot = await asyncio.to_thread(self.lora.load, matrices)
        except (UnsupportedAdapter, GrammarError) as error:
            raise AdapterLoadError(422, str(error)) from None
        self.metrics["load_ms"].observe((time.perf_counter() - start) * 1000, tags={"source": found["source"]})
        self.metrics["cache"].inc(tags={"event": "load"})
        return LoadedAdapter(self, ref, slot, default)

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

    async def _source(self, ref: str) -> Source:
        """A merge source's (adapter_config, tensors), verified, from the registry's hot copies."""
        return (await self._fetch(ref))[1]

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
            held, default = await self._acquire(ref, request.get("merge"))
        except AdapterLoadError as error:
            self.metrics["requests"].inc(tags={"adapter": ref, "status": str(error.status)})
            yield {"status": error.status, "error": str(error)}
            return
        try:
            generation = self._generate(ref, held, request, default)
            async with aclosing(generation) as events:  # closed at once on a disconnect
                async for event in events:
                    yield event
        except Exception as error:
            log.exception("request for %s failed", ref)
            yield {"status": 500, "error": f"generation with {ref!r} failed: {type(error).__name__}"}
        finally:
            self.lora.unpin([held])

    async def _merged(self, recipe: Recipe) -> int:
        try:
            return await self.merges.acquire(recipe)
        except AdapterLoadError:
            raise
        except (LowRankError, UnsupportedAdapter) as error:
            raise AdapterLoadError(422, f"these adapters cannot be merged exactly: {error}") from None
        except Exception as error:
            log.exception("merging %s failed", recipe)
            raise AdapterLoadError(500, f"merging {len(recipe)} adapters failed: {type(error).__name__}") from None

    async def _grammar(self, constraint: dict[str, Any] | None) -> RowGrammar | None:
        """The row's matcher for `constraint` (the request's, else the adapter's default), or None."""
        if constraint is None or constraint == TEXT:
            return None
        return await asyncio.to_thread(self.grammars.row, constraint)

    async def _acquire(self, ref: str, merge: Recipe | None = None) -> tuple[int, dict[str, Any] | None]:
        """The adapter's (or the per-request merge's) slot, pinned until the request ends (Serve may evict it
        meanwhile), and its default response_format (a merge has none)."""
        if merge:
            return await self._merged(tuple((source, float(weight)) for source, weight in merge)), None
        if ref == BASE_ID:
            self.lora.pin([BASE_SLOT])
            return BASE_SLOT, None
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
        return loaded.slot, loaded.response_format

    async def _generate(
        self, ref: str, slot: int, request: dict[str, Any], default_format: dict[str, Any] | None
    ) -> AsyncGenerator[dict[str, Any]]:
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
        try:
            grammar = await self._grammar(request.get("response_format") or default_format)
        except GrammarError as error:
            self.metrics["requests"].inc(tags={"adapter": ref, "status": "400"})
            yield {"status": 400, "error": str(error), "code": "invalid_value", "param": "response_format"}
            return
        row = Row(
            prompt_ids=prompt_ids,
            slot=slot,
            max_tokens=max_tokens,
            temperature=request["temperature"],
            top_p=request["top_p"],
            stop=request["stop"],
            seed=request["seed"],
            grammar=grammar,
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
