"""Per-request merges, as LoRAX's `merged_adapters`: a request names a weighted set of published adapters
and is served by their merge, built into a batch slot of the replica that serves it.

The request says it with plain OpenAI body fields (`extra_body` in the client):

* `model: "coding+chat"`: the exact sum of the two, each with weight 1 (LoRAX's default weights);
* `model: "coding+chat"` with `adapters: {"coding": 0.7, "chat": 0.3}`: those weights. `adapters` must name
  the same adapters as `model` (any order), so the response's `model` always says what was served; a
  single adapter with a weight (`model: "coding", adapters: {"coding": 0.5}`) scales it;
* either, with `merge: {"combination_type": "ties", "density": 0.5, "majority_sign_method": "total"}`: a
  published merge's other combination types (TIES, DARE, magnitude pruning, PEFT's linear and cat, madapt's
  svd). `seed` (DARE only, default 0 as in `madapt merge`) seeds DARE's random drop, so one recipe always
  builds the same adapter. The pruning svd types are not built per request: each needs a dense SVD of every
  adapted module (publish those with `madapt merge`). Keys, types and values follow a published merge's rules
  (`merge_problems`); each problem is a 400 naming `merge` (or the key).

Each name resolves as a plain `model` does (a version, a label, a traffic split), so the recipe holds resolved
`NAME@N` refs with their weights and the merge's parameters: publishing a new version makes a new recipe.
The adapter is built by the very function `madapt merge` publishes with (`madapt.merge.merge_adapters`), so a
recipe serves the same adapter as the merge published with `sources` in the recipe's order and its weights and
parameters. The exact sum (`exact_linear`, the default) is B = [B_1 .. B_n], A = [w_1 s_1 A_1; ..; w_n s_n A_n]
(each source's LoRA scale s_i folded in): its rank is the sum of the sources' ranks and its delta does not
depend on their order, so its recipe sorts them (`a+b` and `b+a` share a slot). For every other type the
sources keep `model`'s order, as a published merge's `sources` list: DARE draws each source's mask in turn.
Weights are used as given (a config's `adapters.merge` normalises its weights to sum 1).

A replica keeps at most `max_cached_merges` merges (LRU, by recipe); one evicted while rows still use it is
freed when they end. A request names at most `max_merge_sources` adapters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from madapt.config import COMBINATION_TYPES, CombinationType, MajoritySignMethod
from madapt.config.merge_rules import SIGN_TYPES, merge_problems
from madapt.merge import MergeSpec, merge_adapters
from madapt.serve.adapter_tiers import AdapterTiers
from madapt.serve.multilora import MultiLora, adapter_matrices
from madapt.serve.openai.errors import ProtocolError, shown
from madapt.store import Manifest, StoredAdapter
from madapt.store.manifest import as_list
from madapt.store.refs import Ref

Source = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""A published adapter as (adapter_config, tensors)."""
EXACT = "exact_linear"
REQUEST_TYPES = tuple(kind for kind in COMBINATION_TYPES if kind == "svd" or not kind.endswith("_svd"))
"""The combination types built per request: all but the pruning svd types (a dense SVD per module)."""
DRAWING_TYPES = frozenset({"dare_linear", "dare_ties"})
"""The types that draw at random, so read `seed`."""
MERGE_KEYS = ("combination_type", "density", "majority_sign_method", "seed")
MAX_SEED = 2**63 - 1
MERGED_NAME = "request-merge"
"""The name the merge is built under (it names nothing outside the build)."""


@dataclass(frozen=True)
class Recipe:
    """A per-request merge: its sources as (resolved `NAME@N`, weight) pairs and how they combine."""

    sources: tuple[tuple[str, float], ...]
    combination_type: str = EXACT
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    def spec(self) -> MergeSpec:
        """The published merge of this recipe."""
        return MergeSpec(
            name=MERGED_NAME,
            sources=tuple(ref for ref, _ in self.sources),
            weights=tuple(weight for _, weight in self.sources),
            combination_type=cast(CombinationType, self.combination_type),
            density=self.density,
            seed=self.seed,
            majority_sign_method=cast(MajoritySignMethod, self.majority_sign_method),
        )


