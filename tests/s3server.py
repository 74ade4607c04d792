"""The S3 server of the tests: madapt.s3local's moto server, and a context that points this process at it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from madapt.s3local import BUCKET, applied, serve_s3

__all__ = ["BUCKET", "s3_environment", "serve_s3"]


@contextlib.contextmanager
def s3_environment(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """`serve_s3`, with its environment applied to this process until the context ends."""
    with serve_s3(bucket) as env, applied(env):
        yield env
