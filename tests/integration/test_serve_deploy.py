"""The shipped serve config, deployed with `serve deploy` on a real `ray start --head` cluster, answers over
HTTP; only its model, store and port are changed, as on a real cluster."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml

from madapt.bench.serve import publish_random_adapters
from madapt.models import load_base
from madapt.store import AdapterStore
from tests.helpers import ROOT

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
