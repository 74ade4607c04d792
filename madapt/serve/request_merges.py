"""Per-request merges, as LoRAX's `merged_adapters`: a request names a weighted set of published adapters
and is served by their exact weighted sum, built into a batch slot of the replica that serves it.

The request says it in one of two ways (both are plain OpenAI body fields, `extra_body` in the client):

* `model: "coding+chat"`: the sum of the two, each with weight 1 (LoRAX's default weights);
* `model: "coding+chat"` with `adapters: {"coding": 0.7, "chat": 0.3}`: those weights. `adapters` must name
  the same adapters as `model` (any order), so the response's `model` always says what was served; a
  single adapter with a weight (`model: "coding", adapters: {"coding": 0.5}`) scales it.

Each name resolves as a plain `model` does (a version, a label, a traffic split), so the recipe is the
sorted list of resolved `NAME@N` refs with their weights: publishing a new version makes a new recipe.
The merge is `madapt.lowrank.exact_merge`, the maths of the published `exact_linear` merge: per module
B = [B_1 .. B_n] and A = [w_1 s_1 A_1; ..; w_n s_n A_n] (each source's own LoRA scale s_i folded in), so
B A is exactly sum_i w_i delta W_i and its rank is the sum of the sources' ranks; served, it gives the
same text as that merge published with `madapt merge` (`combination_type: exact_linear`). A replica keeps
at most `max_cached_merges` merges (LRU, by recipe); one evicted while rows still use it is freed when they
end. A request names at most `max_merge_sources` adapters.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from madapt.config.merge_rules import merge_problems
from madapt.lowrank import exact_merge
from madapt.serve.multilora import MultiLora, adapter_matrices
from madapt.serve.openai.errors import ProtocolError, shown

Recipe = tuple[tuple[str, float], ...]
"""A merge as sorted (resolved `NAME@N`, weight) pairs."""
Source = tuple[dict[str, Any], dict[str, torch.Tensor]]


def requested_merge(model: str, adapters: Any, max_sources: int) -> list[tuple[str, float]] | None:
    """The (name, weight) pairs a request asks to merge, or None when it names one adapter plainly. Every
    problem is a 400 naming `model` or `adapters`; the weights follow the rules of a published merge."""
    if adapters is None and "+" not in model:
        return None
    names = model.split("+")
    if any(not name for name in names) or len(names) > max_sources:
        raise _refused("model", f"{shown(model)}: a merge joins 1 to {max_sources} adapter names with '+'")
    if adapters is None:
        weights = [1.0] * len(names)
    elif not isinstance(adapters, dict) or not adapters:
        raise _refused("adapters", "adapters must be an object of adapter name -> weight")
    elif set(adapters) != set(names):
        joined = "+".join(adapters)
        raise _refused("adapters", f"adapters names {shown(joined)} but model names {shown(model)}: name the same")
    elif any(isinstance(w, bool) or not isinstance(w, int | float) for w in adapters.values()):
        raise _refused("adapters", "adapters: every weight must be a number")
    else:
        weights = [float(adapters[name]) for name in names]
    problems = merge_problems("", names, weights, "exact_linear", density=None, rank=None)
    if problems:
        raise _refused("model" if adapters is None else "adapters", "merge: " + "; ".join(problems))
    return list(zip(names, weights, strict=True))


def recipe_id(recipe: Recipe) -> str:
    """A readable, unique name for a recipe: `chat@1*0.3+coding@1*0.7` (also its slot's name)."""
    return "+".join(f"{ref}*{weight!r}" for ref, weight in recipe)


def _refused(param: str, message: str) -> ProtocolError:
    return ProtocolError(400, message, param=param, code="invalid_value")


class MergeCache:
    """A replica's merged adapters by recipe: built once into a `MultiLora` slot, at most `capacity` kept.

    `fetch(ref)` returns a source's (adapter_config, tensors) and raises what the replica maps to a status
    (not found, another base). Concurrent requests for one recipe share one build, which a request that
    goes away does not cancel.
    """

    def __init__(self, lora: MultiLora, capacity: int, fetch: Callable[[str], Awaitable[Source]]):
        self.lora, self.capacity, self.fetch = lora, capacity, fetch
        self.slots: OrderedDict[Recipe, int] = OrderedDict()
        self.building: dict[Recipe, asyncio.Task[None]] = {}

    async def acquire(self, recipe: Recipe) -> int:
        """The merge's slot, pinned (the caller unpins it when its request ends)."""
        while (slot := self.slots.get(recipe)) is None:  # again if evicted before this waiter woke
            if recipe not in self.building:
                self.building[recipe] = asyncio.create_task(self._build(recipe))
            await asyncio.shield(self.building[recipe])
        self.slots.move_to_end(recipe)
        self.lora.pin([slot])
        return slot

    async def _build(self, recipe: Recipe) -> None:
        try:
            sources = [await self.fetch(ref) for ref, _ in recipe]
            config, tensors = await asyncio.to_thread(exact_merge, sources, [w for _, w in recipe])
            matrices = adapter_matrices(recipe_id(recipe), config, tensors)
            self.slots[recipe] = await asyncio.to_thread(self.lora.load, matrices)
        finally:
            del self.building[recipe]
        while len(self.slots) > self.capacity:
            old, _ = self.slots.popitem(last=False)
            self.lora.unload(recipe_id(old))  # rows still on it keep it until they end (pins)
