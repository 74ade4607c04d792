"""`AdapterServer`, the model replica: one base model, adapters multiplexed on demand, one scheduler.

Each replica loads the base model once and any published adapter on demand through `@serve.multiplexed`,
fetching verified tensors from the registry actor's hot copies in Ray's object store, or from its own host
tier; which adapters stay is decided by bytes (`madapt.serve.adapter_tiers`: `max_adapter_memory`, an
optional count cap, `host_adapter_memory`), and an evicted id leaves Serve's table so routing follows.
Requests run as rows of one mixed-adapter batch (`madapt.serve.scheduler`). An adapter that fails to
load is remembered as failed for `adapter_retry_s`: its requests get the same error without re-reading the
store. `generate` never raises: one bad request must not take the replica down. A request
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

from madapt.compat.ray import forget_multiplexed, multiplexed_ids
from madapt.merge import MergeError
from madapt.predict import BASE_ID
from madapt.serve import sampling
from madapt.serve.adapter_cache import TooLarge
from madapt.serve.adapter_tiers import AdapterTiers, HostCopy, LoadedAdapter
from madapt.serve.args import ServeArgs
from madapt.serve.constrain import TEXT, GrammarError, Grammars, RowGrammar, read_response_format
from madapt.serve.engine import Row
from madapt.serve.health import DecodeWatch
from madapt.serve.loading import load_engine, memory_budget, smallest_adapter_bytes
from madapt.serve.metrics import BoundedLabels, replica_metrics
from madapt.serve.multilora import BASE_SLOT, served_adapter
from madapt.serve.openai.chat_template import chat_prompt, tool_format
from madapt.serve.openai.errors import ProtocolError
from madapt.serve.openai.protocol import SEED_RANGE
from madapt.serve.registry import get_registry
from madapt.serve.request_merges import MergeCache, Recipe, Source, recipe_id
from madapt.serve.scheduler import ContinuousBatcher, QueueFull, StaticBatcher, with_deadline
from madapt.serve.tuners import UnsupportedAdapter

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
        self.grammars = Grammars(self.base.tokenizer)
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
            max_num_models_per_replica=-1  # the tiers evict, by bytes and by the count cap
        )(self._multiplexed_loader())
        self.metrics = replica_metrics()
        floor = smallest_adapter_bytes(self.base.model)
        self.tiers = AdapterTiers(
            self.lora,
            device_budget=memory_budget("max_adapter_memory", settings.max_adapter_memory, self.lora.device, floor),
            host_budget=memory_budget("host_adapter_memory", settings.host_adapter_memory, "cpu", floor),
            max_adapters=settings.max_adapters_per_replica,
            fetch=self._fetch_served,
            forget=lambda ref: forget_multiplexed(self.get_adapter, ref),
            on_release=lambda: self.metrics["cache"].inc(tags={"event": "evict"}),
        )
        self.merges = MergeCache(self.lora, settings.max_cached_merges, self._source, self.tiers)
        self.labels = BoundedLabels()
        self.live: set[Row] = set()  # rows submitted and not ended: the queue-depth and running gauges
        self.gauges: asyncio.Task[None] | None = None

    def _multiplexed_loader(self) -> Callable[[str], Awaitable[LoadedAdapter]]:
        async def load_adapter(ref: str) -> LoadedAdapter:  # a function: Serve keeps its model table on it
            return await self._load(ref)

        return load_adapter

    async def _load(self, ref: str) -> LoadedAdapter:
        self.load_attempts[ref] += 1
        try:
            load = await self.tiers.load(ref)
        except (TooLarge, UnsupportedAdapter) as error:
            raise AdapterLoadError(422, str(error)) from None
        self.metrics["load_s"].observe(load.seconds, tags={"source": load.source})
        self.metrics["tier_load_s"].observe(load.seconds, tags={"tier": load.tier})
        self.metrics["tier_loads"].inc(tags={"tier": load.tier})
        self.metrics["cache"].inc(tags={"event": "load"})
        return load.loaded

    async def _fetch_served(self, ref: str) -> HostCopy:
        """`ref` through the registry, in the form a slot takes (gathered, or PEFT's own layers)."""
        found, (config, tensors) = await self._fetch(ref)
        try:
            default = read_response_format(found.get("response_format"), f"{found['ref']}'s default response_format")
            adapter = served_adapter(found["ref"], config, tensors)
        except (UnsupportedAdapter, GrammarError) as error:
            raise AdapterLoadError(422, str(error)) from None
        return HostCopy(found["ref"], adapter, default, found["source"])

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

    def check_health(self) -> None:
        """Serve's health check: fails while the decode loop is stuck, so Serve replaces this replica."""
        self.watch.check()

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "base_loads": type(self).base_loads,
            "adapters": sorted(self.lora.by_ref),
            "multiplexed": multiplexed_ids(self.get_adapter),  # Serve's table: what routers send here
            "largest_batch": self.batcher.largest,
            "held": getattr(self.batcher, "held", None),
            "load_attempts": dict(self.load_attempts),
            "tiers": self.tiers.stats(),
        }

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream {'prompt_tokens'}, then per choice {'index', 'text', 'logprobs'?, 'prompt_logprobs'?}
        deltas and one {'index', 'finish_reason', 'completion_tokens'}, then {'usage'}; or, instead of
        what is left, one {'status', 'error'}. Never raises: one bad request must not take the replica down.

        `request`: 'adapter', 'prompts' (texts) or 'messages' (a chat), and `SamplingRequest.sampling()`."""
        ref = request["adapter"]
        label = self.labels.adapter(ref)
        if self.gauges is None:
            self.gauges = asyncio.get_running_loop().create_task(self._report_gauges())
        try:
            held, default = await self._acquire(ref, request.get("merge"))
        except AdapterLoadError as error:
            self.metrics["requests"].inc(tags={"adapter": label, "status": str(error.status)})
            yield {"status": error.status, "error": str(error)}
            return
        try:
            generation = self._generate(label, held, request, default)
            async with aclosing(generation) as events:  # closed at once on a disconnect
                async for event in events:
                    yield event
        except Exception as error:
            log.exception("request for %s failed", ref)
            yield {"status": 500, "error": f"generation with {ref!r} failed: {type(error).__name__}"}
        finally:
            self.lora.unpin([held])
            self.tiers.done(recipe_id(request["merge"]) if request.get("merge") else ref)

    async def _report_gauges(self) -> None:
        """Queue depth, running rows and adapter bytes per tier, every second (the gauges Prometheus scrapes)."""
        while True:
            waiting = sum(row.started_s is None for row in list(self.live))
            self.metrics["queue_depth"].set(waiting)
            self.metrics["running"].set(len(self.live) - waiting)
            for tier, held in self.tiers.stats()["bytes"].items():
                self.metrics["tier_bytes"].set(held, tags={"tier": tier})
            await asyncio.sleep(1.0)

    async def _merge_slot(self, recipe: Recipe) -> int:
        try:
            return await self.merges.acquire(recipe)
        except AdapterLoadError:
            raise
        except (MergeError, UnsupportedAdapter) as error:
            raise AdapterLoadError(422, f"these adapters cannot be merged: {error}") from None
        except TooLarge as error:
            raise AdapterLoadError(422, f"this merge cannot be served here: {error}") from None
        except Exception as error:
            log.exception("merging %s failed", recipe)
            raise AdapterLoadError(
                500, f"merging {len(recipe.sources)} adapters failed: {type(error).__name__}"
            ) from None

    async def _grammar(self, constraint: dict[str, Any] | None) -> RowGrammar | None:
        """The row's matcher for `constraint` (the request's, else the adapter's default), or None."""
        if constraint is None or constraint == TEXT:
            return None
        return await asyncio.to_thread(self.grammars.row, constraint)

    async def _acquire(self, ref: str, merge: Recipe | None = None) -> tuple[int, dict[str, Any] | None]:
        """The adapter's (or the per-request merge's) slot, pinned until the request ends (Serve may evict it
        meanwhile), and its default response_format (a merge has none)."""
        if merge:
            return await self._merge_slot(merge), None
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
        self.tiers.use(ref)
        self.lora.pin([loaded.slot])
        return loaded.slot, loaded.response_format

    async def _generate(
        self, label: str, slot: int, request: dict[str, Any], default_format: dict[str, Any] | None
    ) -> AsyncGenerator[dict[str, Any]]:
        arrived = time.perf_counter()
        try:
            rows = self._rows(slot, request)
        except ProtocolError as error:  # the chat template refused the messages, or a prompt does not fit
            self.metrics["requests"].inc(tags={"adapter": label, "status": "400"})
            yield {"status": 400, "error": error.message, "code": error.code}
            return
        try:  # each row its own matcher: choices of one request advance apart
            for row in rows:
                row.grammar = await self._grammar(request.get("response_format") or default_format)
        except GrammarError as error:
            self.metrics["requests"].inc(tags={"adapter": label, "status": "400"})
            yield {"status": 400, "error": str(error), "code": "invalid_value", "param": "response_format"}
            return
        try:  # every row queued now, or none: a full replica is a 503 before anything is streamed
            streams = [self.batcher.submit(row) for row in rows]
        except QueueFull as error:
            for row in rows:
                row.cancelled = True  # the ones queued before the refusal leave without computing anything
            self.metrics["requests"].inc(tags={"adapter": label, "status": "503"})
            yield {"status": 503, "error": str(error)}
            return
        try:
            with self.watch.request():
                opening = {"tool_format": tool_format(self.base.tokenizer)} if request.get("tools") else {}
                async for event in self._stream(label, arrived, rows, streams, request["n"], opening):
                    yield event
        finally:
            for row in rows:
                row.cancelled = True  # a no-op once it ended; else it leaves the batch (or never joins it)

    async def _stream(
        self,
        label: str,
        arrived: float,
        rows: list[Row],
        streams: list[AsyncGenerator[tuple[str, Any]]],
        n: int,
        opening: dict[str, Any],
    ) -> AsyncGenerator[dict[str, Any]]:
        """The rows' events for the ingress: the prompt's tokens (with `opening`: the chat template's tool-call
        format), per choice its text, logprobs and end, then the usage."""
        prompt_tokens = sum(len(row.prompt_ids) for row in rows[::n])  # each prompt once
        yield {"prompt_tokens": prompt_tokens} | opening
        sent = [0] * len(rows)  # logprobs handed out, per row
        opened: set[int] = set()  # rows whose first event went out (with the prompt's logprobs, if asked)
        async with aclosing(self._merged(rows, streams)) as merged:  # closed at once on a disconnect
            async for index, kind, value in merged:
                row = rows[index]
                if kind in ("error", "deadline"):
                    status, code = (500, None) if kind == "error" else (504, "deadline_exceeded")
                    self.metrics["requests"].inc(tags={"adapter": label, "status": str(status)})
                    yield {"status": status, "error": value, "code": code}
                    return
                event: dict[str, Any] = {"index": index}
                if index not in opened and row.prompt_token_logprobs:
                    pairs = zip(row.prompt_ids, row.prompt_token_logprobs, strict=True)
                    event["prompt_logprobs"] = [self._logprob(token, e) for token, e in pairs]
                opened.add(index)
                if row.logprobs is not None:
                    done = len(row.token_logprobs)  # the decode thread appends; hand out what is there
                    event["logprobs"] = [self._logprob(e.token, e) for e in row.token_logprobs[sent[index] : done]]
                    sent[index] = done
                if kind == "text":
                    yield event | {"text": value}
                else:
                    yield event | {"finish_reason": row.finish_reason, "completion_tokens": len(row.ids)}
        completion_tokens = sum(len(row.ids) for row in rows)
        self._observe(label, arrived, rows, prompt_tokens, completion_tokens)
        yield {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}

    def _rows(self, slot: int, request: dict[str, Any]) -> list[Row]:
        """One row per choice: `n` per prompt, in choice order; choice j of a prompt samples with seed + j."""
        tokenizer = self.base.tokenizer
        messages, tools = request.get("messages"), request.get("tools")
        texts = [chat_prompt(tokenizer, messages, tools)] if messages else request["prompts"]
        rows = []
        for text in texts:
            prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
            max_tokens = self._budget(len(prompt_ids), request["max_tokens"])
            processors = sampling.penalties(
                prompt_ids,
                repetition=request["repetition_penalty"],
                presence=request["presence_penalty"],
                frequency=request["frequency_penalty"],
            )
            for j in range(request["n"]):
                seed = request["seed"]
                rows.append(
                    Row(
                        prompt_ids=prompt_ids,
                        slot=slot,
                        max_tokens=max_tokens,
                        temperature=request["temperature"],
                        top_p=request["top_p"],
                        stop=request["stop"],
                        seed=None if seed is None else (seed + j) % (SEED_RANGE[1] + 1),
                        top_k=request["top_k"],
                        min_p=request["min_p"],
                        processors=list(processors),
                        logprobs=request["logprobs"],
                        prompt_logprobs=bool(request.get("echo")) and request["logprobs"] is not None,
                    )
                )
        return rows

    def _budget(self, prompt_tokens: int, asked: int | None) -> int:
        """The row's `max_tokens`: what was asked, or (a chat without a budget) what fits the context, up to
        the server's limit; a 400 when the prompt and the budget do not fit the context."""
        room = self.engine.context_length - prompt_tokens
        if asked is None:
            max_tokens, problem = min(self.settings.max_tokens, room), "leaves no room for new tokens"
        else:
            max_tokens, problem = asked, f"+ max_tokens ({asked}) exceeds"
        if max_tokens < 1 or max_tokens > room:
            raise ProtocolError(
                400,
                f"prompt ({prompt_tokens} tokens) {problem} the context length of {self.engine.context_length} tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    async def _merged(
        self, rows: list[Row], streams: list[AsyncGenerator[tuple[str, Any]]]
    ) -> AsyncGenerator[tuple[int, str, Any]]:
        """Every row's events as (row index, kind, value), each row's cut at the server's deadline, until
        each row is done, or until one fails; closing this cancels the rows still running."""
        events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()

        async def drain(index: int, stream: AsyncGenerator[tuple[str, Any]]) -> None:
            try:  # closing the stream (with_deadline does) cancels the row
                async with aclosing(with_deadline(stream, self.settings.deadline_s)) as bounded:
                    async for kind, value in bounded:
                        events.put_nowait((index, kind, value))
            except Exception as error:  # raised where the request is served
                events.put_nowait((index, "raise", error))

        self.live.update(rows)
        tasks = [asyncio.create_task(drain(i, stream)) for i, stream in enumerate(streams)]
        try:
            running = len(rows)
            while running:
                index, kind, value = await events.get()
                if kind == "raise":
                    raise value
                ended = kind in ("done", "error", "deadline")
                running -= ended
                yield index, kind, value
                if ended and kind != "done":
                    return
        finally:
            self.live.difference_update(rows)
            for task in tasks:
                task.cancel()

    def _logprob(self, token: int, entry: sampling.TokenLogprob | None) -> dict[str, Any]:
        """A token's logprob entry for the ingress: token texts, -9999 for -inf (as vLLM), None for none
        (a prompt's first token)."""
        decode = self.base.tokenizer.decode
        if entry is None:
            return {"token": str(decode([token])), "logprob": None, "top": []}
        return {
            "token": str(decode([token])),
            "logprob": max(entry.logprob, -9999.0),
            "top": [[str(decode([t])), max(lp, -9999.0)] for t, lp in entry.top],
        }

    def _observe(self, label: str, arrived: float, rows: list[Row], prompt_tokens: int, completion_tokens: int) -> None:
        """A finished request's metrics: status, tokens, time to first token, latency, queue time."""
        tags = {"adapter": label}
        self.metrics["requests"].inc(tags=tags | {"status": "200"})
        now = time.perf_counter()
        self.metrics["latency_s"].observe(now - arrived, tags=tags)
        firsts = [row.first_token_s for row in rows if row.first_token_s is not None]
        if firsts:
            self.metrics["first_token_s"].observe(min(firsts) - arrived, tags=tags)
        for row in rows:
            if row.started_s is not None:
                self.metrics["queue_s"].observe(max(0.0, row.started_s - arrived), tags=tags)
        for kind, count in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            self.metrics["request_tokens"].observe(count, tags=tags | {"kind": kind})
            if count:
                self.metrics["tokens"].inc(count, tags=tags | {"kind": kind})
