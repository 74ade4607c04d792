"""torch internals madapt reaches: a module's hook table and its parameter, buffer and child dicts.
Checked against torch 2.13.

A forward pre-hook registered twice runs twice, and torch has no public way to ask whether one is there; a
shallow twin of a module that shares its storage but not its Parameter objects needs the module's own dicts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn


def has_forward_pre_hook(module: nn.Module, hook: Callable[..., Any]) -> bool:
    return hook in module._forward_pre_hooks.values()


def detached_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose own plain parameters are new Parameter objects over the same storage
    (quantized ones, which carry their quantization state, stay shared)."""
    twin = copy.copy(module)
    twin._parameters = {
        name: nn.Parameter(p.data, requires_grad=False) if type(p) is nn.Parameter else p
        for name, p in module._parameters.items()
    }
    twin._buffers = dict(module._buffers)
    twin._modules = dict(module._modules)
    return twin
