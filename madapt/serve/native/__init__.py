"""madapt's C++ CPU kernels, built on the machine that runs them the first time they are asked for.

`torch.utils.cpp_extension` compiles the sources here with the machine's own vector instructions
(`-march=native`, OpenMP through ATen's `parallel_for`) into torch's extension cache (`TORCH_EXTENSIONS_DIR`,
default ~/.cache/torch_extensions): ~10 s once per machine and source, a file lock keeping concurrent
processes (replicas, test workers) to one build; later processes load the built library. The library's
name carries a digest of the source, the CPU's features and torch's version, so a cache shared between
machines (a network home) never hands one CPU another's build. Where it cannot be built (no C++ compiler,
no ninja, a compiler without OpenMP), `load()` says why once in the log and returns False, and callers keep
their torch path: the kernels are an optimisation, never a requirement.

Kernels (namespace `torch.ops.madapt_cpu`):
- `decode_attention(query, key, value, mask, scale)`: a decode step's attention
  (`madapt.serve.decode_attention`); head dims `HEAD_DIMS`.
- `lora_products(y, x, a, b, rows)`: each row's own LoRA product at a decode step (`madapt.serve.multilora`).
- `rms_norm(x, weight, eps)`, `silu_mul(gate, up)`: Llama's RMSNorm and gated-MLP activation in one pass
  (`madapt.serve.native_layers`).
- `add_rms_norm(x, delta, weight, eps)`: the residual add and the next RMSNorm in one pass, both results
  (`madapt.serve.decode_step`).
- `rotary_cache(query, key, value, cos, sin, key_cache, value_cache, start)`: Llama's rotary embedding on the
  new queries and keys, keys and values written into the KV cache's room (`madapt.serve.native_layers`).
- `argmax_rows(logits)`: each row's greedy token, as `torch.argmax` gives it (`madapt.serve.sampling`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [
    HERE / name
    for name in (
        "argmax.cpp",
        "decode_attention.cpp",
        "lora_products.cpp",
        "rms_norm.cpp",
        "rotary_cache.cpp",
        "silu_mul.cpp",
    )
]
HEADERS = [HERE / "lanes.h"]
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128, 256)
"""Head dimensions `decode_attention` is built for (SmolLM2 64, Phi-2 80, Llama 3 128, Gemma 256; the tests'
tiny Llama 16)."""
FLAGS = ["-O3", "-march=native", "-fopenmp"]

_lock = threading.Lock()
_loaded: bool | None = None


def load() -> bool:
    """Build (once per machine) and load the kernels; whether they are there to call."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build()
        return _loaded


def _build() -> bool:
    if _registered():  # built and loaded under another name in this process (a test, a reload)
        return True
    from torch.utils import cpp_extension

    _find_ninja()
    try:
        cpp_extension.load(
            name=f"madapt_cpu_{_digest()}",
            sources=[str(path) for path in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as error:
        log.warning("madapt's C++ CPU kernels could not be built, the torch path serves instead: %s", error)
        return False
    return _registered()


def _find_ninja() -> None:
    """torch runs `ninja` from PATH; the ninja wheel (a dependency) installs it beside the interpreter, which is
    not on PATH when a venv's python is run without activating the venv."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _registered() -> bool:
    try:
        ops = torch.ops.madapt_cpu
        kernels = (
            ops.argmax_rows,
            ops.decode_attention,
            ops.lora_products,
            ops.add_rms_norm,
            ops.rms_norm,
            ops.rotary_cache,
            ops.silu_mul,
        )
        return all(callable(op) for op in kernels)
    except (AttributeError, RuntimeError):
        return False


def _digest() -> str:
    """Source, CPU features and torch: what the built library depends on beyond torch's own hash of flags."""
    parts = [path.read_bytes() for path in SOURCES + HEADERS]
    parts += [_cpu_features().encode(), torch.__version__.encode(), platform.machine().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def _cpu_features() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), "")
