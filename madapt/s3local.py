"""A real S3 server on loopback for tests and `madapt bench store`: moto's, in a thread of this process.

moto is a development dependency (`madapt[dev]`); nothing else in madapt imports this module.

Clients reach it over HTTP exactly as they would reach AWS (boto3 and pyarrow both honour
AWS_ENDPOINT_URL), so child processes can use it too. One fidelity fix: moto checks `If-None-Match: *`
and then stores the object in two steps, on a threaded server, so two concurrent conditional PUTs of one
key could both succeed where S3 answers one of them 412. `serve_s3` serialises moto's PUT handler so the
fake keeps the guarantee the adapter store's version claims rely on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

BUCKET = "madapt-test"


@contextlib.contextmanager
def applied(env: dict[str, str]) -> Iterator[None]:
    """Set `env` in os.environ (and drop AWS variables that could point elsewhere) until the context ends."""
    saved = dict(os.environ)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def serve_s3(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """Start moto's S3 server with `bucket` in it; yield the environment that points clients at it.

    The environment is returned, not applied: dummy credentials, a region, the endpoint, no config files
    (a developer's ~/.aws must not leak in) and no instance-metadata probing."""
    try:
        import boto3
        from moto.s3.responses import S3Response
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise RuntimeError("a local S3 server needs moto[server] and boto3: pip install 'madapt[dev,s3]'") from None

    original_put = S3Response.put_object
    lock = threading.Lock()

    def atomic_put(self):
        with lock:
            return original_put(self)

    S3Response.put_object = atomic_put  # type: ignore[method-assign]  # the fidelity fix above
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
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
        S3Response.put_object = original_put  # type: ignore[method-assign]
