"""pyarrow filesystems for store URIs (a path, file://, s3://, gs://); data and tracking read through them too."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from madapt.compat.pyarrow import s3_options


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and root path (no trailing slash) for a path or a file://, s3:// or gs:// URI.

    On S3 the endpoint comes from the URI's `endpoint_override` or else AWS_ENDPOINT_URL, as in boto3."""
    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return fs, root.rstrip("/")


def portable_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """filesystem_for(uri), made to work the same in a process that lacks this one's environment.

    pyarrow pickles an S3 filesystem with its endpoint (AWS_ENDPOINT_URL included) but without keys it found
    in the environment, so Ray Train's controller, its workers and Ray Data's read tasks would reach the
    right server as nobody; keys from AWS_ACCESS_KEY_ID and friends are therefore made explicit. Keys from
    elsewhere (a profile, an instance role) stay with each node's own credential chain."""
    fs, root = filesystem_for(uri)
    keys = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if fs.type_name == "s3" and all(keys):
        options = s3_options(fs)
        if not options.get("access_key"):
            options.update(access_key=keys[0], secret_key=keys[1], session_token=os.environ.get("AWS_SESSION_TOKEN"))
            fs = pafs.S3FileSystem(**options)
    return fs, root
