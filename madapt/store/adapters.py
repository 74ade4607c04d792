"""AdapterStore: every adapter, versioned and checksummed, on a local disk, S3 or GCS.

Layout::

    <root>/<name>/<version>/adapter_config.json        PEFT's config        } the payload
                           /adapter_model.safetensors  PEFT's weights       }
                           /manifest.json              checksums + metadata: written last, it publishes
                           /.claim                     object stores: who took this number (kept forever)
                           /deleted.json               tombstone left by `delete` (holds the old manifest)
    <root>/<name>/aliases.json                          labels -> versions, with a short history (releases)
                 /split.json                            traffic split of requests for `<name>` (releases)

How a version number is taken and published, on a local disk and on object stores, is the protocol in
`madapt.store.publish`; the conditional writes it rests on are `madapt.store.backends`.

Reading is bound to the path read: `open("x@2")` reads `x/2/*` only, and a manifest that names another
adapter or version is corrupt, so a copied or misplaced manifest can never send a reader to other
files. Listing skips what is not an adapter (`lost+found`, stray files, invalid names) and, with a
warning, versions whose manifest does not parse: one bad entry must not hide the rest of the store.

Deleting writes the tombstone first (create-if-absent: from then on readers get "was deleted"), then
removes the manifest and payload. The tombstone, and on object stores the claim, keep N issued.

Records (`aliases.json`, `split.json`) are small JSON objects changed by read-modify-write, never
partially visible and never losing a concurrent change. Local disk: the change runs under an exclusive
`flock` on a hidden lock file next to the record and lands by writing a temporary file and renaming it
over the record. S3: the record is read with its ETag and written back with `If-Match: <etag>`
(`If-None-Match: *` when it did not exist); a 412 means another writer got in between, so the change is
read and applied again. GCS: the same with `ifGenerationMatch`. Each write carries a
random token, so a retried request whose first answer was lost is recognised instead of applied twice.

The store is the only module that knows paths: everything else passes names and versions.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
from safetensors import SafetensorError

from madapt.config.names import check_adapter_name
from madapt.store.backends import MAX_RECORD_BYTES, Objects, exclusive_creator
from madapt.store.errors import AdapterNotFound, BaseModelMismatch, CorruptAdapter, StoreError
from madapt.store.fs import filesystem_for
from madapt.store.manifest import (
    CLAIM_FILE,
    CONFIG_FILE,
    DELETED_FILE,
    MANIFEST_FILE,
    PAYLOAD_FILES,
    RECORD_FILES,
    VERSION_DIR,
    WEIGHTS_FILE,
    Manifest,
    StoredAdapter,
    as_list,
    check_finite,
    type_options,
    utc_now,
)
from madapt.store.publish import publish_by_claim, publish_by_rename
from madapt.store.refs import parse_ref

if TYPE_CHECKING:  # torch is imported where tensors are read or written: listing a store needs none
    import torch

log = logging.getLogger(__name__)


class AdapterStore:
    """Adapters under `uri` (a path or a file://, s3:// or gs:// URI). Pass `filesystem` to use a configured
    pyarrow filesystem instead (e.g. S3 with explicit credentials), in which case `uri` is the root path
    inside it; on S3 the conditional writes then use boto3's own credential chain and AWS_ENDPOINT_URL."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        self.uri = uri
        if filesystem is not None:
            self.fs, self.root = filesystem, uri.rstrip("/")
        else:
            self.fs, self.root = filesystem_for(uri)
        self.local = self.fs.type_name == "local"
        self._objects = exclusive_creator(self.fs, None if filesystem is not None else uri)

    # -- reading ---------------------------------------------------------------------------------

    def names(self) -> builtins.list[str]:  # builtins.: `list` is also a method here
        """Adapters with at least one published version."""
        return [name for name in self._adapter_dirs() if _published(self._scan(name))]

    def versions(self, name: str) -> builtins.list[int]:
        """Published versions of `name`, oldest first (no manifest, or a tombstone: not published)."""
        check_adapter_name(name)
        return _published(self._scan(name))

    def manifest(self, ref: str) -> Manifest:
        return self._read_manifest(*self._resolve(ref))

    def list(self) -> builtins.list[Manifest]:
        """Every published version's manifest; a corrupt one is logged and skipped, never raised."""
        manifests = []
        for name in self._adapter_dirs():
            for version in _published(self._scan(name)):
                try:
                    manifests.append(self._read_manifest(name, version))
                except StoreError as error:
                    log.warning("adapter store %s: skipping %s@%d: %s", self.uri, name, version, error)
        return manifests

    def issued(self, name: str) -> tuple[builtins.list[int], builtins.list[int]]:
        """(published, deleted) versions of `name`, oldest first, from one listing."""
        check_adapter_name(name)
        scan = self._scan(name)
        return _published(scan), sorted(v for v, files in scan.items() if DELETED_FILE in files)

    # -- records: small JSON objects per adapter (aliases, traffic split), see the module docstring ----

    def read_record(self, name: str, file_name: str) -> dict[str, Any] | None:
        """The record `file_name` of adapter `name`, or None when there is none."""
        path = self._record_path(name, file_name)
        try:
            with self.fs.open_input_stream(path) as stream:
                data: bytes = stream.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        return self._parse_record(path, data)

    def update_record(
        self, name: str, file_name: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]
    ) -> dict[str, Any]:
        """Replace the record with `change(current)` atomically (current is None when there is none) and
        return what was written. `change` may run more than once (after losing a race): it must depend on
        its argument only, and may raise to refuse the change."""
        path = self._record_path(name, file_name)
        objects = self._writable()
        token = uuid.uuid4().hex
        with objects.exclusive(path):
            for attempt in range(50):
                data, tag = objects.read_for_update(path)
                current = None if data is None else self._parse_record(path, data)
                if current is not None and current.get("write") == token:
                    return current  # an earlier attempt landed but its answer was lost
                new = {**change(current), "write": token, "updated": utc_now()}
                if objects.replace(path, json.dumps(new, indent=2, sort_keys=True).encode(), tag):
                    return new
                time.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))
        raise StoreError(f"{name}/{file_name}: kept changing under concurrent writers; try again")

    def _record_path(self, name: str, file_name: str) -> str:
        check_adapter_name(name)
        if file_name not in RECORD_FILES:
            raise StoreError(f"{file_name!r} is not an adapter record ({', '.join(RECORD_FILES)})")
        return f"{self._dir(name)}/{file_name}"

    def _parse_record(self, path: str, data: bytes) -> dict[str, Any]:
        where = path.removeprefix(self.root + "/")
        if len(data) > MAX_RECORD_BYTES:
            raise CorruptAdapter(f"{where}: larger than {MAX_RECORD_BYTES} bytes")
        try:
            record = json.loads(data)
        except ValueError as error:
            raise CorruptAdapter(f"{where}: not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise CorruptAdapter(f"{where}: not a JSON object")
        return record

    def open(self, ref: str, *, expected_fingerprint: str | None = None) -> StoredAdapter:
        """Read and verify an adapter: checksums, safetensors only, finite weights, matching base."""
        name, version = self._resolve(ref)
        manifest = self._read_manifest(name, version)
        where = manifest.ref
        if expected_fingerprint is not None and manifest.base_fingerprint != expected_fingerprint:
            raise BaseModelMismatch(
                f"{where} was trained on base model {manifest.base_model!r} "
                f"(fingerprint {manifest.base_fingerprint}), not the loaded base ({expected_fingerprint})"
            )
        payload = {}
        for file_name in PAYLOAD_FILES:
            if file_name not in manifest.files:
                raise CorruptAdapter(f"{where}: manifest lists no {file_name}")
            try:
                data = self._read(self._path(name, version, file_name))
            except CorruptAdapter:
                if self._exists(self._path(name, version, DELETED_FILE)):
                    raise AdapterNotFound(f"{where} was deleted while it was being read") from None
                raise
            if hashlib.sha256(data).hexdigest() != manifest.files[file_name]["sha256"]:
                raise CorruptAdapter(f"{where}/{file_name}: checksum mismatch (file changed or truncated)")
            payload[file_name] = data
        from safetensors.torch import load as load_safetensors

        try:
            tensors = load_safetensors(payload[WEIGHTS_FILE])
        except (SafetensorError, ValueError) as error:
            raise CorruptAdapter(f"{where}/{WEIGHTS_FILE}: not a readable safetensors file: {error}") from None
        check_finite(tensors, where)
        return StoredAdapter(manifest=manifest, config=json.loads(payload[CONFIG_FILE]), tensors=tensors)

    # -- writing ---------------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        *,
        base_model: str,
        base_fingerprint: str,
        metrics: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> Manifest:
        """Publish a new version of `name` atomically and return its manifest."""
        from safetensors.torch import save as save_safetensors

        check_adapter_name(name)
        if not tensors:
            raise StoreError(f"{name}: refusing to publish an adapter with no tensors")
        check_finite(tensors, name)
        self._writable()
        payload = {
            CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
            WEIGHTS_FILE: save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}),
        }
        files = {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in payload.items()}

        def manifest_for(version: int) -> Manifest:
            return Manifest(
                name=name,
                version=version,
                base_model=base_model,
                base_fingerprint=base_fingerprint,
                r=int(config.get("r", 0)),
                alpha=float(config.get("lora_alpha", 0)),
                target_modules=sorted(as_list(config.get("target_modules"))),
                files=files,
                metrics=metrics or {},
                lineage=lineage,
                created=utc_now(),
                response_format=response_format,
                peft_type=str(config.get("peft_type", "LORA")),
                type_options=type_options(config),
            )

        name_dir, next_version = self._dir(name), lambda: self._next_version(name)
        if self.local:
            return publish_by_rename(name_dir, payload, manifest_for, next_version)
        return publish_by_claim(name_dir, payload, manifest_for, next_version, self._create)

    def delete(self, ref: str) -> Manifest | None:
        """Unpublish `NAME@VERSION` for good and return its manifest (None if that was corrupt).

        The tombstone goes first, so readers see the version as deleted at once and a crash midway leaves
        it deleted; it stays (with the claim, on object stores) so the number is never issued again."""
        name, version = parse_ref(ref)
        if version is None:
            raise StoreError(f"delete needs an explicit version ({name}@N), not {ref!r}")
        self._writable()
        name, version = self._resolve(ref)
        try:
            manifest = self._read_manifest(name, version)
        except CorruptAdapter:
            manifest = None  # deleting a corrupt version is how one gets rid of it
        tombstone = {"ref": f"{name}@{version}", "deleted": utc_now(), "manifest": manifest and asdict(manifest)}
        if not self._create(self._path(name, version, DELETED_FILE), json.dumps(tombstone, indent=2).encode()):
            raise AdapterNotFound(f"{name}@{version} was deleted")
        leftovers = [i.base_name for i in self._list(self._path(name, version)) if i.type == pafs.FileType.File]
        for file_name in sorted(set(leftovers) - {CLAIM_FILE, DELETED_FILE}, key=lambda f: f != MANIFEST_FILE):
            self._writable().remove(self._path(name, version, file_name))
        return manifest

    def _create(self, path: str, data: bytes) -> bool:
        """Create-if-absent; True also when the object is already there holding exactly `data` (a retried
        request whose first answer was lost)."""
        if self._writable().create(path, data):
            return True
        try:
            with self.fs.open_input_stream(path) as stream:
                return bool(stream.read() == data)
        except FileNotFoundError:
            return False

    def _writable(self) -> Objects:
        if self._objects is None:
            raise StoreError(
                f"{self.uri}: cannot write to a {self.fs.type_name!r} filesystem: it has no atomic "
                "create-if-absent to claim versions with (local paths, s3:// and gs:// do)"
            )
        return self._objects

    # -- listing and paths -----------------------------------------------------------------------

    def _resolve(self, ref: str) -> tuple[str, int]:
        name, version = parse_ref(ref)
        scan = self._scan(name)
        versions = _published(scan)
        deleted = sorted(v for v, files in scan.items() if DELETED_FILE in files)
        if not versions and not deleted:
            raise AdapterNotFound(f"adapter {name!r} is not in the store")
        if version is None:
            if not versions:
                raise AdapterNotFound(f"adapter {name!r} has no published version; deleted: {deleted}")
            return name, versions[-1]
        if version in deleted:
            raise AdapterNotFound(f"{name}@{version} was deleted; published: {versions}")
        if version not in versions:
            raise AdapterNotFound(f"adapter {name!r} has no version {version}; published: {versions}")
        return name, version

    def _read_manifest(self, name: str, version: int) -> Manifest:
        """The manifest at `name/version`, which must name that same adapter and version."""
        where = f"{name}@{version}"
        try:
            manifest = Manifest(**json.loads(self._read(self._path(name, version, MANIFEST_FILE))))
        except (ValueError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptAdapter(f"{where}: unreadable {MANIFEST_FILE}: {error}") from None
        files = manifest.files if isinstance(manifest.files, dict) else None
        if (
            not isinstance(manifest.name, str)
            or type(manifest.version) is not int
            or files is None
            or not all(
                isinstance(f, dict) and isinstance(f.get("sha256"), str) and type(f.get("bytes")) is int
                for f in files.values()
            )
        ):
            raise CorruptAdapter(f"{where}: {MANIFEST_FILE} has fields of the wrong type")
        if (manifest.name, manifest.version) != (name, version):
            raise CorruptAdapter(f"{where}: manifest names {manifest.ref} but was read from {where}")
        return manifest

    def _adapter_dirs(self) -> builtins.list[str]:
        """Directories under the root that can be adapters; anything else (lost+found, stray files) is skipped."""
        names = []
        for info in self._list(self.root):
            try:
                if info.type == pafs.FileType.Directory and check_adapter_name(info.base_name):
                    names.append(info.base_name)
            except ValueError:
                log.debug("adapter store %s: %r is not an adapter; skipped", self.uri, info.base_name)
        return sorted(names)

    def _scan(self, name: str) -> dict[int, set[str]]:
        """Every issued version of `name` with which of its manifest and tombstone exist.

        Object stores: one recursive listing (pages of 1000 keys) rather than a HEAD per file. Local disk: the
        version directories, then a stat of each marker (a recursive walk would trip over staging directories
        other publishers are renaming away)."""
        base = self._dir(name)
        found: dict[int, set[str]] = {}
        if self.local:
            for info in self._list(base):
                if VERSION_DIR.fullmatch(info.base_name):
                    found[int(info.base_name)] = set()
            markers = [(v, f) for v in found for f in (MANIFEST_FILE, DELETED_FILE)]
            infos = self.fs.get_file_info([self._path(name, v, f) for v, f in markers])
            for (version, file_name), info in zip(markers, infos, strict=True):
                if info.type == pafs.FileType.File:
                    found[version].add(file_name)
            return found
        for info in self._list(base, recursive=True):
            parts = info.path.removeprefix(base + "/").split("/")
            if not info.path.startswith(base + "/") or not VERSION_DIR.fullmatch(parts[0]):
                continue
            files = found.setdefault(int(parts[0]), set())
            if len(parts) == 2 and info.type == pafs.FileType.File:
                files.add(parts[1])
        return found

    def _next_version(self, name: str) -> int:
        return max(self._scan(name), default=0) + 1

    def _dir(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _path(self, name: str, version: int | str, file_name: str | None = None) -> str:
        path = f"{self.root}/{name}/{version}"
        return f"{path}/{file_name}" if file_name else path

    def _list(self, path: str, recursive: bool = False) -> builtins.list[pafs.FileInfo]:
        try:
            infos: builtins.list[pafs.FileInfo] = self.fs.get_file_info(
                pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        return infos

    def _exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type == pafs.FileType.File)

    def _read(self, path: str) -> bytes:
        """The whole file, in one request on object stores: a random-access file knows its size and reads it
        with one GET, where a stream's read() fetches ranges of ~256 KB (322 GETs for an 84 MB adapter on S3,
        measured with `madapt bench store`)."""
        try:
            with self.fs.open_input_file(path) as handle:
                data: bytes = handle.read()
        except FileNotFoundError:
            raise CorruptAdapter(f"{path.removeprefix(self.root + '/')}: file missing from the store") from None
        return data


def _published(scan: dict[int, set[str]]) -> list[int]:
    return sorted(v for v, files in scan.items() if MANIFEST_FILE in files and DELETED_FILE not in files)
