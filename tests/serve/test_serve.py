"""The Serve application over real HTTP on a real local Ray: one application shared by the module.

Tiny random adapters on the tiny Llama; the reference for every generated text is offline PEFT
generation (`Predictor`) or the same request sent alone. The application's args name a training config
(`config:`), which gives it its base model, store, active adapter and generation defaults.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import yaml

from madapt.bench.serve import publish_random_adapters
from madapt.lora import publish_random, random_adapter
from madapt.merge import MergeSpec, merge_and_publish
from madapt.models import load_base
from madapt.predict import Predictor
from madapt.serve.app import build_app
from madapt.serve.local import wait_ready
from madapt.store import WEIGHTS_FILE, AdapterStore
from tests.helpers import PERSON

pytestmark = pytest.mark.ray
APP = "madapt-test"
PROMPT = "Write a function that adds two numbers"
AS_PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
RETRY_S = 4.0
TTL_S = 0.5  # resolve_ttl_s: how long the ingress may serve a stale resolution
ACTIVE = "chat"
TOP_P = 0.5  # the training config's generation.top_p: the default of requests that do not set top_p


@pytest.fixture(scope="module")
def served(serve_url, tiny_model, other_tiny_model, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve-store")
    store = AdapterStore(str(root))
    base = load_base(tiny_model)
    publish_random_adapters(store, base, ["coding", "chat", "sql"], r=4)
    merge_and_publish(store, MergeSpec("coding_chat", ("chat", "coding"), (0.3, 0.7), "exact_linear"))
    config, tensors = random_adapter(base.model, r=4, seed=7)
    for name, default in (("extract", AS_PERSON), ("extract_free", None)):  # the same weights, one with a default
        store.publish(
            name, config, tensors, base_model=base.name, base_fingerprint=base.fingerprint, response_format=default
        )
    other = load_base(other_tiny_model)
    publish_random_adapters(store, other, ["alien"], r=4)
    publish_random_adapters(store, base, ["broken"], r=4)
    weights = next(root.glob(f"broken/1/{WEIGHTS_FILE}"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)

    training = tmp_path_factory.mktemp("training") / "train.yaml"
    adapters = {name: {"r": 4} for name in ("coding", "chat", "sql")}
    training.write_text(
        yaml.safe_dump(
            {
                "base_model": tiny_model,
                "adapters": {"adapters": adapters, "active": ACTIVE},
                "generation": {"top_p": TOP_P},
                "storage": {"uri": str(root)},
            }
        )
    )
    args = {
        "config": str(training),
        "active_for_unnamed": True,
        "max_adapters_per_replica": 2,
        "max_adapter_memory": "64MB",  # test_an_adapter_larger_than_the_budget_is_a_422_for_its_requests_only
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
    assert stats()["adapters"] == stats()["multiplexed"] == ["chat@1", "sql@1"]  # evicted from Serve's table too
    assert text(chat(url, "coding")) == alone["coding"]
    assert stats()["adapters"] == ["coding@1", "sql@1"]
    assert stats()["tiers"]["fetches"]["coding@1"] == 1  # every re-load came from the host tier


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
        ({"model": "coding", "n": 17}, 400, "n"),
        ({"model": "coding@" + "1" * 5000}, 400, "invalid adapter"),
        ({"model": "coding@\u0663"}, 400, "invalid adapter"),  # an Arabic-Indic digit
        ({"model": "coding", "seed": 10**200}, 400, "digits"),
        ({"model": "coding", "prompt": ["a"] * 65}, 400, "64 choices"),
        ({"model": "coding", "top_k": -3}, 400, "top_k"),
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

    # vendor fields madapt does not know are ignored and named; fields that change nothing are accepted
    raw = client.chat.completions.with_raw_response.create(
        messages=turns,
        **greedy,
        extra_body={"skip_special_tokens": False, "spaces_between_special_tokens": True},
        user="u1",
        store=False,
    )
    assert raw.headers["x-madapt-ignored-fields"] == "skip_special_tokens,spaces_between_special_tokens"
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
    assert main([*argv, "--naive-requests", "2", "--types", "rslora,dora,ln_tuning", "--out", str(tmp_path)]) == 0
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
    paths = {t["type"]: t["path"] for t in report["types"]}
    assert paths == {"rslora": "gathered", "dora": "per-adapter", "ln_tuning": "per-adapter"}
    assert all(t["alone_vs_base"] > 0 and t["with_lora_vs_base"] > 0 for t in report["types"])
    assert "| dora | per-adapter |" in (tmp_path / "serve.md").read_text()
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


def test_an_adapter_larger_than_the_budget_is_a_422_for_its_requests_only(served):
    url, store, base = served["url"], served["store"], served["base"]
    huge = publish_random(store, base, "huge", r=16384, targets=["gate_proj", "up_proj", "down_proj"])
    refused = chat(url, "huge")
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert f"adapter '{huge.ref}' needs" in message and "max_adapter_memory: 64,000,000 bytes" in message
    assert text(chat(url, "coding"))  # the replica keeps serving the others


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

    from madapt.store import releases

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


def test_default_is_the_active_adapter_of_the_training_config(served):
    """`model: default`, and a body that names no model, get the training config's `active` adapter;
    /v1/models lists `default` and what it points at."""
    from openai import OpenAI

    url = served["url"]
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    greedy = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "temperature": 0}
    active = client.chat.completions.with_raw_response.create(model=ACTIVE, **greedy)
    default = client.chat.completions.with_raw_response.create(model="default", **greedy)
    assert default.headers["x-madapt-adapter"] == active.headers["x-madapt-adapter"] == f"{ACTIVE}@1"
    said = active.parse().choices[0].message.content
    assert default.parse().choices[0].message.content == said and default.parse().model == "default"
    assert said != text(chat(url, "coding"))
    unnamed = requests.post(f"{url}/v1/chat/completions", json=greedy, timeout=120)
    assert text(unnamed) == said and unnamed.headers["x-madapt-adapter"] == f"{ACTIVE}@1"

    listed = {m.id: m for m in client.models.list().data}
    assert listed["default"].model_extra["active"] == ACTIVE and listed["default"].model_extra["default"] == "chat@1"
    assert client.models.retrieve("default").model_extra["active"] == ACTIVE


def test_generation_defaults_apply_to_requests_that_do_not_say(served):
    """The training config's generation.top_p is the top_p of a request that sets none."""
    body = {"model": "sql", "prompt": "Once", "max_tokens": 8, "temperature": 1.0, "seed": 11}

    def sampled(**extra) -> str:
        response = requests.post(f"{served['url']}/v1/completions", json={**body, **extra}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    assert sampled() == sampled(top_p=TOP_P) != sampled(top_p=1.0)


def openai_client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)