def requested_merge(model: str, adapters: Any, merge: Any, max_sources: int) -> Recipe | None:
    """The merge a request asks for (sources by the names it gives), or None when it names one adapter
    plainly. Every problem is a 400 naming `model`, `adapters` or `merge`; the rules are a published merge's."""
    if adapters is None and merge is None and "+" not in model:
        return None
    if adapters is None and "+" not in model:
        raise _refused("merge", "merge needs adapters to merge: name them in model ('a+b') or in adapters")
    names = model.split("+")
    if any(not name for name in names) or len(names) > max_sources:
        raise _refused("model", f"{shown(model)}: a merge joins 1 to {max_sources} adapter names with '+'")
    weights = _weights(names, adapters, model)
    problems = merge_problems("", names, weights, EXACT, density=None, rank=None)
    if problems:
        raise _refused("model" if adapters is None else "adapters", "merge: " + "; ".join(problems))
    recipe = Recipe(tuple(zip(names, weights, strict=True)), **merge_parameters(merge))
    problems = merge_problems(
        "",
        names,
        weights,
        recipe.combination_type,
        density=recipe.density,
        rank=None,
        majority_sign_method=recipe.majority_sign_method,
    )
    if problems:
        raise _refused("merge", "merge: " + "; ".join(problems))
    return recipe


def _weights(names: list[str], adapters: Any, model: str) -> list[float]:
    """Each name's weight: 1 without `adapters`, else the one `adapters` gives it."""
    if adapters is None:
        return [1.0] * len(names)
    if not isinstance(adapters, dict) or not adapters:
        raise _refused("adapters", "adapters must be an object of adapter name -> weight")
    if set(adapters) != set(names):
        joined = "+".join(adapters)
        raise _refused("adapters", f"adapters names {shown(joined)} but model names {shown(model)}: name the same")
    if any(isinstance(w, bool) or not isinstance(w, int | float) for w in adapters.values()):
        raise _refused("adapters", "adapters: every weight must be a number")
    return [float(adapters[name]) for name in names]


def merge_parameters(merge: Any) -> dict[str, Any]:
    """A request's `merge` object as Recipe fields ({} without one: the exact sum); a wrong key or type is
    a 400 naming it. The values' ranges are `merge_problems`' to check."""
    if merge is None:
        return {}
    if not isinstance(merge, dict):
        raise _refused("merge", f"merge must be an object with keys {list(MERGE_KEYS)}")
    unknown = [key for key in merge if key not in MERGE_KEYS]
    if unknown:
        raise _refused("merge", f"merge: unknown key {shown(unknown[0])}; use {list(MERGE_KEYS)}")
    kind = merge.get("combination_type")
    if kind not in REQUEST_TYPES:
        raise _refused(
            "merge.combination_type",
            f"merge.combination_type {shown(kind)} is not one of {list(REQUEST_TYPES)} (the pruning svd types need "
            "a dense SVD of every module: publish them with madapt merge)",
        )
    density, method, seed = merge.get("density"), merge.get("majority_sign_method", "total"), merge.get("seed", 0)
    if density is not None and (isinstance(density, bool) or not isinstance(density, int | float)):
        raise _refused("merge.density", f"merge.density must be a number in (0, 1], got {shown(density)}")
    if not isinstance(method, str):
        raise _refused("merge.majority_sign_method", "merge.majority_sign_method must be 'total' or 'frequency'")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise _refused("merge.seed", f"merge.seed must be an integer from 0 to {MAX_SEED}, got {shown(seed)}")
    if "seed" in merge and kind not in DRAWING_TYPES:
        raise _refused("merge.seed", f"merge.seed is only used by {sorted(DRAWING_TYPES)}, not {kind!r}")
    return {
        "combination_type": kind,
        "density": None if density is None else float(density),
        "majority_sign_method": method,
        "seed": seed,
    }


def resolved(recipe: Recipe, refs: Sequence[str]) -> Recipe:
    """The recipe with its sources' names replaced by the refs they resolve to (in order), sorted for the
    exact sum, whose delta does not depend on the order."""
    sources = tuple(zip(refs, (weight for _, weight in recipe.sources), strict=True))
    return dataclasses.replace(recipe, sources=tuple(sorted(sources)) if recipe.combination_type == EXACT else sources)


