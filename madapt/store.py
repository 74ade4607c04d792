"""AdapterStore: every adapter, versioned and checksummed, on any `pyarrow.fs` filesystem.

Layout: `<root>/<name>/<version>/{adapter_config.json, adapter_model.safetensors, manifest.json}`.
A version is visible only once its manifest exists, and the manifest is written last, so a reader
never sees a half-written version. On a local filesystem the whole version is staged in a hidden
directory and renamed into place (atomic, and safe against concurrent publishers); on object stores
the files are put under the version prefix and the manifest put last (each put is atomic).

The store is the only module that knows paths: everything else passes names and versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from madapt.config import check_adapter_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
PAYLOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE)
REF = re.compile(r"^(?P<name>[^@]+)(@(?P<version>\d+|latest))?$")


class StoreError(Exception):
    """An adapter that cannot be published or opened; the message names the adapter and file."""


class AdapterNotFound(StoreError):
    pass


class CorruptAdapter(StoreError):
    """Checksum mismatch, unreadable safetensors, or non-finite weights."""


class BaseModelMismatch(StoreError):
    pass


@dataclass
class Manifest:
    name: str
    version: int
    base_model: str
    base_fingerprint: str
    r: int
    alpha: float
    target_modules: list[str]
    files: dict[str, dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] | None = None
    created: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def size_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


@dataclass
class StoredAdapter:
    """An opened, verified adapter: PEFT's config and tensors plus the manifest that vouches for them."""

    manifest: Manifest
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def ref(self) -> str:
        return self.manifest.ref


def read_peft_dir(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter saved by PEFT's save_pretrained (local dir), refusing anything but safetensors."""
    path = os.path.abspath(directory)
    config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    if not os.path.isdir(path):
        raise StoreError(f"{directory}: not a directory")
    if not os.path.exists(weights_path):
        pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
        detail = f"; found {pickles}, which madapt never loads (pickle can run code)" if pickles else ""
        raise StoreError(f"{directory}: no {WEIGHTS_FILE}{detail}")
    if not os.path.exists(config_path):
        raise StoreError(f"{directory}: no {CONFIG_FILE}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(f"{config_path}: not valid JSON: {error}") from None
    with open(weights_path, "rb") as handle:
        data = handle.read()
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise CorruptAdapter(f"{weights_path}: not a readable safetensors file: {error}") from None
    check_finite(tensors, weights_path)
    return config, tensors


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'coding' or 'coding@latest' -> ('coding', None); 'coding@3' -> ('coding', 3). Validates the name."""
    match = REF.fullmatch(ref) if isinstance(ref, str) else None
    if match is None:
        raise StoreError(f"invalid adapter reference {ref!r}: expected NAME or NAME@VERSION")
    try:
        check_adapter_name(match["name"], "adapter id")
    except ValueError as error:
        raise StoreError(str(error)) from None
    version = match["version"]
    return match["name"], None if version in (None, "latest") else int(version)


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CorruptAdapter(f"{where}: tensor {key!r} has NaN or infinite values")


class AdapterStore:
    """Adapters under `uri`; pass `filesystem` to use a configured pyarrow filesystem (e.g. S3 with
    explicit credentials), in which case `uri` is the root path inside it."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        self.uri = uri
        if filesystem is not None:
            self.fs, self.root = filesystem, uri
        elif "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        infos = self._list(self.root)
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and self.versions(i.base_name))

    def versions(self, name: str) -> list[int]:
        """Published versions of `name`, oldest first (versions without a manifest are not published)."""
        check_adapter_name(name)
        numbered = [int(i.base_name) for i in self._list(self._dir(name)) if i.base_name.isdigit()]
        published = self.fs.get_file_info([self._path(name, v, MANIFEST_FILE) for v in numbered])
        return sorted(v for v, info in zip(numbered, published, strict=True) if info.type == pafs.FileType.File)

    def manifest(self, ref: str) -> Manifest:
        name, version = self._resolve(ref)
        try:
            data = json.loads(self._read(self._path(name, version, MANIFEST_FILE)))
            return Manifest(**data)
        except (json.JSONDecodeError, TypeError) as error:
            raise CorruptAdapter(f"{name}@{version}: unreadable {MANIFEST_FILE}: {error}") from None

    def list(self) -> list[Manifest]:
        return [self.manifest(f"{name}@{v}") for name in self.names() for v in self.versions(name)]

    def open(self, ref: str, *, expected_fingerprint: str | None = None) -> StoredAdapter:
        """Read and verify an adapter: checksums, safetensors only, finite weights, matching base."""
        manifest = self.manifest(ref)
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
            data = self._read(self._path(manifest.name, manifest.version, file_name))
            expected = manifest.files[file_name]["sha256"]
            if hashlib.sha256(data).hexdigest() != expected:
                raise CorruptAdapter(f"{where}/{file_name}: checksum mismatch (file changed or truncated)")
            payload[file_name] = data
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
    ) -> Manifest:
        """Publish a new version of `name` atomically and return its manifest."""
        check_adapter_name(name)
        if not tensors:
            raise StoreError(f"{name}: refusing to publish an adapter with no tensors")
        check_finite(tensors, name)
        payload = {
            CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
            WEIGHTS_FILE: save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}),
        }
        files = {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in payload.items()}
        self.fs.create_dir(self._dir(name), recursive=True)
        for _ in range(1000):
            version = max(self._numbered(name), default=0) + 1
            manifest = Manifest(
                name=name,
                version=version,
                base_model=base_model,
                base_fingerprint=base_fingerprint,
                r=int(config.get("r", 0)),
                alpha=float(config.get("lora_alpha", 0)),
                target_modules=sorted(config.get("target_modules") or []),
                files=files,
                metrics=metrics or {},
                lineage=lineage,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            payload[MANIFEST_FILE] = json.dumps(asdict(manifest), indent=2).encode()
            if self._write_version(name, version, payload):
                return manifest
        raise StoreError(f"{name}: could not claim a new version (too many concurrent publishers)")

    def _write_version(self, name: str, version: int, payload: dict[str, bytes]) -> bool:
        final = self._path(name, version)
        if not self.local:
            for file_name in (*PAYLOAD_FILES, MANIFEST_FILE):  # manifest last: it makes the version visible
                self._write(f"{final}/{file_name}", payload[file_name])
            return True
        staging = self._path(name, f".staging-{uuid.uuid4().hex}")
        os.makedirs(staging)
        try:
            for file_name, data in payload.items():
                with open(os.path.join(staging, file_name), "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            try:
                os.rename(staging, final)  # atomic; fails if another publisher took this version
            except OSError:
                return False
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- paths -----------------------------------------------------------------------------------

    def _resolve(self, ref: str) -> tuple[str, int]:
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise AdapterNotFound(f"adapter {name!r} is not in the store")
        if version is None:
            return name, versions[-1]
        if version not in versions:
            raise AdapterNotFound(f"adapter {name!r} has no version {version}; published: {versions}")
        return name, version

    def _numbered(self, name: str) -> list[int]:
        return [int(i.base_name) for i in self._list(self._dir(name)) if i.base_name.isdigit()]

    def _dir(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _path(self, name: str, version: int | str, file_name: str | None = None) -> str:
        path = f"{self.root}/{name}/{version}"
        return f"{path}/{file_name}" if file_name else path

    def _list(self, path: str) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise CorruptAdapter(f"{path.removeprefix(self.root + '/')}: file missing from the store") from None

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)
