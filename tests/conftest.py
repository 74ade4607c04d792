"""Shared fixtures: a tiny random Llama built in code (offline, seconds), stores in temp dirs, and one
local Ray cluster per test session for the integration tier. Plain helpers live in tests/helpers.py.

The session gets its own temporary MADAPT_HOME (set before Ray starts, so workers inherit it); only the
converted embedded model is shared with the user's home, through MADAPT_MODEL_CACHE.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from madapt.config import model_cache, parse_config
from madapt.models import build_tiny_llama, load_base
from madapt.store import AdapterStore
from tests.helpers import free_port, tiny_config

os.environ.setdefault("MADAPT_MODEL_CACHE", str(model_cache()))
TEST_HOME = tempfile.mkdtemp(prefix="madapt-test-home-")
os.environ["MADAPT_HOME"] = TEST_HOME
os.environ.pop("MADAPT_STORE", None)


def pytest_unconfigure(config):
    shutil.rmtree(TEST_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the tiny base model; loads through the same code path as any local model dir."""
    return str(build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> str:
    """Same shape, different weights: adapters trained on one must be refused by the other."""
    return str(build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-b", seed=99))


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def base(tiny_model):
    """The tiny base model, loaded once per module (tests may attach adapters to it in place)."""
    return load_base(tiny_model)


@pytest.fixture
def tiny_cfg(tiny_model, tmp_path):
    return parse_config(tiny_config(tiny_model, str(tmp_path / "store")))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session. Logical CPUs are over-provisioned so Ray Train's
    controller, data actors and workers all fit on a 2-core machine."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_cluster) -> str:
    """Ray Serve's HTTP proxy on a free loopback port, started once: its port cannot change afterwards, so
    every Serve test (one application at a time, each deleted by its module) shares it."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class RayHead:
    dashboard: str
    env: dict[str, str]

    def cli(self, *args: str) -> list[str]:
        return [str(Path(sys.executable).parent / "ray"), *args]


@pytest.fixture(scope="session")
def ray_head():
    """A real `ray start --head` cluster (own temp dir, non-default ports) for `ray job submit` and
    `serve deploy`. Ray 2.60 turns on token authentication: clients need RAY_AUTH_MODE=token."""
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{ray_bin.parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--port=6391", "--dashboard-port=8276",
         "--ray-client-server-port=23012", "--dashboard-agent-listen-port=52376", "--num-cpus=4",
         f"--temp-dir=/tmp/madapt-head-{os.getpid()}", "--disable-usage-stats", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    yield RayHead(dashboard="http://127.0.0.1:8276", env=env)
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started; no global `ray stop`
    head.wait(timeout=60)
