"""Train -> merge -> serve with everything on moto's S3 server over loopback: the adapter store, Ray Train's
run storage (checkpoints) and the datasets are s3:// URIs. The session's Ray cluster starts before the
S3 environment exists, as cluster nodes that know nothing of the driver's endpoint and keys: every Ray
process madapt starts (Train workers, Ray Data read tasks, the merger, Serve replicas) must get them
forwarded. One Ray Train fit (`coding`; `chat` trains in-process on the same s3:// data), one merge on the
merger actor, one Serve application."""

from __future__ import annotations

import uuid

import boto3
import pytest
import yaml
from openai import OpenAI

from madapt.cli import main
from madapt.config import parse_config
from madapt.models import load_base
from madapt.predict import Predictor
from madapt.serve.app import build_app
from madapt.serve.local import wait_ready
from madapt.store import AdapterStore
from madapt.train.local import train_local
from tests.helpers import EXAMPLES, tiny_config
from tests.s3server import BUCKET, s3_environment

pytestmark = [pytest.mark.ray, pytest.mark.slow]
APP = "madapt-s3"
PROMPT = "Write a function that adds two numbers"


@pytest.fixture(scope="module")
def s3_env(ray_cluster):
    """moto's S3 server, applied to this process only after Ray has started (hence `ray_cluster` first)."""
    with s3_environment() as env:
        yield env


def s3_config(tiny_model: str, prefix: str) -> dict:
    """Two adapters and their merge, 2 steps each (a checkpoint after step 1 on Ray Train), all on s3://."""
    s3 = boto3.client("s3")
    document = tiny_config(tiny_model, f"s3://{BUCKET}/{prefix}/store")
    for name, adapter in document["adapters"]["adapters"].items():
        key = f"{prefix}/data/{name}.jsonl"
        s3.put_object(Bucket=BUCKET, Key=key, Body=(EXAMPLES / "data" / f"{name}.jsonl").read_bytes())
        adapter["dataset"] = f"s3://{BUCKET}/{key}"
    document["trainer"]["max_steps"] = 2
    document["backend"] = {
        "type": "ray",
        "trainer": {"checkpoint_every": 1, "storage_path": f"s3://{BUCKET}/{prefix}/runs"},
    }
    return document


def test_train_merge_and_serve_from_s3(s3_env, serve_url, tiny_model, tmp_path):
    from ray import serve

    prefix = uuid.uuid4().hex[:12]
    document = s3_config(tiny_model, prefix)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(document))
    assert main(["train", str(config_path), "--adapter", "coding", "--no-merge", "--quiet"]) == 0
    store = AdapterStore(document["storage"]["uri"])
    train_local(parse_config(document), "chat", store, progress=False)
    assert main(["merge", str(config_path), "--no-eval"]) == 0

    assert store.names() == ["both", "chat", "coding"]
    metrics = store.manifest("coding").metrics
    assert metrics["backend"] == "ray" and metrics["steps_trained"] == [1, 2]
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/runs/{metrics['run']}/")
    folders = {item["Key"].split("/")[3] for item in listed.get("Contents", []) if item["Key"].count("/") > 3}
    assert len({f for f in folders if f.startswith("checkpoint_")}) == 2  # after step 1, and the final one
    lineage = store.manifest("both").lineage
    assert lineage is not None and [s["name"] for s in lineage["sources"]] == ["coding", "chat"]

    args = {"base_model": tiny_model, "store": store.uri, "registry_detached": False, "resolve_ttl_s": 0.5}
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    try:
        wait_ready(serve_url, timeout_s=300)
        client = OpenAI(base_url=f"{serve_url}/v1", api_key="unused")
        assert {"base", "coding", "chat", "both"} <= {m.id for m in client.models.list().data}
        predictor = Predictor(load_base(tiny_model), store)
        for name in ("coding", "both"):
            answer = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
            )
            assert answer.model.startswith(name)
            assert answer.choices[0].message.content.strip() == predictor.generate(PROMPT, name, max_new_tokens=8)
    finally:
        serve.delete(APP)