def test_n_choices_and_prompt_lists(served):
    """n=2 are two rows (choice j samples with seed + j); a prompt list is one choice per prompt, in order;
    usage sums them (each prompt counted once); streams carry each choice's index."""
    client = openai_client(served)
    turns = [{"role": "user", "content": PROMPT}]
    sampled = {"model": "chat", "messages": turns, "max_tokens": 6, "temperature": 1.0}
    both = client.chat.completions.create(**sampled, n=2, seed=5)
    alone = [client.chat.completions.create(**sampled, seed=s) for s in (5, 6)]
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.message.content for c in both.choices] == [a.choices[0].message.content for a in alone]
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(**sampled, n=2, seed=5, stream=True, stream_options={"include_usage": True})
    )
    streamed = {
        i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in (0, 1)
    }
    assert [streamed[0], streamed[1]] == [c.message.content for c in both.choices]
    assert chunks[-1].usage.completion_tokens == both.usage.completion_tokens  # the usage chunk sums them

    prompts = ["SELECT", "Once upon a time"]
    greedy = {"model": "sql@1", "max_tokens": 5, "temperature": 0}
    listed = client.completions.create(prompt=prompts, **greedy)
    singles = [client.completions.create(prompt=p, **greedy) for p in prompts]
    assert [c.text for c in listed.choices] == [s.choices[0].text for s in singles]
    assert listed.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    grid = client.completions.create(prompt=prompts, n=2, stream=True, **greedy)
    texts: dict[int, str] = {}
    for chunk in grid:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {i: singles[i // 2].choices[0].text for i in range(4)}  # choice i: prompt i // n


def offline_logprobs(model, ids: list[int], steps: int) -> list[tuple[int, torch.Tensor]]:
    """Greedy decoding with `model` offline: each step's token and the log-softmax it came from; the
    prompt's own rows first (as (token, log-softmax before it))."""
    sequence = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0].float(), dim=-1)
    return [(token, logprobs[k - 1]) for k, token in enumerate(sequence) if k]


