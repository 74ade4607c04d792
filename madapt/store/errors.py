"""What the store raises: every error is a StoreError (a UserError), and its message names the adapter and file."""

from __future__ import annotations

from madapt.errors import UserError


class StoreError(UserError):
    """An adapter that cannot be published or opened; the message names the adapter and file."""


class AdapterNotFound(StoreError):
    pass


class CorruptAdapter(StoreError):
    """Checksum mismatch, unreadable safetensors or manifest, non-finite weights, or a misplaced manifest."""


class BaseModelMismatch(StoreError):
    pass
