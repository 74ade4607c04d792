"""The Serve application over real HTTP on a real local Ray: one application shared by the module.

Tiny random adapters on the tiny Llama; the reference for every generated text is offline PEFT
generation (`Predictor`) or the same request sent alone.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from madapt.bench.serve import publish_random_adapters
from madapt.lora import publish_random
from madapt.models import load_base
from madapt.predict import Predictor
from madapt.serve.app import build_app
from madapt.serve.local import wait_ready
from madapt.store import WEIGHTS_FILE, AdapterStore

pytestmark = pytest.mark.ray
APP = "madapt-test"
PROMPT = "Write a function that adds two numbers"
RETRY_S = 4.0
TTL_S = 0.5  # resolve_ttl_s: how long the ingress may serve a stale resolution


@pytest.fixture(scope="module")
def served(serve_url, tiny_model, other_tiny_model, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve-store")
    store = AdapterStore(str(root))
    base = load_base(tiny_model)
    publish_random_adapters(store, base, ["coding", "chat", "sql"], r=4)
    other = load_base(other_tiny_model)
    publish_random_adapters(store, other, ["alien"], r=4)
    publish_random_adapters(store, base, ["broken"], r=4)
    weights = next(root.glob(f"broken/1/{WEIGHTS_FILE}"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)

    args = {
        "base_model": tiny_model,
        "store": str(root),
        "max_adapters_per_replica": 2,
        "batch_wait_ms": 150,
        "max_batch_size": 4,
        "max_waiting": 6,  # 4 + 6 requests fill the replica: test_a_full_queue_answers_503_with_retry_after_at_once
        "registry_detached": False,
        "adapter_retry_s": RETRY_S,
        "resolve_ttl_s": TTL_S,
    }
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    url = serve_url
    wait_ready(url, timeout_s=300)
    yield {"url": url, "store": store, "root": root, "base": base, "tiny_model": tiny_model}
    serve.delete(APP)


def chat(url: str, model: str, prompt: str = PROMPT, **extra) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12}
    return requests.post(f"{url}/v1/chat/completions", json={**body, **extra}, timeout=120)


def text(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("AdapterServer", APP).stats.remote().result()


def test_greedy_text_equals_offline_peft_and_base_loads_once(served):
    predictor = Predictor(load_base(served["tiny_model"]), served["store"])
    for adapter in ("coding", "chat", "base"):
        assert text(chat(served["url"], adapter)).strip() == predictor.generate(PROMPT, adapter, max_new_tokens=12)
    assert text(chat(served["url"], "coding")) != text(chat(served["url"], "chat"))
    assert stats()["base_loads"] == 1


def test_openai_client_lists_completes_chats_and_streams(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused")
    models = {m.id: m for m in client.models.list().data}
    assert {"base", "coding", "chat", "sql"} <= models.keys()
    assert models["coding"].model_extra["versions"] == [1]

    done = client.completions.create(model="sql", prompt="SELECT", max_tokens=5, temperature=0)
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"

    whole = client.chat.completions.create(
        model="coding", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0
    )
    parts = client.chat.completions.create(
        model="coding", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in parts if chunk.choices)
    assert streamed == whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 0

    seeded = [
        client.completions.create(model="chat", prompt="Once", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
        for _ in range(2)
    ]
    assert seeded[0].choices[0].text == seeded[1].choices[0].text


def test_mixed_batch_rows_equal_single_requests_and_lru_keeps_two(served):
    url = served["url"]
    models = ["coding", "chat", "sql", "base"]
    alone = {m: text(chat(url, m)) for m in models}
    with ThreadPoolExecutor(len(models) * 2) as pool:
        together = list(pool.map(lambda m: text(chat(url, m)), models * 2))
    assert together == [alone[m] for m in models * 2]
    assert stats()["largest_batch"] >= 2

    for m in ("coding", "chat", "sql"):  # sql is the third: coding, the least recently used, goes
        text(chat(url, m))
    assert stats()["adapters"] == ["chat@1", "sql@1"]
    assert text(chat(url, "coding")) == alone["coding"]
    assert stats()["adapters"] == ["coding@1", "sql@1"]


def test_hot_copies_are_served_from_the_registry(served):
    import ray

    from madapt.serve.registry import get_registry

    registry = get_registry(str(served["root"]), detached=False)  # the app's registry: one per store URI
    found = ray.get(registry.fetch.remote("coding@1", served["base"].fingerprint))
    assert found["source"] == "object_store"
    _, tensors = ray.get(found["object"][0])
    stored = served["store"].open("coding@1")
    assert tensors.keys() == stored.tensors.keys()
    assert all(torch.equal(tensors[k], stored.tensors[k]) for k in tensors)


def test_adapters_published_while_serving_are_served(served):
    url, store, base = served["url"], served["store"], served["base"]
    assert chat(url, "fresh").status_code == 404
    publish_random_adapters(store, base, ["fresh"], r=4)
    time.sleep(TTL_S)  # the ingress caches resolution (the 404 too) for resolve_ttl_s
    assert text(chat(url, "fresh"))

    first = text(chat(url, "coding@1"))
    publish_random(store, base, "coding", r=4, seed=77)
    time.sleep(TTL_S)
    latest = text(chat(url, "coding"))
    assert latest == text(chat(url, "coding@2")) and latest != first
    assert text(chat(url, "coding@1")) == first
    header = requests.post(
        f"{url}/v1/chat/completions",
        json={
            "model": "ignored",
            "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0,
            "max_tokens": 12,
        },
        headers={"serve_multiplexed_model_id": "coding@1"},
        timeout=120,
    )
    assert text(header) == first


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope"}, 404, "'nope'"),
        ({"model": "../x"}, 400, "invalid adapter"),
        ({"model": ""}, 400, "invalid adapter"),
        ({"model": "x" * 65}, 400, "invalid adapter"),
        ({"model": "coding/../../etc"}, 400, "invalid adapter"),
        ({"model": "..%2Fcoding"}, 400, "invalid adapter"),
        ({"model": "cod\u0131ng"}, 400, "invalid adapter"),  # dotless i
        ({"model": "coding\u200b"}, 400, "invalid adapter"),  # zero-width space
        ({"model": "\uff43oding"}, 400, "invalid adapter"),  # full-width c
        ({"model": "coding\n"}, 400, "invalid adapter"),
        ({"model": "alien"}, 409, "alien@1"),
        ({"model": "broken"}, 422, "broken@1"),
        ({"model": "coding", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "coding", "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "coding", "max_tokens": 513}, 400, "limit of 512"),
        ({"model": "coding", "prompt": None}, 400, "prompt"),
        ({"model": "coding", "prompt": "word " * 600}, 400, "context length"),
        ({"model": "coding", "n": 2}, 400, "n"),
        ({"model": "coding@" + "1" * 5000}, 400, "invalid adapter"),
        ({"model": "coding@\u0663"}, 400, "invalid adapter"),  # an Arabic-Indic digit
        ({"model": "coding", "seed": 10**200}, 400, "digits"),
        ({"model": "coding", "prompt": ["a", "b"]}, 400, "one request per prompt"),
        ({"model": "coding", "echo": True}, 400, "echo"),
    ],
)
def test_bad_requests_get_json_errors_and_others_keep_serving(served, body, status, needle):
    request = {"prompt": "hello", "max_tokens": 4, **body}
    if request["prompt"] is None:
        del request["prompt"]
    response = requests.post(f"{served['url']}/v1/completions", json=request, timeout=120)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error.keys() == {"message", "type", "param", "code"} and isinstance(error["code"], str)
    assert error["type"] == "invalid_request_error"
    message = error["message"]
    assert needle in message
    assert str(served["root"]) not in message and str(Path.home()) not in message
    assert text(chat(served["url"], "chat"))


def test_malformed_json_is_a_400_and_health_is_ok(served):
    response = requests.post(f"{served['url']}/v1/completions", data=b"{not json", timeout=60)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert requests.get(f"{served['url']}/healthz", timeout=60).json() == {"status": "ok"}
    assert requests.get(f"{served['url']}/readyz", timeout=60).json() == {"status": "ready"}


def test_a_full_queue_answers_503_with_retry_after_at_once(served):
    """4 rows decoding + 6 waiting fill the replica (max_batch_size, max_waiting): the next request is refused
    at once with Retry-After, never left to hang; once the streams hang up, the replica serves again."""
    url = served["url"]
    long = {"model": "base", "prompt": "hi", "max_tokens": 480, "stream": True}
    short = {"model": "base", "prompt": "hi", "max_tokens": 1}

    def open_stream(_: int) -> requests.Response:
        return requests.post(f"{url}/v1/completions", json=long, stream=True, timeout=120)

    with ThreadPoolExecutor(10) as pool:
        streams = list(pool.map(open_stream, range(10)))  # headers come once each row is in the batcher
    try:
        assert [s.status_code for s in streams] == [200] * 10, [s.text for s in streams if s.status_code != 200]
        started = time.monotonic()
        full = requests.post(f"{url}/v1/completions", json=short, timeout=60)
        assert time.monotonic() - started < 10
        assert full.status_code == 503, full.text
        assert full.headers["retry-after"] == "1" and "decoding or waiting" in full.json()["error"]["message"]
    finally:
        for stream in streams:
            stream.close()
    deadline = time.monotonic() + 60
    while (again := requests.post(f"{url}/v1/completions", json=short, timeout=60)).status_code == 503:
        assert time.monotonic() < deadline, "the cancelled streams never left the replica"
        time.sleep(0.5)
    assert again.status_code == 200, again.text


def test_hostile_bodies_and_ids_are_400s(served):
    url = served["url"]
    hostile = {
        b"[" * 100_000 + b"]" * 100_000: "nesting_too_deep",
        b'{"model": "coding", "prompt": "hi", "seed": 1' + b"0" * 5000 + b"}": "number_too_long",
    }
    for body, code in hostile.items():
        response = requests.post(f"{url}/v1/completions", data=body, timeout=60)
        assert (response.status_code, response.json()["error"]["code"]) == (400, code), response.text
    long_id = {"serve_multiplexed_model_id": "coding@" + "1" * 5000}
    response = requests.post(f"{url}/v1/chat/completions", json=chat_body("coding"), headers=long_id, timeout=60)
    assert response.status_code == 400 and "invalid adapter" in response.json()["error"]["message"]
    assert requests.get(f"{url}/v1/models/coding@{'9' * 5000}", timeout=60).status_code == 400
    for method, path, status in (("GET", "/v1/nope", 404), ("PUT", "/v1/models", 405)):
        error = requests.request(method, f"{url}{path}", timeout=60).json()["error"]
        assert error["type"] == "invalid_request_error" and path in error["message"], (status, error)


def chat_body(model: str, prompt: str = PROMPT) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}


def test_openai_client_as_clients_use_it(served):
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)
    turns = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}]
    greedy = {"model": "sql", "temperature": 0, "max_tokens": 8}

    def answer(messages, **extra):
        return client.chat.completions.create(messages=messages, **{**greedy, **extra})

    reference = answer(turns)
    said = reference.choices[0].message.content

    # vendor fields (vLLM's top_k, ...) are ignored and named; fields that change nothing are accepted
    raw = client.chat.completions.with_raw_response.create(
        messages=turns, **greedy, extra_body={"top_k": 5, "repetition_penalty": 1.1}, user="u1", store=False
    )
    assert raw.headers["x-madapt-ignored-fields"] == "repetition_penalty,top_k"
    assert raw.parse().choices[0].message.content == said
    assert (
        "x-madapt-ignored-fields"
        not in client.chat.completions.with_raw_response.create(messages=turns, **greedy).headers
    )

    # the developer role is the system role; text parts are joined with newlines
    assert answer([{"role": "developer", "content": "You are terse."}, turns[1]]).choices[0].message.content == said
    first, _, rest = PROMPT.partition(" that ")
    parts = [{"type": "text", "text": first}, {"type": "text", "text": "that " + rest}]
    joined = answer([turns[0], {"role": "user", "content": f"{first}\nthat {rest}"}]).choices[0].message.content
    assert answer([turns[0], {"role": "user", "content": parts}]).choices[0].message.content == joined

    # max_completion_tokens wins over max_tokens
    capped = answer(turns, max_completion_tokens=3)
    assert capped.usage.completion_tokens == min(3, reference.usage.completion_tokens)
    assert said.startswith(capped.choices[0].message.content)

    # without a budget, chat generates what fits the context (512 tokens for the tiny model)
    long = answer([{"role": "user", "content": "word " * 470}], max_tokens=None)
    if long.choices[0].finish_reason == "length":
        assert long.usage.prompt_tokens + long.usage.completion_tokens == 512
    with pytest.raises(BadRequestError) as full:
        answer([{"role": "user", "content": "word " * 490}], max_tokens=None)
    assert full.value.code == "context_length_exceeded"

    # refusals and errors in OpenAI's shape, as the client reads them
    with pytest.raises(BadRequestError) as image:
        answer([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}])
    assert (image.value.param, image.value.code) == ("messages.0.content", "unsupported_value")
    assert "'image_url'" in image.value.message
    with pytest.raises(NotFoundError) as missing:
        answer(turns, model="nope")
    assert (missing.value.type, missing.value.code, missing.value.param) == (
        "invalid_request_error",
        "model_not_found",
        "model",
    )
    with pytest.raises(NotFoundError) as route:
        client.embeddings.create(model="sql", input="hi")  # a route madapt does not serve
    assert (route.value.type, route.value.code) == ("invalid_request_error", "unknown_url")

    # one model by id; a stray directory in the store does not break the listing
    assert client.models.retrieve("sql").model_extra["versions"] == [1]
    assert client.models.retrieve("sql@1").id == "sql@1"
    with pytest.raises(NotFoundError) as gone:
        client.models.retrieve("nope")
    assert gone.value.code == "model_not_found"
    stray = served["root"] / "lost+found"
    stray.mkdir()
    try:
        assert {"base", "sql", "chat"} <= {m.id for m in client.models.list().data}
    finally:
        stray.rmdir()
    assert "/v1/models/{model_id}" in requests.get(f"{served['url']}/openapi.json", timeout=60).json()["paths"]


def test_bench_serve_short_run(ray_cluster, tiny_model, tmp_path):
    from madapt.bench.serve import main

    argv = ["--base", tiny_model, "--adapters", "1,2", "--concurrency", "4", "--rounds", "1", "--new-tokens", "3"]
    assert main([*argv, "--naive-requests", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report["cold_load"]["store_ms"] > 0 and report["cold_load"]["object_store_ms"] > 0
    assert [(r["adapters"], r["popularity"]) for r in report["runs"]] == [
        (n, p) for n in (1, 2) for p in ("uniform", "skewed")
    ]
    for run in report["runs"]:
        assert run["vs_base"] == pytest.approx(run["madapt"]["tok_per_s"] / run["base"]["tok_per_s"])
        assert run["naive"]["tok_per_s"] > 0 and run["peft_mixed"]["tok_per_s"] > 0
        assert run["vs_hf"] == pytest.approx(run["madapt"]["tok_per_s"] / run["hf_generate"]["tok_per_s"])
        assert run["madapt_continuous"]["tok_per_s"] > 0
    assert "| 2 (" in (tmp_path / "serve.md").read_text()
    assert (tmp_path / "serve.png").stat().st_size > 1000


def test_oversize_bodies_are_413_with_or_without_a_length(served):
    body = json.dumps({"model": "coding", "prompt": "word " * 300_000, "max_tokens": 1}).encode()  # 1.5 MB
    declared = requests.post(f"{served['url']}/v1/completions", data=body, timeout=60)
    chunked = requests.post(f"{served['url']}/v1/completions", data=iter([body[:1000], body[1000:]]), timeout=60)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert "limit of 1048576 bytes" in response.json()["error"]["message"]
    assert text(chat(served["url"], "chat"))


def test_a_failed_adapter_load_is_remembered_then_retried(served):
    url, store, root = served["url"], served["store"], served["root"]
    publish_random_adapters(store, served["base"], ["flaky"], r=4)
    weights = next(root.glob(f"flaky/1/{WEIGHTS_FILE}"))
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + b"\x00" * 8)  # a store hiccup: the file is wrong for a while

    first = chat(url, "flaky")
    assert first.status_code == 422 and "checksum" in first.json()["error"]["message"]
    weights.write_bytes(good)
    again = chat(url, "flaky")  # not re-read: the failure is remembered
    assert again.status_code == 422 and "tried again in" in again.json()["error"]["message"]
    assert stats()["load_attempts"]["flaky@1"] == 1
    assert text(chat(url, "chat"))  # others keep serving meanwhile

    time.sleep(RETRY_S)
    assert text(chat(url, "flaky"))
    assert stats()["load_attempts"]["flaky@1"] == 2


def test_a_dead_registry_is_replaced(served):
    import ray

    from madapt.serve.registry import get_registry

    ray.kill(get_registry(str(served["root"]), detached=False), no_restart=True)
    publish_random_adapters(served["store"], served["base"], ["phoenix"], r=4)
    assert text(chat(served["url"], "phoenix"))  # loading it needs the registry: a new one is started


def test_releases_and_an_ab_split_on_the_running_server(served):
    """Tag, promote, rollback, split and delete through the store take effect within resolve_ttl_s; a 50/50
    split sends different users to both arms and each user always to the same one (the seed's A/B test)."""
    from ray import serve

    from madapt import releases

    url, store, base = served["url"], served["store"], served["base"]
    publish_random(store, base, "ab", r=4, seed=1)
    publish_random(store, base, "ab", r=4, seed=2)

    def served_by(model: str, user: str | None = None) -> str:
        body = {"model": model, "prompt": "hi", "max_tokens": 1, **({"user": user} if user else {})}
        response = requests.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.headers["x-madapt-adapter"]

    def settle() -> None:
        time.sleep(TTL_S + 0.1)

    assert served_by("ab") == "ab@2"
    releases.promote(store, "ab@1")
    releases.tag(store, "ab@2", "candidate")
    settle()
    assert served_by("ab") == "ab@1" == served_by("ab@prod") and served_by("ab@candidate") == "ab@2"

    releases.set_split(store, "ab", {"ab@prod": 50, "ab@candidate": 50})
    settle()
    users = [f"user-{i}" for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        first = dict(zip(users, pool.map(lambda u: served_by("ab", u), users), strict=True))
        again = dict(zip(users, pool.map(lambda u: served_by("ab", u), users), strict=True))
    assert set(first.values()) == {"ab@1", "ab@2"} and first == again
    per_arm = serve.get_deployment_handle("OpenAIIngress", APP).split_stats.remote().result()
    assert per_arm["ab|ab@prod|200"] + per_arm["ab|ab@candidate|200"] == 2 * len(users)
    card = requests.get(f"{url}/v1/models", timeout=60).json()["data"]
    ab = next(c for c in card if c["id"] == "ab")
    assert ab["split"] == {"ab@candidate": 50, "ab@prod": 50}
    assert ab["aliases"] == {"candidate": "ab@2", "prod": "ab@1"} and ab["version"] == 1 and ab["versions"] == [1, 2]

    assert requests.get(f"{url}/v1/models/ab@candidate", timeout=60).json()["version"] == 2

    releases.clear_split(store, "ab")
    releases.rollback(store, "ab")  # prod was not set before: `ab` is the newest again
    settle()
    assert served_by("ab") == "ab@2"
    missing = requests.post(f"{url}/v1/completions", json={"model": "ab@prod", "prompt": "hi"}, timeout=60)
    assert missing.status_code == 404 and "no label 'prod'" in missing.json()["error"]["message"]

    assert served_by("ab@1") == "ab@1"  # a replica now holds ab@1 in its multiplexing LRU
    store.delete("ab@1")
    settle()
    gone = requests.post(f"{url}/v1/completions", json={"model": "ab@1", "prompt": "hi"}, timeout=60)
    assert gone.status_code == 404, gone.text
    assert "ab@1 was deleted" in gone.json()["error"]["message"] and gone.json()["error"]["code"] == "model_not_found"
    assert "ab@1" in stats()["adapters"]  # still in the replica's LRU: the ingress refused it before routing
