"""Iteration-level (continuous) batching for one replica: rows join and leave the running batch between
decode steps, so a new request starts within a step or two whatever the running rows' lengths.

Every iteration of the decode thread: rows whose client went away are dropped, waiting requests are
admitted first come first served while the step's token budget lasts (`step_tokens`: one token per
running row plus each admitted prompt's length; at least one request is admitted per step when there is
room, so a prompt longer than the budget still starts), their prefill runs as one forward over those rows
only and they join the running batch; then one decode step runs over every running row, and the rows
that ended (EOS, stop string, `max_tokens`, an error, a cancellation) leave and free their place. A
replica's batcher holds at most `max_size + max_waiting` requests (decoding or waiting); one more is
refused at once (`QueueFull`, a 503 with Retry-After), so its queue never grows without bound.

KV-cache layout, chosen by measuring (`DecodeBatch` in `madapt.serve.engine`): one left-padded batch cache
for all running rows, with rows spliced in (the narrower side re-padded on the left) when a group joins,
and leaving rows replaced by the last rows, with the pad columns no row uses any more cut off the left.
The alternative, one cache per row stitched into a padded batch for every step and split again after it,
copies every row's whole cache twice per step on top of the forward. Measured on the project's CPU
machine (torch 2.13 CPU, fp32, 1 torch thread, 2 cores shared with other jobs, 2026-11-28), 8 running rows
with prompts of 40-300 tokens, median time of one decode step, the two layouts timed in turn, step by step
(two runs on the tiny model, one on SmolLM2):

| base | batch cache | per-row caches stitched | ratio |
| --- | ---: | ---: | ---: |
| tiny Llama (2 layers, hidden 64) | 15.1 / 7.3 ms | 16.5 / 8.5 ms | 1.09x / 1.17x |
| SmolLM2-135M (30 layers) | 270 ms | 452 ms | 1.68x |

On the tiny model a step is mostly Python overhead, so the copies hardly show; on SmolLM2 they do. (Runs
that timed all batch-cache steps first, then all stitched steps, swung with the other jobs' load: 9.8 vs
22.6 ms on the tiny model, 572 vs 509 ms on SmolLM2.) The batch cache's own costs are small next to the
work they go with: splicing one joining row into the 8 costs 0.6-0.9 ms (tiny) and 100-114 ms (SmolLM2,
9 rows x 350 columns), against 10-34 ms and 2.3-4.2 s for that row's 350-token prefill; one row leaving
costs 0.5-1 ms and 9-24 ms. So the batch cache copies only when rows join (one copy of the cache) or
leave (only the moved rows), and a step is the static batcher's step. The gathered adapter rows follow
the same moves (`madapt.serve.multilora.RowAdapters`): a joining row copies only its own A/B, a leaving
row is replaced by the last one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

from madapt.serve.engine import DecodeBatch, Engine, Row

log = logging.getLogger(__name__)


async def row_events(row: Row, events: asyncio.Queue[tuple[str, Any]]) -> AsyncGenerator[tuple[str, Any]]:
    """A row's events until ('done' | 'error'); when the consumer goes away first, the row is cancelled
    (a no-op for a row that ended; otherwise its decoding stops at the next step)."""
    try:
        while True:
            kind, value = await events.get()
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        row.cancelled = True


async def with_deadline(events: AsyncGenerator[tuple[str, Any]], deadline_s: float) -> AsyncGenerator[tuple[str, Any]]:
    """A row's `events`, closed (which cancels the row) and ended by ('deadline', message) once `deadline_s`
    have passed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    async with aclosing(events):
        while True:
            try:
                event = await asyncio.wait_for(anext(events), max(0.0, end - loop.time()))
            except StopAsyncIteration:
                return
            except TimeoutError:
                yield "deadline", f"the request passed this server's deadline of {deadline_s:g} s and was cancelled"
                return
            yield event


class QueueFull(Exception):
    """The batcher holds `max_size + max_waiting` requests already: retry later (503)."""


