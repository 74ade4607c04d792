"""Admission control and liveness without Ray: a bounded waiting queue, a per-request deadline, and the
heartbeat that tells a stuck decode loop from an idle one. The loop is wedged through a real seam: a
forward pre-hook on the model that blocks until released."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from madapt.serve.engine import Engine, Row
from madapt.serve.health import DecodeStalled, DecodeWatch
from madapt.serve.multilora import BASE_SLOT, MultiLora
from madapt.serve.scheduler import ContinuousBatcher, QueueFull, StaticBatcher, with_deadline


@pytest.fixture
def wedged(base) -> Iterator[tuple[Engine, threading.Event]]:
    """An engine whose every forward waits for the event (set it to let the loop go on)."""
    release = threading.Event()

    def block(*_: object) -> None:
        release.wait()

    hook = base.model.register_forward_pre_hook(block)
    try:
        yield Engine(MultiLora(base.model), base.tokenizer, context_length=512), release
    finally:
        release.set()
        hook.remove()


def rows(engine: Engine, n: int, max_tokens: int = 3) -> list[Row]:
    ids = engine.tokenizer("hello there", add_special_tokens=False).input_ids
    return [Row(prompt_ids=ids, slot=BASE_SLOT, max_tokens=max_tokens) for _ in range(n)]


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_a_full_batcher_refuses_at_once_and_drains_when_the_loop_runs(wedged):
    engine, release = wedged
    batcher = ContinuousBatcher(engine, max_size=1, step_tokens=64, max_waiting=2)
    first, *queued, extra = rows(engine, 4)

    async def main() -> list[list[tuple[str, object]]]:
        streams = [batcher.submit(first)]
        await asyncio.to_thread(wait_for, lambda: not batcher.waiting)  # the loop took it, and is stuck in it
        streams += [batcher.submit(r) for r in queued]
        started = time.monotonic()
        with pytest.raises(QueueFull, match="3 requests are decoding or waiting"):
            batcher.submit(extra)
        assert time.monotonic() - started < 0.1
        release.set()
        return [[e async for e in s] for s in streams]

    try:
        ends = asyncio.run(main())
    finally:
        batcher.stop()
    assert [events[-1] for events in ends] == [("done", None)] * 3
    assert extra.steps == 0 and [r.finish_reason for r in (first, *queued)] == ["length"] * 3


def test_the_static_batcher_bounds_its_queue_too(base):
    engine = Engine(MultiLora(base.model), base.tokenizer, context_length=512)
    batcher = StaticBatcher(engine, max_size=1, wait_s=0.05, max_waiting=1)
    a, b, c = rows(engine, 3)

    async def main() -> None:
        streams = [batcher.submit(a), batcher.submit(b)]  # the collector has not run yet: both wait
        with pytest.raises(QueueFull):
            batcher.submit(c)
        for s in streams:
            assert [e async for e in s][-1] == ("done", None)

    asyncio.run(main())


def test_a_request_past_its_deadline_is_cancelled_with_a_clear_event(wedged):
    engine, release = wedged
    batcher = ContinuousBatcher(engine, max_size=4, step_tokens=64)
    (row,) = rows(engine, 1, max_tokens=50)

    async def main() -> list[tuple[str, object]]:
        started = time.monotonic()
        events = [e async for e in with_deadline(batcher.submit(row), deadline_s=0.3)]
        assert 0.3 <= time.monotonic() - started < 2
        return events

    try:
        events = asyncio.run(main())
        assert events[-1][0] == "deadline" and "deadline of 0.3 s" in str(events[-1][1])
        assert row.cancelled
        release.set()
        wait_for(lambda: row.finish_reason is not None)
        assert row.finish_reason == "cancelled" and len(row.ids) < 50
    finally:
        batcher.stop()


def test_the_watch_fails_while_a_busy_loop_is_stuck_not_while_it_idles(wedged):
    engine, release = wedged
    watch = DecodeWatch(engine.model, stall_s=0.2)
    batcher = ContinuousBatcher(engine, max_size=4, step_tokens=64)
    time.sleep(0.3)
    watch.check()  # idle for longer than stall_s: not a stall

    async def main() -> None:
        with watch.request():
            stream = batcher.submit(rows(engine, 1, max_tokens=5)[0])
            await asyncio.sleep(0.4)
            with pytest.raises(DecodeStalled, match="1 requests in the batcher"):
                watch.check()
            release.set()
            assert [e async for e in stream][-1] == ("done", None)
            watch.check()  # forwards finish again

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
