"""API keys over real HTTP: keys from a file and from an env var (a Ray runtime_env, as on a cluster), one
401 for every way of being wrong, checked before the body is read, on the API and its docs; /healthz stays
open."""

from __future__ import annotations

import pytest
import requests

from madapt.bench.serve import publish_random_adapters
from madapt.models import load_base
from madapt.serve.args import ServeArgs
from madapt.serve.ingress import OpenAIIngress
from madapt.serve.local import wait_ready
from madapt.serve.replica import AdapterServer
from madapt.store import AdapterStore

pytestmark = pytest.mark.ray
APP = "madapt-auth"
FILE_KEY, ENV_KEY = "file-key-0123456789", "env-key-9876543210"


@pytest.fixture(scope="module")
def url(serve_url, tiny_model, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("auth")
    store = AdapterStore(str(root / "store"))
    publish_random_adapters(store, load_base(tiny_model), ["coding"], r=4)
    keys = root / "api-keys"
    keys.write_text(f"# madapt keys\n{FILE_KEY}\n")
    settings = ServeArgs(
        base_model=tiny_model,
        store=store.uri,
        registry_detached=False,
        api_keys_file=str(keys),
        api_keys_env="MADAPT_TEST_API_KEYS",
    ).model_dump()
    ingress = OpenAIIngress.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"MADAPT_TEST_API_KEYS": ENV_KEY}}}
    )
    serve.run(ingress.bind(AdapterServer.bind(settings), settings), name=APP, route_prefix="/", blocking=False)
    wait_ready(serve_url, timeout_s=300, api_key=FILE_KEY)
    yield serve_url
    serve.delete(APP)


def test_keys_from_the_file_and_the_environment_work_with_the_openai_client(url):
    from openai import AuthenticationError, OpenAI

    for key in (FILE_KEY, ENV_KEY):
        client = OpenAI(base_url=f"{url}/v1", api_key=key)
        assert {"base", "coding"} <= {m.id for m in client.models.list().data}
        done = client.completions.create(model="coding", prompt="def add(", max_tokens=3, temperature=0)
        assert done.usage.completion_tokens == 3
        assert client.models.retrieve("coding").id == "coding"
    with pytest.raises(AuthenticationError) as refused:
        OpenAI(base_url=f"{url}/v1", api_key=FILE_KEY[:-1]).models.list()
    assert (refused.value.type, refused.value.code) == ("invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize(
    "authorization", [None, "", f"Basic {FILE_KEY}", f"Bearer {FILE_KEY}x", f"Bearer {FILE_KEY[:8]}", FILE_KEY]
)
def test_every_wrong_key_gets_the_same_401_before_the_body_is_read(url, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    answers = [
        requests.get(f"{url}/v1/models", headers=headers, timeout=60),
        requests.get(f"{url}/v1/models/coding", headers=headers, timeout=60),
        requests.post(f"{url}/v1/completions", data=b"{not json", headers=headers, timeout=60),
        requests.post(f"{url}/v1/chat/completions", data=b"x" * (2 << 20), headers=headers, timeout=60),
        *(requests.get(f"{url}{path}", headers=headers, timeout=60) for path in ("/docs", "/redoc", "/openapi.json")),
    ]
    for response in answers:
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json() == answers[0].json()
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert FILE_KEY[:8] not in response.text and "api-keys" not in response.text


def test_health_needs_no_key(url):
    assert requests.get(f"{url}/healthz", timeout=60).json() == {"status": "ok"}


def test_docs_with_a_key(url):
    key = {"Authorization": f"Bearer {ENV_KEY}"}
    assert "/v1/chat/completions" in requests.get(f"{url}/openapi.json", headers=key, timeout=60).json()["paths"]
    for path in ("/docs", "/redoc"):
        page = requests.get(f"{url}{path}", headers=key, timeout=60)
        assert page.status_code == 200 and "/openapi.json" in page.text