def test_logprobs_equal_the_models_log_softmax_and_echo(served):
    from madapt.lora import attach
    from madapt.serve.openai.chat_template import chat_prompt

    client = openai_client(served)
    base = load_base(served["tiny_model"])
    tokenizer, peft = base.tokenizer, attach(base.model, served["store"].open("sql@1")).eval()  # PEFT, offline
    turns = [{"role": "user", "content": PROMPT}]
    ids = tokenizer(chat_prompt(tokenizer, turns), add_special_tokens=False).input_ids
    expected = offline_logprobs(peft, ids, 5)[len(ids) - 1 :]

    greedy = {"model": "sql@1", "max_tokens": 5, "temperature": 0}
    chat = client.chat.completions.create(messages=turns, logprobs=True, top_logprobs=2, **greedy)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    for entry, (token, reference) in zip(content, expected, strict=True):
        assert entry.token == tokenizer.decode([token]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(float(reference[token]), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in reference.topk(2).indices]
    stream = client.chat.completions.create(messages=turns, logprobs=True, top_logprobs=2, stream=True, **greedy)
    streamed = [
        e for chunk in stream if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    prompt = "SELECT name FROM"
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    reference = offline_logprobs(peft, prompt_ids, 3)
    echoed = client.completions.create(prompt=prompt, echo=True, logprobs=1, **{**greedy, "max_tokens": 3})
    choice = echoed.choices[0]
    generated = tokenizer.decode([t for t, _ in reference[len(prompt_ids) - 1 :]])
    assert choice.text == prompt + generated
    legacy = choice.logprobs
    assert legacy.tokens == [
        tokenizer.decode([t]) for t in prompt_ids + [t for t, _ in reference[len(prompt_ids) - 1 :]]
    ]
    assert legacy.token_logprobs[0] is None and legacy.top_logprobs[0] is None
    for got, (token, lp) in zip(legacy.token_logprobs[1:], reference, strict=True):
        assert got == pytest.approx(float(lp[token]), abs=1e-4)
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:k]) for k in range(len(legacy.tokens))]
    chunks = client.completions.create(prompt=prompt, echo=True, stream=True, **{**greedy, "max_tokens": 3})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_penalties_and_truncation_change_the_output_as_they_should(served):
    client = openai_client(served)
    base = {"model": "base", "prompt": "SELECT name FROM", "max_tokens": 16, "temperature": 0, "logprobs": 0}
    vendor = {"top_k", "min_p", "repetition_penalty"}  # vLLM's: the client sends them as extra_body

    def complete(**extra):
        fields = {**base, **extra}
        sent = {k: v for k, v in fields.items() if k not in vendor}
        return client.completions.create(**sent, extra_body={k: v for k, v in fields.items() if k in vendor})

    def distinct(**extra) -> int:
        return len(set(complete(**extra).choices[0].logprobs.tokens))

    plain = distinct()
    assert distinct(repetition_penalty=3.0) > plain
    assert distinct(presence_penalty=2.0) > plain > distinct(presence_penalty=-2.0)
    assert distinct(frequency_penalty=2.0) > plain

    def text(**extra) -> str:
        return complete(**extra).choices[0].text

    greedy = text()
    assert text(temperature=1.5, top_k=1, seed=1) == greedy == text(temperature=1.5, min_p=1.0, seed=2)
    assert text(temperature=1.5, seed=3) != greedy  # without them, sampling at 1.5 wanders off
    with ThreadPoolExecutor(3) as pool:  # a neighbour's penalties never change a greedy row
        together = list(pool.map(lambda extra: text(**extra), [{}, {"repetition_penalty": 3.0}, {}]))
    assert together[0] == together[2] == greedy != together[1]

    from openai import BadRequestError

    for field, value in [("top_k", -5), ("min_p", 2), ("presence_penalty", 3), ("repetition_penalty", 0)]:
        with pytest.raises(BadRequestError) as refused:
            complete(**{field: value})
        assert refused.value.param == field
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert refused.value.param == "top_logprobs"


