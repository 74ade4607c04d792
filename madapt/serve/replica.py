"""`AdapterServer`, the model replica: one base model, adapters multiplexed on demand, one scheduler.

Each replica loads the base model once and any published adapter on demand through `@serve.multiplexed`
(LRU, `max_adapters_per_replica`), fetching verified tensors from the registry actor's hot copies in Ray's
object store. Requests run as rows of one mixed-adapter batch (`madapt.serve.scheduler`). An adapter that
fails to load is remembered as failed for `adapter_retry_s`: its requests get the same error without
re-reading the store. `generate` never raises: one bad request must not take the replica down. A request
still decoding after `deadline_s` is cancelled and answered 504; a full waiting queue answers 503 at once;
`check_health` fails when the decode loop is stuck (`madapt.serve.health`), and Serve replaces the replica.
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

from madapt.predict import BASE_ID
from madapt.serve.args import ServeArgs
from madapt.serve.batching import BASE_SLOT, UnsupportedAdapter, adapter_matrices
from madapt.serve.engine import Row
from madapt.serve.health import DecodeWatch
from madapt.serve.loading import load_engine
from madapt.serve.protocol import (
    ProtocolError,
    chat_prompt,
)
from madapt.serve.registry import get_registry
from madapt.serve.scheduler import ContinuousBatcher, QueueFull, StaticBatcher, with_deadline

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

    def __init__(self, server: "AdapterServer", ref: str, slot: int):
        self.server, self.ref, self.slot, self.live = server, ref, slot, True

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
        self.base, self.engine = load_engine(settings)
        type(self).base_loads += 1
        self.lora = self.engine.lora
        self.batcher: StaticBatcher | ContinuousBatcher
        if settings.scheduler == "continuous" and self.engine.continuous_ok:
            self.batcher = ContinuousBatcher(
                self.engine, settings.max_batch_size, settings.step_tokens, settings.max_waiting
            )
        else:  # asked for, or a model whose KV cache the continuous batch cannot splice (sliding windows)
            if settings.scheduler == "continuous":
                log.warning("%s: continuous batching unsupported for this cache; static batches", settings.base_model)
            self.batcher = StaticBatcher(
                self.engine, settings.max_batch_size, settings.batch_wait_ms / 1000, settings.max_waiting
            )
        self.watch = DecodeWatch(self.base.model, settings.stall_timeout_s)
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

    def check_health(self) -> None:
        """Serve's health check: fails while the decode loop is stuck, so Serve replaces this replica."""
        self.watch.check()

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
        try:
            events = self.batcher.submit(row)
        except QueueFull as error:
            self.metrics["requests"].inc(tags={"adapter": ref, "status": "503"})
            yield {"status": 503, "error": str(error)}
            return
        try:
            with self.watch.request():
                yield {"prompt_tokens": len(prompt_ids)}
                async with aclosing(with_deadline(events, self.settings.deadline_s)) as stream:
                    async for kind, value in stream:
                        if kind == "text":
                            yield {"text": value}
                        elif kind in ("error", "deadline"):
                            status, code = (500, None) if kind == "error" else (504, "deadline_exceeded")
                            self.metrics["requests"].inc(tags={"adapter": ref, "status": str(status)})
                            yield {"status": status, "error": value, "code": code}
                            return
        finally:
            row.cancelled = True  # a no-op once it ended; else it leaves the batch (or never joins it)
        self.metrics["requests"].inc(tags={"adapter": ref, "status": "200"})
        for kind, count in (("prompt", len(prompt_ids)), ("completion", len(row.ids))):
            if count:
                self.metrics["tokens"].inc(count, tags={"adapter": ref, "kind": kind})
        yield {"finish_reason": row.finish_reason, "completion_tokens": len(row.ids)}
