"""The publish protocol: how a new version number is taken, so that exactly one publisher gets each.

A version number is *issued* once anything exists under `<name>/<version>/`, and is never issued again:
a publisher starts from max(issued) + 1. A version is *published* while it has a manifest and no
tombstone; readers see published versions only. Every publisher must follow the protocol below (a
madapt older than it wrote object stores without claims).

Publishing on a local filesystem (`publish_by_rename`): the whole version (manifest included) is written
and fsynced in a hidden staging directory next to the versions, then renamed to `<name>/<N>`. rename(2) of
a directory fails when the target exists and is not empty, so exactly one publisher gets N; the others
take the next number. A crash leaves either a hidden staging directory (ignored) or the complete version.

Publishing on an object store (`publish_by_claim`) has no rename. Its one atomic primitive is
create-if-absent: S3's `If-None-Match: *` PUT (answered 412 when the key exists; AWS since 2024-08, also
MinIO and moto), GCS's `ifGenerationMatch=0` (`madapt.store.backends`). The store builds on it in three
steps:

1. claim: create-if-absent `<name>/<N>/.claim`. Losing (412) means another publisher holds N: list
   again and try the next number. Nothing has been written, so a loser overwrites nothing.
2. payload: write the payload files under `<name>/<N>/`. Only the claim holder ever writes there, so no
   other publisher can replace a file a reader will check; the writes are create-if-absent anyway, so
   a broken invariant fails loudly instead of silently.
3. commit: create-if-absent `<name>/<N>/manifest.json`, which makes N visible. A PUT is atomic: the
   manifest exists whole or not at all.

A publisher killed after step 1 or 2 leaves N issued (its claim is listed) and unpublished (no
manifest): readers never see it and no one reuses N. Its payload stays as invisible debris. A request
whose answer was lost may be retried by the client and answered 412 for its own object; the store
then reads the object back and, if it holds exactly what was sent (a claim carries a random token),
knows it owns it. S3 and GCS list strongly after writes, so max(issued) + 1 is usually right the
first time; correctness rests on the conditional create alone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable

from madapt.store.backends import fsync_dir, write_synced
from madapt.store.errors import StoreError
from madapt.store.manifest import CLAIM_FILE, MANIFEST_FILE, PAYLOAD_FILES, Manifest, manifest_bytes, utc_now

MAX_ATTEMPTS = 1000  # numbers one publish may try before giving up (each loss means another publish won)

ManifestFor = Callable[[int], Manifest]
"""The manifest of the version being published, once its number is known."""


def publish_by_rename(
    name_dir: str, payload: dict[str, bytes], manifest_for: ManifestFor, next_version: Callable[[], int]
) -> Manifest:
    """Local disk: stage the complete version in `name_dir`, then rename it to the first free number."""
    staging = os.path.join(name_dir, f".staging-{uuid.uuid4().hex}")
    os.makedirs(staging)  # not tempfile.mkdtemp: its 0700 would make the version unreadable to others
    try:
        for file_name in PAYLOAD_FILES:
            write_synced(os.path.join(staging, file_name), payload[file_name])
        version = next_version()
        for _ in range(MAX_ATTEMPTS):
            manifest = manifest_for(version)
            write_synced(os.path.join(staging, MANIFEST_FILE), manifest_bytes(manifest))
            try:
                os.rename(staging, f"{name_dir}/{version}")  # fails if another publisher took it
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                version = max(version + 1, next_version())
                continue
            fsync_dir(name_dir)
            return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    raise _too_many(name_dir)


def publish_by_claim(
    name_dir: str,
    payload: dict[str, bytes],
    manifest_for: ManifestFor,
    next_version: Callable[[], int],
    create: Callable[[str, bytes], bool],
) -> Manifest:
    """Object store: claim a number, write the payload under it, commit with the manifest. `create` is the
    store's create-if-absent (True also for an object already holding exactly those bytes)."""
    token = uuid.uuid4().hex
    version = next_version()
    for _ in range(MAX_ATTEMPTS):
        claim = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "claimed": utc_now()}
        if create(f"{name_dir}/{version}/{CLAIM_FILE}", json.dumps(claim).encode()):
            break
        version = max(version + 1, next_version())
    else:
        raise _too_many(name_dir)
    manifest = manifest_for(version)
    for file_name, data in [*((f, payload[f]) for f in PAYLOAD_FILES), (MANIFEST_FILE, manifest_bytes(manifest))]:
        if not create(f"{name_dir}/{version}/{file_name}", data):
            raise StoreError(
                f"{manifest.ref}/{file_name} already exists although this publisher holds the claim: "
                "something writes to the store without claiming"
            )
    return manifest


def _too_many(name_dir: str) -> StoreError:
    name = name_dir.rpartition("/")[2]
    return StoreError(f"{name}: could not claim a new version (too many concurrent publishers)")
