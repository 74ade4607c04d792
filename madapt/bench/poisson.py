"""Open-loop Poisson arrivals: the seeded workload every server or batcher gets, and the clock that times
each request's first text and end, whatever answers it (`madapt bench arrivals`, in-process and over HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from madapt.bench import percentile

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "pack",
    "boxes",
    "of",
    "jam",
]


@dataclass
class Request:
    at: float  # arrival, seconds after the run starts
    prompt_ids: list[int]
    slot: int
    new_tokens: int
    text: str = ""  # the prompt as words: what an HTTP request sends (madapt's API takes text, not ids)


def workload(args: argparse.Namespace, rate: float, tokenizer: Any, slots: list[int]) -> list[Request]:
    """The same seeded mix for every batcher at a rate: exponential gaps, uniform lengths and adapters."""
    chance = random.Random(f"{args.seed}-{rate}")
    low_words, high_words = (int(v) for v in args.prompt_words.split(","))
    low_new, high_new = (int(v) for v in args.new_tokens.split(","))
    at, requests = 0.0, []
    for _ in range(args.requests):
        words = " ".join(chance.choice(WORDS) for _ in range(chance.randint(low_words, high_words)))
        ids = tokenizer(words, add_special_tokens=False).input_ids
        requests.append(Request(at, ids, chance.choice(slots), chance.randint(low_new, high_new), words))
        at += chance.expovariate(rate)
    return requests


Answer = Callable[[Request, Callable[[], None]], Awaitable[int]]
"""Sends a request and returns its output tokens, calling the mark once per text event it receives: the one
seam between the clock below and what serves (a batcher in-process, a server over HTTP)."""


async def timed(answer: Answer, request: Request, origin: float) -> dict[str, float]:
    """Send at its arrival time; the seconds to its first text event and to its end, and its tokens."""
    await asyncio.sleep(max(0.0, origin + request.at - time.perf_counter()))
    sent = time.perf_counter()
    first: float | None = None

    def mark() -> None:
        nonlocal first
        first = first or time.perf_counter()

    tokens = await answer(request, mark)
    end = time.perf_counter()
    return {"ttft": (first or end) - sent, "e2e": end - sent, "tokens": tokens, "end": end}


async def open_loop(answer: Answer, requests: list[Request]) -> dict[str, float]:
    origin = time.perf_counter()
    done = await asyncio.gather(*(timed(answer, r, origin) for r in requests))
    wall = max(d["end"] for d in done) - origin
    ttft, e2e = [d["ttft"] for d in done], [d["e2e"] for d in done]
    return {
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "e2e_p50_s": percentile(e2e, 0.5),
        "e2e_p99_s": percentile(e2e, 0.99),
        "tok_per_s": sum(d["tokens"] for d in done) / wall,
        "wall_s": wall,
        "tokens": sum(d["tokens"] for d in done),
    }


RATE_PANELS = (("ttft_p99_s", "TTFT p99 (s)"), ("e2e_p99_s", "end-to-end p99 (s)"), ("tok_per_s", "output tokens/s"))


def plot_rate_panels(plt: Any, rows: list[dict], series: dict[str, str | None], height: float) -> tuple[Any, Any]:
    """The arrivals charts' three panels (TTFT p99, end-to-end p99, output tokens/s) over the arrival rate, one
    line per `series` name (its colour, or None: matplotlib's next); the figure and its axes, in
    `RATE_PANELS` order, for what a chart adds."""
    rates = [row["rate"] for row in rows]
    figure, axes = plt.subplots(1, len(RATE_PANELS), figsize=(15, height))
    for axis, (key, label) in zip(axes, RATE_PANELS, strict=True):
        for name, colour in series.items():
            axis.plot(rates, [row[name][key] for row in rows], marker="o", color=colour, label=name)
        axis.set_xscale("log")
        axis.set_xticks(rates, [f"{r:g}" for r in rates])
        axis.minorticks_off()
        axis.set_xlabel("arrival rate (requests/s)")
        axis.set_ylabel(label)
    return figure, axes
