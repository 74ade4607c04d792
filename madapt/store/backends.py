"""Create-if-absent, the one atomic write each backend offers, and the conditional replace records need.

Local disk: O_EXCL creates, and records under an exclusive `flock`, landed by rename. S3: boto3's
`put_object(IfNoneMatch="*")` and `If-Match: <etag>`. GCS: google-cloud-storage's `ifGenerationMatch`.
Why not pyarrow.fs: it cannot write conditionally. `FileSystem` has no create-exclusive call, and
`open_output_stream(metadata=...)` on S3 passes on only ACL, Cache-Control, Content-Type,
Content-Language and Expires, silently dropping other keys (checked with pyarrow 26.0.1 against moto:
an `If-None-Match: *` entry is ignored and a second write overwrites the first). So the object-store
backends write through their vendor's client (imported on the first write: extras `madapt[s3]`,
google-cloud-storage) and the store reads and lists through pyarrow. boto3 and pyarrow find credentials
the same way (AWS_ACCESS_KEY_ID and friends, AWS_PROFILE, instance roles) and both honour
AWS_ENDPOINT_URL; the URI's `region`, `endpoint_override` and `scheme` options and
`s3://KEY:SECRET@bucket/...` user info are passed to boto3 as well (`s3_client_options`).

GCS is tested against fake-gcs-server on loopback, which checks the preconditions as GCS does
(gcp-storage-emulator's upload handlers ignore them). Any other pyarrow filesystem has no backend here:
a store on it is read-only.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow.fs as pafs

from madapt.store.errors import StoreError

LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")  # S3 codes of a conditional PUT
MAX_RECORD_BYTES = 1 << 20  # records are a few hundred bytes; anything near this is not one of ours


class LocalFiles:
    """O_EXCL creates; on a local disk the store publishes by rename and needs these only for tombstones."""

    def create(self, path: str, data: bytes) -> bool:
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    @contextlib.contextmanager
    def exclusive(self, path: str) -> Iterator[None]:
        """Hold an exclusive flock on a hidden lock file next to `path` (one read-modify-write at a time)."""
        import fcntl

        folder, base = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        descriptor = os.open(os.path.join(folder, f".{base}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def read_for_update(self, path: str) -> tuple[bytes | None, Any]:
        try:
            with open(path, "rb") as handle:
                return handle.read(MAX_RECORD_BYTES + 1), None
        except FileNotFoundError:
            return None, None

    def replace(self, path: str, data: bytes, tag: Any) -> bool:
        """Under `exclusive`: write a temporary file and rename it over `path` (readers see old or new)."""
        folder, base = os.path.split(path)
        temporary = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
        try:
            write_synced(temporary, data)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
        fsync_dir(folder)
        return True


class _VendorClient:
    """An object store reached through its vendor's client, made on the first write (reading a store never
    needs it) and left out when the store is pickled (a client does not pickle; a store is sent to Ray tasks)."""

    _client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # rebuilt on first use

    def exclusive(self, path: str) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # the conditional write in `replace` is the guard


class S3Objects(_VendorClient):
    """`put_object(IfNoneMatch="*")` through boto3, which pyarrow.fs cannot send (see this module's docstring)."""

    def __init__(self, options: dict[str, str]) -> None:
        self.options = options

    def _connect(self) -> Any:
        try:
            import boto3
        except ImportError:
            raise StoreError("publishing to s3:// needs boto3: pip install 'madapt[s3]'") from None
        return boto3.client("s3", **self.options)

    def create(self, path: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        for attempt in range(5):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code")
                if code == "PreconditionFailed":
                    return False
                if code != "ConditionalRequestConflict":  # S3's 409: a concurrent conditional PUT; retry
                    raise
            time.sleep(0.05 * 2**attempt)
        raise StoreError(f"{path}: conditional write kept conflicting with concurrent writes")

    def remove(self, path: str) -> None:
        """Through boto3 too: pyarrow's delete_file puts a directory marker after every delete."""
        bucket, _, key = path.partition("/")
        self.client.delete_object(Bucket=bucket, Key=key)  # S3 answers 204 for a missing key as well

    def read_for_update(self, path: str) -> tuple[bytes | None, Any]:
        """The object and its ETag, or (None, None) when it does not exist."""
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        try:
            answer = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return answer["Body"].read(MAX_RECORD_BYTES + 1), answer["ETag"]

    def replace(self, path: str, data: bytes, tag: Any) -> bool:
        """PUT `If-Match: tag` (`If-None-Match: *` when tag is None); False when another writer got in first."""
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as error:  # 412: changed; 409: a concurrent conditional PUT; 404: deleted meanwhile
            if error.response.get("Error", {}).get("Code") in LOST_RACE:
                return False
            raise
        return True


class GcsObjects(_VendorClient):
    """`ifGenerationMatch=0` uploads through google-cloud-storage, which pyarrow.fs cannot send either."""

    def _connect(self) -> Any:
        try:
            from google.cloud import storage
        except ImportError:
            raise StoreError("publishing to gs:// needs google-cloud-storage (pip install it)") from None
        return storage.Client()

    def create(self, path: str, data: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        bucket, _, key = path.partition("/")
        try:
            self.client.bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
        except PreconditionFailed:
            return False
        return True

    def remove(self, path: str) -> None:
        from google.api_core.exceptions import NotFound

        bucket, _, key = path.partition("/")
        with contextlib.suppress(NotFound):
            self.client.bucket(bucket).blob(key).delete()

    def read_for_update(self, path: str) -> tuple[bytes | None, Any]:
        from google.api_core.exceptions import NotFound

        bucket, _, key = path.partition("/")
        blob = self.client.bucket(bucket).blob(key)
        try:
            data = blob.download_as_bytes()
        except NotFound:
            return None, None
        return data, blob.generation

    def replace(self, path: str, data: bytes, tag: Any) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        bucket, _, key = path.partition("/")
        try:
            self.client.bucket(bucket).blob(key).upload_from_string(data, if_generation_match=tag or 0)
        except PreconditionFailed:
            return False
        return True


def s3_client_options(uri: str | None, fs: pafs.FileSystem) -> dict[str, str]:
    """boto3 options matching what pyarrow took from the URI, so both talk to one bucket as one user."""
    options = {"region_name": fs.region} if getattr(fs, "region", None) else {}
    if uri is None:
        return options
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    if "region" in query:
        options["region_name"] = query["region"]
    if "endpoint_override" in query:
        endpoint = query["endpoint_override"]
        options["endpoint_url"] = endpoint if "://" in endpoint else f"{query.get('scheme', 'https')}://{endpoint}"
    if parts.username:
        options["aws_access_key_id"] = unquote(parts.username)
        options["aws_secret_access_key"] = unquote(parts.password or "")
    return options


Objects = LocalFiles | S3Objects | GcsObjects


def exclusive_creator(fs: pafs.FileSystem, uri: str | None) -> Objects | None:
    """The create-if-absent for `fs`, or None where there is none (that store is read-only)."""
    if fs.type_name == "local":
        return LocalFiles()
    if fs.type_name == "s3":
        return S3Objects(s3_client_options(uri, fs))
    if fs.type_name == "gcs":
        return GcsObjects()
    return None


def write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a crash right after could otherwise lose the new version)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
