"""Optional API-key authentication for the HTTP API (`Authorization: Bearer KEY`, as OpenAI clients send).

Keys come from a file (one per line, `#` comments) and/or an environment variable (comma-separated).
Both are read once when the ingress starts; asking for keys and finding none is an error, so a typo in
the file name cannot leave the server open. Keys are compared as SHA-256 digests with
`hmac.compare_digest` against every configured key, so neither the timing nor the answer tells a caller
which part of a key was wrong; every failure gets the same 401.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from madapt.errors import UserError

UNAUTHORIZED = "invalid or missing API key"


class KeySourceError(UserError, ValueError):
    """API keys were asked for but could not be read; the message names the file or variable."""


class ApiKeys:
    def __init__(self, keys: list[str]):
        if not keys:
            raise KeySourceError("no API keys configured")
        self._digests = [_digest(key) for key in keys]

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def load(cls, file: str | None, env: str | None) -> ApiKeys | None:
        """The keys from `file` and `env`; None (authentication off) when neither is set."""
        return cls(read_keys(file, env)) if file or env else None

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header carries one of the keys."""
        scheme, _, key = (authorization or "").partition(" ")
        presented = _digest(key.strip() if scheme.lower() == "bearer" else "")
        matched = False
        for digest in self._digests:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(presented, digest)
        return matched and bool(key.strip())


def read_keys(file: str | None, env: str | None) -> list[str]:
    """The keys in `file` and in the variable named `env`; at least one, or KeySourceError."""
    keys: list[str] = []
    if file:
        try:
            lines = Path(file).expanduser().read_text().splitlines()
        except OSError as error:
            raise KeySourceError(f"api_keys_file {file}: {error.strerror or error}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if env:
        keys += [key.strip() for key in os.environ.get(env, "").split(",") if key.strip()]
    if not keys:
        sources = " or ".join(s for s in (file and f"file {file}", env and f"environment variable {env}") if s)
        raise KeySourceError(f"API keys were configured but {sources} holds none; refusing to serve without them")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
