"""madapt: declare, train, store, merge and serve many LoRA adapters on one base LLM, on Ray."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes tries to fetch an optional CPU kernel from a model hub at import and warns when it
# cannot (always, offline); its own fallback kernel is used. Keep real warnings, drop that one.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)


def __getattr__(name: str) -> object:
    """`madapt.Model` without importing the API (and torch) on `import madapt`."""
    if name == "Model":
        from madapt.api import Model

        return Model
    raise AttributeError(f"module 'madapt' has no attribute {name!r}")


__all__ = ["Model"]
