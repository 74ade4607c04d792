"""A replica's liveness: whether its decode loop still makes progress.

A decode thread that hangs (a stuck kernel, a deadlock, a device that stopped answering) leaves the
replica's event loop answering and every request on it waiting forever, so Serve's default health check
(the actor answers) passes. `DecodeWatch` is bumped by a forward hook on the model, i.e. by the decode
thread at the end of every prefill and decode step, whichever batcher runs them; `AdapterServer.check_health`
fails once requests are in the batcher and no forward has finished for `stall_s`, and Serve then replaces
the replica. Idle time does not count: the clock restarts when the first request arrives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


class DecodeStalled(RuntimeError):
    """The decode loop has requests and made no progress for longer than allowed."""


class DecodeWatch:
    """Heartbeat of one model's forwards, and the requests that wait on them."""

    def __init__(self, model: nn.Module, stall_s: float):
        self.stall_s = stall_s
        self.last = time.monotonic()
        self.busy = 0
        self.lock = threading.Lock()
        model.register_forward_hook(self._beat)

    def _beat(self, *_: Any) -> None:
        self.last = time.monotonic()

    @contextmanager
    def request(self) -> Iterator[None]:
        """Around one request's time in the batcher (waiting or decoding)."""
        with self.lock:
            if not self.busy:
                self.last = time.monotonic()  # idle time is not a stall
            self.busy += 1
        try:
            yield
        finally:
            with self.lock:
                self.busy -= 1

    def check(self) -> None:
        """Raise `DecodeStalled` if requests wait and no forward finished for `stall_s`."""
        with self.lock:
            busy, quiet = self.busy, time.monotonic() - self.last
        if busy and quiet > self.stall_s:
            raise DecodeStalled(
                f"the decode loop is stuck: {busy} requests in the batcher and no forward pass finished "
                f"for {quiet:.0f} s (stall_timeout_s={self.stall_s:g})"
            )