def recipe_id(recipe: Recipe) -> str:
    """A readable, unique name for a recipe (also its slot's name): `chat@1*0.3+coding@1*0.7` for the exact
    sum, `ties(coding@1*0.7+chat@1*0.3,density=0.5,majority_sign_method=total)` for another type."""
    summed = "+".join(f"{ref}*{weight!r}" for ref, weight in recipe.sources)
    if recipe.combination_type == EXACT:
        return summed
    parameters = [f"density={recipe.density!r}"] if recipe.density is not None else []
    if recipe.combination_type in SIGN_TYPES:
        parameters.append(f"majority_sign_method={recipe.majority_sign_method}")
    if recipe.combination_type in DRAWING_TYPES:
        parameters.append(f"seed={recipe.seed}")
    return f"{recipe.combination_type}({','.join([summed, *parameters])})"


def build(recipe: Recipe, sources: Sequence[Source]) -> Source:
    """The recipe's adapter from its sources' (config, tensors), by `madapt merge`'s own function. The
    registry verified the sources; their manifests here carry what the merge reads of them, their refs."""
    opened = [
        StoredAdapter(_manifest(ref, config), config, tensors)
        for (ref, _), (config, tensors) in zip(recipe.sources, sources, strict=True)
    ]
    return merge_adapters(opened, recipe.spec())


def _manifest(ref: str, config: dict[str, Any]) -> Manifest:
    parsed = Ref.parse(ref, labels=False, check_name=False)
    return Manifest(
        name=parsed.name,
        version=parsed.version or 0,
        base_model=str(config.get("base_model_name_or_path") or ""),
        base_fingerprint="",
        r=int(config.get("r") or 0),
        alpha=float(config.get("lora_alpha") or 0),
        target_modules=as_list(config.get("target_modules")),
        files={},
        peft_type=str(config.get("peft_type") or "LORA"),
    )


def _refused(param: str, message: str) -> ProtocolError:
    return ProtocolError(400, message, param=param, code="invalid_value")


class MergeCache:
    """A replica's merged adapters by recipe: built once into a `MultiLora` slot, at most `capacity` kept;
    with the replica's `tiers`, inside its byte budget too (`AdapterTiers.hold`): a rank-64 merge weighs
    what it holds, and the budget may push it out as it does any adapter.

    `fetch(ref)` returns a source's (adapter_config, tensors) and raises what the replica maps to a status
    (not found, another base). Concurrent requests for one recipe share one build, which a request that
    goes away does not cancel.
    """

    def __init__(
        self,
        lora: MultiLora,
        capacity: int,
        fetch: Callable[[str], Awaitable[Source]],
        tiers: AdapterTiers | None = None,
    ):
        self.lora, self.capacity, self.fetch, self.tiers = lora, capacity, fetch, tiers
        self.slots: OrderedDict[Recipe, int] = OrderedDict()
        self.building: dict[Recipe, asyncio.Task[None]] = {}
        self.merging = asyncio.Lock()  # one build at a time: DARE seeds torch's global generator, then draws

    async def acquire(self, recipe: Recipe) -> int:
        """The merge's slot, pinned (the caller unpins it when its request ends)."""
        while (slot := self.slots.get(recipe)) is None:  # again if evicted before this waiter woke
            if recipe not in self.building:
                self.building[recipe] = asyncio.create_task(self._build(recipe))
            await asyncio.shield(self.building[recipe])
        self.slots.move_to_end(recipe)
        self.lora.pin([slot])
        if self.tiers is not None:
            self.tiers.use(recipe_id(recipe))  # the caller calls `tiers.done` when its request ends
        return slot

    async def _build(self, recipe: Recipe) -> None:
        try:
            sources = [await self.fetch(ref) for ref, _ in recipe.sources]
            async with self.merging:
                config, tensors = await asyncio.to_thread(build, recipe, sources)
            matrices = adapter_matrices(recipe_id(recipe), config, tensors)
            if self.tiers is None:
                self.slots[recipe] = await asyncio.to_thread(self.lora.load, matrices)
            else:  # inside the replica's byte budget: the budget may push it out, and then it is forgotten here
                forget = functools.partial(self.slots.pop, recipe, None)
                self.slots[recipe] = await self.tiers.hold(matrices.ref, matrices, forget)
        finally:
            del self.building[recipe]
        while len(self.slots) > self.capacity:
            old, _ = self.slots.popitem(last=False)
            self._unload(recipe_id(old))  # rows still on it keep it until they end (pins)

    def _unload(self, ref: str) -> None:
        if self.tiers is None:
            self.lora.unload(ref)
        else:
            self.tiers.drop(ref)
