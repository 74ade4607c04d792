"""The HTTP layer's parts that need no Ray: errors in OpenAI's shape for routes that do not exist or
methods a route does not take, a models listing that skips store entries it cannot read, model ids with
labels, and the end of a stream observed for the split metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from madapt.bench.serve import publish_random_adapters
from madapt.serve.ingress import api
from madapt.serve.openai.errors import ProtocolError
from madapt.serve.openai.parsing import _check_requested
from madapt.serve.openai.serving import _observed, _status
from madapt.serve.openai.serving_models import _skip, _skipped, _store_refusal
from madapt.store import AdapterNotFound, AdapterStore, StoreError
from madapt.store.releases import Resolver


@pytest.fixture(scope="module")
def client():
    return TestClient(api, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nope", 404, "unknown_url"),
        ("POST", "/v2/chat/completions", 404, "unknown_url"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods_answer_in_openai_shape(client, method, path, status, code):
    response = client.request(method, path)
    assert response.status_code == status
    assert response.json() == {
        "error": {"message": response.json()["error"]["message"], "type": "invalid_request_error", "param": None,
                  "code": code}
    }  # fmt: skip
    assert path in response.json()["error"]["message"]
    if status == 405:
        assert response.headers["allow"]


def test_the_listing_skips_entries_it_cannot_read(tmp_path, base, caplog):
    store = AdapterStore(str(tmp_path / "store"))
    publish_random_adapters(store, base, ["coding", "sql"], r=4)
    (tmp_path / "store" / "lost+found").mkdir()  # what mkfs leaves at a volume's root
    (tmp_path / "store" / "stray.txt").write_text("x")
    manifest = tmp_path / "store" / "sql" / "1" / "manifest.json"
    manifest.write_text("{not json")
    _skipped.clear()
    with caplog.at_level("WARNING", logger="madapt.serve.openai.serving_models"):
        for _ in range(2):  # what /v1/models lists: each unreadable entry skipped, and logged once
            assert [card["id"] for card in Resolver(store, ttl_s=0).cards(_skip)] == ["coding"]
    skipped = [r.getMessage() for r in caplog.records]
    assert any("sql" in line for line in skipped)
    assert len(skipped) == len(set(skipped))  # each entry logged once


def test_store_errors_become_model_errors():
    missing = _store_refusal(AdapterNotFound("adapter 'x' is not in the store")).body()["error"]
    assert (missing["type"], missing["code"], missing["param"]) == ("invalid_request_error", "model_not_found", "model")
    assert _store_refusal(StoreError("invalid adapter reference")).status == 400


def test_model_ids_may_name_labels():
    for ok in ("coding", "coding@3", "coding@latest", "coding@prod", "coding@bad label"):  # labels: the resolver
        assert _check_requested(ok) == ok
    for bad in ("coding@" + "1" * 5000, "coding@\u0663", "x" * 101, "coding@" + "p" * 200, "cod\u0131ng@prod"):
        with pytest.raises(ProtocolError) as refused:
            _check_requested(bad)
        assert refused.value.status == 400 and "invalid adapter" in refused.value.message


def test_a_streams_end_is_observed_however_it_ends():
    import asyncio

    async def events(*items):
        for item in items:
            yield item

    async def consume(stream, stop_after=None):
        seen = []
        async for event in stream:
            seen.append(event)
            if len(seen) == stop_after:
                await stream.aclose()
                break
        return seen

    ends = []
    done = [{"index": 0, "text": "a"}, {"index": 0, "finish_reason": "stop"}, {"usage": {"completion_tokens": 1}}]
    assert asyncio.run(consume(_observed(events(*done), ends.append))) == done
    asyncio.run(consume(_observed(events({"status": 503, "error": "gone"}), ends.append)))
    asyncio.run(consume(_observed(events(*done), ends.append), stop_after=1))  # the client went away
    assert [_status(last) for last in ends] == ["200", "503", "499"]
