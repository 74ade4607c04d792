"""A KV cache that grows into spare room instead of being copied whole at every decode step.

transformers' `DynamicLayer` appends a step's keys and values with `torch.cat`, a new tensor each time: a
decode step copies every layer's whole cache, `[rows, kv heads, width, head dim]` twice. For SmolLM2-135M at
32 rows and ~100 columns that is ~15 MB a step, 7% of the step's time on the project's CPU machine. A
`GrowingLayer` keeps its keys and values as the leading columns of a buffer with spare columns after them:
a step writes its column into the room and hands out a view, and only when the room runs out is the cache
copied into a larger buffer (`HEADROOM`), so a copy comes once every few dozen steps. The values attended
to are the same tensors' values: the attention computes exactly what it did over the concatenated cache.

`DecodeBatch` may replace a layer's `keys`/`values` (rows joining or leaving): a tensor that is not the
leading part of the layer's buffer (a fresh one, or a view cut off the left) is copied into a new buffer at
the next step; rows leaving without a cut keep the buffer's leading rows, a prefix of it, and copy nothing.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

HEADROOM = 64
"""Spare columns a buffer gets when it is (re)allocated, at least; a quarter more for long caches."""


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys` and `values` are views of buffers with spare columns."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: dict[str, torch.Tensor] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self._append("keys", key_states), self._append("values", value_states)
        self.keys, self.values = keys, values
        return keys, values

    def room(self, like: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The key and value buffers with room for new columns of `shape` (`[rows, kv heads, columns, head
        dim]`, in `like`'s dtype and device) after the layer's, and the first of those columns: for a caller
        that writes them itself (`madapt.serve.native_layers`' attention) and then calls `grown`."""
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        (keys, start), (values, _) = self._room("keys", like, shape), self._room("values", like, shape)
        return keys, values, start

    def grown(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers' first `rows` rows and `width` columns as the layer's keys and values, after `room`."""
        self.keys = self.buffers["keys"][:rows, :, :width]
        self.values = self.buffers["values"][:rows, :, :width]
        return self.keys, self.values

    def _append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """The layer's `name` tensor with `new`'s columns after it, written into the buffer's room."""
        rows, heads, columns, dim = new.shape
        buffer, start = self._room(name, new, (rows, heads, columns, dim))
        width = start + columns
        buffer[:rows, :, start:width] = new
        return buffer[:rows, :, :width]

    def _room(self, name: str, like: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, int]:
        """The buffer of `name` with room for `shape`'s columns after the layer's, and the first of them: the
        buffer in place when the layer's tensor leads it and there is room, else a larger one holding a copy."""
        held: torch.Tensor = getattr(self, name)
        rows, heads, columns, dim = shape
        start = held.shape[2] if held.dim() == 4 else 0
        width = start + columns
        buffer = self.buffers.get(name)
        if buffer is None or not _leads(held, buffer) or width > buffer.shape[2]:
            buffer = like.new_empty(rows, heads, width + max(HEADROOM, width // 4), dim)
            if held.dim() == 4:
                buffer[:, :, :start] = held
            self.buffers[name] = buffer
        return buffer, start

    def reset(self) -> None:
        self.buffers = {}
        super().reset()


def _leads(held: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `held` is `buffer`'s leading rows and columns (a view starting where it starts)."""
    return bool(
        held.dim() == 4
        and held.data_ptr() == buffer.data_ptr()
        and held.stride() == buffer.stride()
        and held.shape[0] <= buffer.shape[0]
        and held.shape[1] == buffer.shape[1]
        and held.shape[3] == buffer.shape[3]
    )


def growing_cache(config: PreTrainedConfig) -> DynamicCache:
    """A `DynamicCache` for `config` whose plain layers are `GrowingLayer`s (sliding-window and other
    layers stay transformers' own)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
