"""A replica whose decode loop is stuck fails its health check and Serve replaces it (its own
application: a short `stall_timeout_s` and health-check period). The loop is wedged through a real seam:
a forward pre-hook on the replica's model that never returns, as a hung kernel would."""

from __future__ import annotations

import os
import threading
import time

import pytest
import requests

from madapt.serve.ingress import OpenAIIngress
from madapt.serve.local import wait_ready
from madapt.serve.replica import AdapterServer

pytestmark = pytest.mark.ray
APP = "madapt-health"


@pytest.mark.slow  # ~60 s: its own application, then a replacement replica's start-up
def test_a_stuck_decode_loop_makes_serve_replace_the_replica(serve_url, tiny_model, tmp_path):
    from ray import serve

    class Wedgeable(AdapterServer.func_or_class):  # type: ignore[name-defined,misc]
        """The real replica, plus a way to hang its decode loop and to tell replicas apart."""

        def wedge(self) -> None:
            def hang(*_: object) -> None:
                threading.Event().wait()

            self.base.model.register_forward_pre_hook(hang)

        def pid(self) -> int:
            return os.getpid()

    args = {"base_model": tiny_model, "store": str(tmp_path), "registry_detached": False, "stall_timeout_s": 2}
    server = serve.deployment(Wedgeable).options(
        name="AdapterServer", health_check_period_s=1, health_check_timeout_s=5, graceful_shutdown_timeout_s=1
    )
    serve.run(OpenAIIngress.bind(server.bind(args), args), name=APP, route_prefix="/", blocking=False)
    try:
        wait_ready(serve_url, timeout_s=300)
        handle = serve.get_deployment_handle("AdapterServer", APP)
        first = handle.pid.remote().result()
        handle.wedge.remote().result()
        started = time.monotonic()
        stuck = requests.post(f"{serve_url}/v1/completions", json={"model": "base", "prompt": "hi"}, timeout=120)
        assert stuck.status_code == 503, stuck.text  # its replica was stopped under it: retryable
        assert "became unavailable" in stuck.json()["error"]["message"]
        assert time.monotonic() - started < 60
        wait_ready(serve_url, timeout_s=120)  # a new replica serves
        assert handle.pid.remote().result() != first
    finally:
        serve.delete(APP)
