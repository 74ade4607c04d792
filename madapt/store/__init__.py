"""The adapter store: every adapter, versioned and checksummed, on a local disk, S3 or GCS (pyarrow.fs).

Modules:
    errors     StoreError and its kinds (not found, corrupt, other base model)
    refs       the one reader of adapter refs: NAME, NAME@N, NAME@latest, NAME@LABEL
    manifest   a version's file names, its Manifest and the opened StoredAdapter
    fs         pyarrow filesystems for store URIs (data and tracking read through them too)
    env        the object-storage environment forwarded to the Ray processes madapt starts
    backends   create-if-absent per backend: local O_EXCL/flock, S3 (boto3), GCS (google-cloud-storage)
    publish    the publish protocol: how exactly one publisher gets each version number
    adapters   AdapterStore: read, publish, delete, list, and the per-adapter records
    releases   labels, promote, rollback, traffic splits and the cached Resolver, on the store's records

May import: madapt.errors, madapt.config.names, torch, safetensors, pyarrow (boto3 and google-cloud-storage
lazily, on the first write). Never training, serving, merge, model or LoRA code: they import the store.
`from madapt.store import X` gives every name below; `releases` is imported as `madapt.store.releases`.
"""

from madapt.store.adapters import AdapterStore
from madapt.store.backends import s3_client_options as _s3_client_options
from madapt.store.env import STORAGE_ENV, storage_env, storage_runtime_env
from madapt.store.errors import AdapterNotFound, BaseModelMismatch, CorruptAdapter, StoreError
from madapt.store.fs import filesystem_for, portable_filesystem
from madapt.store.manifest import (
    ALIASES_FILE,
    CLAIM_FILE,
    CONFIG_FILE,
    DELETED_FILE,
    MANIFEST_FILE,
    SPLIT_FILE,
    WEIGHTS_FILE,
    Manifest,
    StoredAdapter,
    check_finite,
    type_options,
)
from madapt.store.refs import Ref, RefError, parse_ref

__all__ = [
    "ALIASES_FILE",
    "CLAIM_FILE",
    "CONFIG_FILE",
    "DELETED_FILE",
    "MANIFEST_FILE",
    "SPLIT_FILE",
    "STORAGE_ENV",
    "WEIGHTS_FILE",
    "AdapterNotFound",
    "AdapterStore",
    "BaseModelMismatch",
    "CorruptAdapter",
    "Manifest",
    "Ref",
    "RefError",
    "StoreError",
    "StoredAdapter",
    "_s3_client_options",
    "check_finite",
    "filesystem_for",
    "parse_ref",
    "portable_filesystem",
    "storage_env",
    "storage_runtime_env",
    "type_options",
]