def prometheus(timeout_s: float, *needles: str) -> str:
    """Ray's Prometheus endpoint on this node (its metrics export port), polled until every needle shows
    (Ray exports every few seconds)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + timeout_s
    while True:
        page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(n in page for n in needles) or time.monotonic() > deadline:
            return page
        time.sleep(1)


def test_metrics_are_on_rays_prometheus_endpoint(served):
    """The names docs/serving.md lists, as Prometheus shows them; latencies in seconds; bounded labels."""
    import re

    assert text(chat(served["url"], "chat")) and text(chat(served["url"], "sql@1"))
    shown = [
        "ray_madapt_time_to_first_token_seconds_bucket",
        "ray_madapt_request_latency_seconds_bucket",
        "ray_madapt_queue_time_seconds_bucket",
        "ray_madapt_request_tokens_bucket",
        "ray_madapt_queue_depth",
        "ray_madapt_running_rows",
        "ray_madapt_requests_total",
        "ray_madapt_tokens_total",
        "ray_madapt_adapter_cache_total",
        "ray_madapt_adapter_load_seconds_bucket",
        "ray_madapt_adapter_bytes",
        "ray_madapt_adapter_tier_loads_total",
        "ray_madapt_adapter_tier_load_seconds_bucket",
    ]
    page = prometheus(60, *shown, 'adapter="sql"')
    assert [n for n in shown if n not in page] == []
    first = re.findall(r'ray_madapt_time_to_first_token_seconds_count\{[^}]*adapter="chat"[^}]*\} ([0-9.e+]+)', page)
    assert first and float(first[0]) >= 1
    sums = re.findall(r"ray_madapt_request_latency_seconds_sum\{[^}]*\} ([0-9.e+]+)", page)
    counts = re.findall(r"ray_madapt_request_latency_seconds_count\{[^}]*\} ([0-9.e+]+)", page)
    assert 0 < sum(map(float, sums)) / sum(map(float, counts)) < 30  # seconds, not milliseconds
    adapters = set(re.findall(r'ray_madapt_requests_total\{[^}]*adapter="([^"]*)"', page))
    assert {"chat", "sql"} <= adapters and not any("@" in a for a in adapters)  # names, not versions
    held = dict(re.findall(r'ray_madapt_adapter_bytes\{[^}]*tier="(\w+)"[^}]*\} ([0-9.e+]+)', page))
    assert held.keys() == {"device", "host"} and float(held["device"]) > 0  # bytes per tier
    assert "store" in re.findall(r'ray_madapt_adapter_tier_loads_total\{[^}]*tier="(\w+)"', page)


def test_structured_output_validates_and_shares_the_batch(served):
    import jsonschema
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)  # @1: others publish @2

    def ask(model: str, prompt: str = "Describe a person", **extra):
        turns = [{"role": "user", "content": prompt}]
        return client.chat.completions.create(model=model, messages=turns, **{"max_tokens": 40, **extra}).choices[0]

    def person(choice) -> dict:
        assert choice.finish_reason == "stop", choice
        found = json.loads(choice.message.content)
        jsonschema.validate(found, PERSON)
        return found

    with ThreadPoolExecutor(4) as pool:  # constrained (greedy, sampled) and free rows in one batch
        jobs = [
            pool.submit(ask, "coding@1", response_format=AS_PERSON, temperature=0),
            pool.submit(ask, "chat@1", response_format=AS_PERSON, temperature=1.0, seed=3),
            pool.submit(ask, "coding@1", "hello", response_format={"type": "json_object"}, temperature=0),
            pool.submit(ask, "sql@1", temperature=0, max_tokens=8),
        ]
        greedy, sampled, anything, free = (job.result() for job in jobs)
    for choice in (greedy, sampled):
        person(choice)
    assert isinstance(json.loads(anything.message.content), dict) and anything.finish_reason == "stop"
    assert free.message.content == ask("sql@1", temperature=0, max_tokens=8).message.content
    assert person(greedy) == person(ask("coding@1", response_format=AS_PERSON, temperature=0))
    completion = client.completions.create(
        model="coding@1",
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(completion.choices[0].text), dict)

    # the adapter's default (its training config's decoder schema), and {"type": "text"} to turn it off
    person(ask("extract", temperature=0))
    unconstrained = ask("extract", temperature=0, max_tokens=8, response_format={"type": "text"})
    assert unconstrained.message.content == ask("extract_free", temperature=0, max_tokens=8).message.content

    with pytest.raises(BadRequestError) as bad:
        ask("coding", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}})
    assert bad.value.param == "response_format" and "cannot be enforced" in bad.value.message


def test_a_per_request_merge_serves_as_the_published_exact_linear_merge(served):
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)
    weights = {"coding@1": 0.7, "chat@1": 0.3}

    def ask(model: str, **extra):
        turns = [{"role": "user", "content": PROMPT}]
        return client.chat.completions.with_raw_response.create(
            model=model, messages=turns, max_tokens=12, temperature=0, **extra
        )

    def said(raw) -> str:
        return raw.parse().choices[0].message.content

    published = said(ask("coding_chat"))
    with ThreadPoolExecutor(3) as pool:  # the merge and plain adapters in one batch
        merged, plain, summed = pool.map(
            lambda job: ask(job[0], **job[1]),
            [("coding@1+chat@1", {"extra_body": {"adapters": weights}}), ("sql", {}), ("chat@1+coding@1", {})],
        )
    assert said(merged) == published != said(ask("coding@1"))
    assert merged.headers["x-madapt-adapter"] == "chat@1*0.3+coding@1*0.7"
    assert said(plain) == said(ask("sql"))
    assert summed.headers["x-madapt-adapter"] == "chat@1*1.0+coding@1*1.0" and said(summed) != published
    assert {"chat@1*0.3+coding@1*0.7", "chat@1*1.0+coding@1*1.0"} <= set(stats()["adapters"])

    refusals = [
        ("coding@1+chat@1", {"adapters": {"coding@1": 0.7}}, "adapters", BadRequestError),
        ("coding+chat+sql+extract+extract_free", {}, "model", BadRequestError),
        ("coding+base", {}, "model", BadRequestError),
        ("coding+nope", {}, "model", NotFoundError),
    ]
    for model, body, param, error in refusals:
        with pytest.raises(error) as refused:
            ask(model, extra_body=body)
        assert refused.value.param == param, refused.value.message


def test_a_per_request_dare_merge_serves_as_the_published_one_and_a_bad_merge_is_a_400(served):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)
    recipe = {"combination_type": "dare_ties", "density": 0.6, "seed": 5}
    merge_and_publish(served["store"], MergeSpec("coding_chat_dare", ("coding", "chat"), (0.7, 0.3), **recipe))

    def said(model: str, **extra) -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, **extra
        )
        completion = raw.parse()
        assert completion.model == model
        return completion.choices[0].text, raw.headers["x-madapt-adapter"]

    weights = {"coding": 0.7, "chat": 0.3}
    merged, recipe_id = said("coding+chat", extra_body={"adapters": weights, "merge": recipe})
    assert merged == said("coding_chat_dare")[0] != said("coding+chat", extra_body={"adapters": weights})[0]
    coding, chat = (served["store"].versions(name)[-1] for name in ("coding", "chat"))  # earlier tests publish
    assert recipe_id == f"dare_ties(coding@{coding}*0.7+chat@{chat}*0.3,density=0.6,majority_sign_method=total,seed=5)"
    with pytest.raises(BadRequestError) as refused:
        said("coding+chat", extra_body={"merge": {**recipe, "density": "high"}})
    assert refused.value.param == "merge.density", refused.value.message


def test_dora_ia3_oft_and_a_saved_lm_head_serve_beside_lora_in_one_replica_and_partial_adapters_are_422(served):
    """The per-adapter path and an adapter with modules_to_save over HTTP: each one's text equals PEFT's own
    greedy generation, alone and in a concurrent batch mixed with LoRA and base rows; an adapter that trains
    base biases (which serving would drop) is refused by name."""
    from openai import OpenAI
    from peft import LoraConfig, get_peft_model

    from madapt.bench.typed import publish_typed, typed_peft_model
    from madapt.lora import extract

    url, store, base = served["url"], served["store"], served["base"]
    kinds = {"dora": 1, "ia3": 2, "oft": 3}  # kind: seed
    prompt, tokens = "Once upon a time", 8
    ids = torch.tensor([base.tokenizer(prompt, add_special_tokens=False).input_ids])
    references = {}
    for kind, seed in kinds.items():
        publish_typed(store, base, f"typed_{kind}", kind, seed=seed)
        references[f"typed_{kind}"] = typed_peft_model(load_base(served["tiny_model"]).model, kind, seed=seed)
    saves_head = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    torch.manual_seed(4)
    references["saves_head"] = get_peft_model(load_base(served["tiny_model"]).model, saves_head).eval()
    head = references["saves_head"].base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(torch.randn_like(head))  # a trained head, well away from the base's
    config, tensors = extract(references["saves_head"], "default")
    store.publish("saves_head", config, tensors, base_model=base.name, base_fingerprint=base.fingerprint)
    expected = {}
    for name, reference in references.items():
        with torch.inference_mode():
            out = reference.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False)
        expected[name] = base.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")

    def complete(model: str) -> str:
        done = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0)
        return done.choices[0].text

    alone = {model: complete(model) for model in [*expected, "coding", "base"]}
    assert {m: alone[m] for m in expected} == expected
    assert len(set(alone.values())) == len(alone)  # every adapter changes the text
    with ThreadPoolExecutor(len(alone) * 2) as pool:
        together = list(pool.map(complete, list(alone) * 2))
    assert together == list(alone.values()) * 2

    bias = {"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.ones(64)}
    store.publish(
        "trains_bias",
        {**config, "bias": "all"},
        {**tensors, **bias},
        base_model=base.name,
        base_fingerprint=base.fingerprint,
    )
    refused = chat(url, "trains_bias")
    assert refused.status_code == 422, refused.text
    assert "trains_bias@1: bias='all' trains base biases" in refused.json()["error"]["message"]
    assert complete("typed_ia3") == alone["typed_ia3"]


def test_tool_calls_with_the_openai_client(served):
    """`required` and named calls valid against their schemas (grammar-constrained), whole and streamed;
    `auto` on a random model (which answers in text: the parse path is tests/serve/openai/test_tools.py);
    a call and its result in the history; malformed tools refused naming the field."""
    import jsonschema
    from openai import BadRequestError, OpenAI
    from openai.lib.streaming.chat import ChatCompletionStreamState

    from tests.serve.openai.test_tools import SCHEMAS, TOOLS

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)
    turns = [{"role": "user", "content": "What is the weather in Paris?"}]

    def ask(messages=turns, **extra):
        settings = {"max_tokens": 100, "temperature": 0, "tools": TOOLS, **extra}
        return client.chat.completions.create(model="coding@1", messages=messages, **settings)

    def valid_call(choice, name=None):
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        [call] = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in (name or SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        return call

    required = valid_call(ask(tool_choice="required", parallel_tool_calls=False).choices[0])
    valid_call(ask(tool_choice={"type": "function", "function": {"name": "get_time"}}).choices[0], "get_time")
    auto, none = (ask(max_tokens=8, tool_choice=choice).choices[0] for choice in ("auto", "none"))
    assert auto.message.tool_calls is None and auto.finish_reason in ("stop", "length")
    assert auto.message.content == none.message.content  # the same rendering; no call in the text

    state = ChatCompletionStreamState()
    for chunk in ask(tool_choice="required", parallel_tool_calls=False, stream=True):
        state.handle_chunk(chunk)
    streamed = valid_call(state.get_final_completion().choices[0])
    assert (streamed.function.name, streamed.function.arguments) == (
        required.function.name,
        required.function.arguments,
    )

    called = {"id": required.id, "type": "function", "function": required.function.model_dump()}
    history = [*turns, {"role": "assistant", "content": None, "tool_calls": [called]}]
    answered = ask([*history, {"role": "tool", "tool_call_id": required.id, "content": "18C, clear"}], max_tokens=4)
    assert answered.choices[0].finish_reason in ("stop", "length", "tool_calls")

    for extra, param in [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ]:
        with pytest.raises(BadRequestError) as bad:
            ask(**extra)
        assert bad.value.param == param, bad.value.message
