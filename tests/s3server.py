"""A real S3 server for tests: moto's, in a thread of the test process, on a free loopback port.

Clients reach it over HTTP exactly as they would reach AWS (boto3 and pyarrow both honour
AWS_ENDPOINT_URL), so child processes can use it too. One fidelity fix: moto checks `If-None-Match: *`
and then stores the object in two steps, on a threaded server, so two concurrent conditional PUTs of one
key could both succeed where S3 answers one of them 412. `serve_s3` serialises moto's PUT handler so the
fake keeps the guarantee the adapter store's version claims rely on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

BUCKET = "madapt-test"


@contextlib.contextmanager
def serve_s3(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """Start moto's S3 server with `bucket` in it; yield the environment that points clients at it.

    The environment is returned, not applied: dummy credentials, a region, the endpoint, no config files
    (a developer's ~/.aws must not leak in) and no instance-metadata probing."""
    import boto3
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    original_put = S3Response.put_object
    lock = threading.Lock()

    def atomic_put(self):
        with lock:
            return original_put(self)

    S3Response.put_object = atomic_put
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()
        S3Response.put_object = original_put


@contextlib.contextmanager
def s3_environment(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """`serve_s3`, with its environment applied to this process (and AWS variables that could point
    elsewhere removed) until the context ends."""
    import pytest

    with serve_s3(bucket) as env, pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            patch.delenv(key, raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        yield env