class ContinuousBatcher:
    """The replica's scheduler: `submit(row)` queues a row (or refuses it: `QueueFull`) and returns its
    events while one decode thread runs the batch. Closing the events (the client went away, the Serve
    request was cancelled) cancels the row: it leaves the batch at the next step."""

    def __init__(self, engine: Engine, max_size: int, step_tokens: int, max_waiting: int = 1 << 30):
        self.engine, self.max_size, self.step_tokens = engine, max_size, step_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Row] = deque()
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.batch = DecodeBatch(engine)
        self.largest = 0
        self.admitting = 0  # rows taken from `waiting` whose prefill runs: in neither list meanwhile...
        self.admit_base = 0  # ...on top of this many running rows (they join `batch.rows` before admit returns)
        self.stopping = False

    def submit(self, row: Row) -> AsyncGenerator[tuple[str, Any]]:
        """Queue `row` now (or raise `QueueFull`); its events follow:
        ('text', delta)..., then ('done', None) or ('error', message)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def on_text(text: str) -> None:
            put("text", text)

        def on_end(ended: Row) -> None:
            put("error", ended.error) if ended.error else put("done", None)

        row.on_text, row.on_end = on_text, on_end
        self.add(row)
        return row_events(row, events)

    @property
    def held(self) -> int:
        """Rows waiting, being admitted or decoding: what `max_size + max_waiting` bounds."""
        return len(self.waiting) + max(len(self.batch.rows), self.admit_base + self.admitting)

    def add(self, row: Row) -> None:
        with self.wake:
            held = self.held
            if held >= self.max_size + self.max_waiting:
                raise QueueFull(f"{held} requests are decoding or waiting on this replica already; retry")
            self.waiting.append(row)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="madapt-decode", daemon=True)
                self.thread.start()
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def _take(self) -> list[Row]:
        """Waiting rows to admit this step, first come first served, within the token budget."""
        taken: list[Row] = []
        budget = self.step_tokens - len(self.batch.rows)
        while self.waiting and len(self.batch.rows) + len(taken) < self.max_size:
            row = self.waiting[0]
            if not row.cancelled and taken and len(row.prompt_ids) > budget:
                break
            self.waiting.popleft()
            taken.append(row)  # cancelled ones too: `admit` ends them without computing anything
            if not row.cancelled:
                budget -= len(row.prompt_ids)
        return taken

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not self.batch.rows and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    break
                joining = self._take()
                self.admitting, self.admit_base = len(joining), len(self.batch.rows)
            try:
                if joining:
                    self.batch.admit(joining)
                self.admitting = self.admit_base = 0
                self.largest = max(self.largest, len(self.batch.rows))
                self.batch.step()
            except Exception:  # a bug in the scheduler itself: fail what is running, keep serving
                log.exception("the decode loop failed")
                self.admitting = self.admit_base = 0
                broken, self.batch = self.batch, DecodeBatch(self.engine)
                for row in broken.rows:
                    row.error, row.finish_reason = "generation failed: internal error", "error"
                    if row.on_end is not None:
                        row.on_end(row)
                broken.adapters.close()
        self.batch.close()
        with self.wake:
            for row in self.waiting:
                row.cancelled = True
            leftover = list(self.waiting)
            self.waiting.clear()
        self.batch.admit(leftover)  # ends them, computing nothing


class StaticBatcher:
    """Collects requests that arrive within `wait_s` (up to `max_size`) into one mixed-adapter batch and
    decodes it on a worker thread, so the replica's event loop keeps accepting and streaming."""

    def __init__(self, engine: Engine, max_size: int, wait_s: float, max_waiting: int = 1 << 30):
        self.engine, self.max_size, self.wait_s, self.max_waiting = engine, max_size, wait_s, max_waiting
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="madapt-decode")
        self.queue: asyncio.Queue[tuple[Row, asyncio.Queue[tuple[str, Any]]]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.largest = 0
        self.running = 0

    def submit(self, row: Row) -> AsyncGenerator[tuple[str, Any]]:
        """As `ContinuousBatcher.submit`; a cancelled row stops taking tokens while its batch runs on."""
        loop = asyncio.get_running_loop()
        queue = self.queue
        if queue is None:  # set together with `task`, by the first request
            queue = self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run(queue))
        held = queue.qsize() + self.running
        if held >= self.max_size + self.max_waiting:
            raise QueueFull(f"{held} requests are decoding or waiting on this replica already; retry")
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("text", text))

        row.on_text = on_text
        queue.put_nowait((row, events))
        return row_events(row, events)

    async def _run(self, queue: asyncio.Queue[tuple[Row, asyncio.Queue[tuple[str, Any]]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_size:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            self.largest, self.running = max(self.largest, len(batch)), len(batch)
            outcome: tuple[str, str | None]
            try:
                await loop.run_in_executor(self.executor, self.engine.generate, [row for row, _ in batch])
                outcome = ("done", None)
            except Exception as error:
                log.exception("batch of %d failed", len(batch))
                outcome = ("error", f"generation failed: {type(error).__name__}: {error}")
            self.running = 0
            for row, events in batch:
                events.put_nowait(("error", row.error) if row.error else outcome)  # a row that failed alone
