"""The shipped serve config, deployed with `serve deploy` on a real `ray start --head` cluster, answers over
HTTP; only its model, store and port are changed, as on a real cluster. Beside a running `madapt serve`, a
`madapt merge` never joins the server's own Ray by accident, and pointed at it names what it lacks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml

from madapt.bench.serve import publish_random_adapters
from madapt.models import load_base
from madapt.store import AdapterStore
from tests.helpers import ROOT, free_port, tiny_config

PORT = 8321


def http(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data, {"Content-Type": "application/json"})
    request.method = method
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:  # Serve's proxy answers in plain text until the app is up
        text = error.read().decode(errors="replace")
        return error.code, json.loads(text) if text.startswith("{") else {"text": text}


@pytest.mark.ray
@pytest.mark.slow  # `serve deploy` to a `ray start` head; the app itself is tested in test_serve.py
def test_serve_deploy_of_the_shipped_config_answers(ray_head, tiny_model, tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    publish_random_adapters(store, load_base(tiny_model), ["coding"], r=4, targets=["q_proj", "v_proj"])
    document = yaml.safe_load((ROOT / "serve_configs" / "multi_adapter.yaml").read_text())
    document["http_options"]["port"] = PORT
    document["applications"][0]["args"] |= {"base_model": tiny_model, "store": store.uri}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(document))

    deploy = ray_head.cli("serve", "deploy", str(config), "--address", ray_head.dashboard)
    for _ in range(60):  # the dashboard (Serve's REST endpoint) takes a while to come up
        done = subprocess.run(deploy, env=ray_head.env, capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    deadline = time.monotonic() + 300
    while True:
        try:
            status, models = http("GET", "/v1/models")
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "the deployed application never answered /v1/models"
        time.sleep(2)
    assert {"base", "coding"} <= {m["id"] for m in models["data"]}
    status, completion = http("POST", "/v1/completions", {"model": "coding", "prompt": "def add(", "max_tokens": 4})
    assert status == 200, completion
    assert completion["model"] == "coding" and completion["usage"]["completion_tokens"] >= 1
    status, error = http("POST", "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 2})
    assert status == 404 and "nope" in json.dumps(error)


@pytest.mark.slow  # its own `madapt serve` (a Ray, two replicas) and two `madapt merge` processes: ~2 min here
def test_merge_beside_a_two_replica_madapt_serve_runs_in_process_or_names_the_cpu_it_lacks(tiny_model, tmp_path):
    """Issue 23: `madapt merge` used to join the server's private Ray (`ray.init(address="auto")` finds it
    with `ps`) and wait forever for a CPU the replicas hold."""
    from ray._private.utils import get_num_cpus  # the CPUs the server's Ray will have

    store = AdapterStore(str(tmp_path / "store"))
    publish_random_adapters(store, load_base(tiny_model), ["coding", "chat"], r=4, targets=["q_proj", "v_proj"])
    training = tmp_path / "train.yaml"
    training.write_text(yaml.safe_dump(tiny_config(tiny_model, store.uri)))
    document = yaml.safe_load((ROOT / "serve_configs" / "multi_adapter.yaml").read_text())
    application = document["applications"][0]
    application["args"]["config"] = str(training)
    replicas = application["deployments"][0]
    del replicas["autoscaling_config"]
    replicas |= {"num_replicas": 2, "ray_actor_options": {"num_cpus": get_num_cpus() / 2}}  # they hold every CPU
    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text(yaml.safe_dump(document))

    # A Ray temp dir of its own: no `ray start` cluster of this machine is found, only this test's server.
    ray_tmp = tempfile.mkdtemp(prefix="madapt-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    madapt = [sys.executable, "-m", "madapt.cli"]
    log = tmp_path / "serve.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [*madapt, "serve", str(serve_config), "--port", str(free_port())],
            env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "serving " not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        address = re.search(r"private local instance at (\S+);", log.read_text()).group(1)

        merged = subprocess.run(
            [*madapt, "merge", str(training), "--no-eval"], env=env, capture_output=True, text=True, timeout=300
        )
        assert merged.returncode == 0, merged.stdout[-2000:] + merged.stderr[-2000:]
        assert "published both@1" in merged.stdout
        assert "Ray:" not in merged.stdout  # in-process: it joined no Ray

        pointed = subprocess.run(
            [*madapt, "merge", str(training), "--no-eval", "--address", address],
            env=env | {"RAY_AUTH_MODE": "token", "MADAPT_RESOURCE_WAIT_S": "3"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert pointed.returncode == 2, pointed.stdout[-2000:] + pointed.stderr[-2000:]
        assert f"joined the cluster at {address} (from --address)" in pointed.stdout
        assert re.search(
            r"the merger actor needs 1 CPU but only 0 of the cluster's [\d.]+ were free for 3 s", pointed.stderr
        )
    finally:
        server.send_signal(signal.SIGTERM)  # a container's stop: madapt serve shuts Serve down, and its Ray with it
        try:
            stopped = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            raise
        assert stopped == 0
        shutil.rmtree(ray_tmp, ignore_errors=True)
