"""Adapter references, read in one place: `NAME`, `NAME@N`, `NAME@latest` and `NAME@LABEL`.

A ref splits at its first '@' (a name has none). What follows is a version (1-9 ASCII digits), `latest`
(the newest published version) or, where labels are allowed, a label (named like an adapter, never a
number or `latest`: `check_label`). The whole ref is printable ASCII.

Who reads refs here: the store (`parse_ref`: no labels, the store does not know them), releases (labels
allowed), and the HTTP edge (`model` ids: the shape only, the name is checked by the store behind it).
Each keeps its own error type: a malformed ref raises RefError, a StoreError; the HTTP edge answers it
with a 400 naming the `model` parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from madapt.config.names import check_adapter_name
from madapt.store.errors import StoreError

LATEST = "latest"
MAX_VERSION_DIGITS = 9  # int() of a longer run of digits is never a version, and may be slow
MAX_SHOWN = 40  # characters of a bad ref quoted in an error message


class RefError(StoreError):
    """A malformed ref; the message reads `invalid adapter reference 'X': <what is wrong>` (or the name check's)."""


@dataclass(frozen=True)
class Ref:
    """A parsed ref: its name and what followed the '@' ('' when there was no '@')."""

    name: str
    suffix: str = ""

    @property
    def version(self) -> int | None:
        """N of `NAME@N`."""
        return int(self.suffix) if _is_version(self.suffix) else None

    @property
    def latest(self) -> bool:
        return self.suffix == LATEST

    @property
    def label(self) -> str | None:
        """LABEL of `NAME@LABEL` (not validated: `check_label` does that where labels are looked up)."""
        return self.suffix if self.suffix and not self.latest and self.version is None else None

    @classmethod
    def parse(
        cls, value: object, *, labels: bool = True, check_name: bool = True, max_length: int | None = None
    ) -> Ref:
        """Read `value` as a ref, or raise RefError saying what is wrong with it.

        labels: whether `NAME@LABEL` is allowed (else the suffix is a version or `latest`); check_name: whether
        the name is validated here (as an "adapter id"); max_length: a bound on the whole ref."""
        if not isinstance(value, str):
            raise RefError(f"invalid adapter reference {_shown(value)}: not a string")
        if max_length is not None and len(value) > max_length:
            raise _refused(value, f"longer than {max_length} characters")
        name, at, suffix = value.partition("@")
        if check_name:
            try:
                check_adapter_name(name, "adapter id")
            except ValueError as error:
                raise RefError(str(error)) from None
        if not value.isascii() or not value.isprintable():
            raise _refused(value, "only printable ASCII is allowed")
        if at and not (suffix == LATEST or _is_version(suffix)):
            if not labels:
                raise _refused(value, f"the version must be 1-{MAX_VERSION_DIGITS} ASCII digits or '{LATEST}'")
            if not suffix:
                raise _refused(value, "nothing after '@'")
            if suffix.isdigit():
                raise _refused(value, f"a version has at most {MAX_VERSION_DIGITS} digits")
        return cls(name, suffix)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """The store's reading of a ref: 'coding' or 'coding@latest' -> ('coding', None); 'coding@3' ->
    ('coding', 3). Validates the name; labels are refused (releases resolve them)."""
    parsed = Ref.parse(ref, labels=False)
    return parsed.name, parsed.version


def check_label(label: str) -> str:
    """A label is named like an adapter, and is neither a version number nor `latest`."""
    try:
        check_adapter_name(label, "label")
    except ValueError as error:
        raise StoreError(str(error)) from None
    if label.isdigit() or label == LATEST:
        raise StoreError(f"invalid label {label!r}: a label may not be a number or '{LATEST}'")
    return label


def name_of(ref: str) -> str:
    """The name part of a ref, unvalidated (for cache keys: `Ref.parse` validates)."""
    return ref.partition("@")[0]


def _is_version(suffix: str) -> bool:
    return 1 <= len(suffix) <= MAX_VERSION_DIGITS and suffix.isascii() and suffix.isdigit()


def _refused(value: str, problem: str) -> RefError:
    return RefError(f"invalid adapter reference {_shown(value)}: {problem}")


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(str(value))} characters)"
