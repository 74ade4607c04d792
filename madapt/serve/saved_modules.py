"""What an adapter saves besides its layers, served per row: PEFT's `modules_to_save` (whole trained copies
of base modules: an `lm_head`, an `embed_tokens`, a norm) and `trainable_token_indices` (some rows of an
embedding retrained, common when a chat template adds tokens).

`split_saved` takes these tensors out of an adapter, so its layers take their usual path (gathered LoRA, or
PEFT's own layers) and the rest is served here. `saved_layers` builds, for one adapter, a replacement per
base module: a copy of the module holding the saved tensors (its own, never the shared base's storage), or
for trainable tokens a layer that computes the base embedding and puts the adapter's rows in for its
tokens. `MultiLora` routes the rows of such an adapter through these replacements the way it routes the
per-adapter path (`index_select` the rows, run the replacement, `index_copy` them back), so in a mixed batch
only those rows pay for them and every other row is untouched.

Exactly as PEFT applies them: a saved module replaces the base module at its path only (a saved `lm_head`
on a base whose head is tied to the embedding leaves the embedding alone, as PEFT's copy does; with
`ensure_weight_tying` PEFT ties the head to the embedding's copy and saves it too); retrained tokens of the
input embedding also change the tied output head's logits for those tokens, as PEFT ties them, unless the
head has rows of its own. What cannot be applied that way is refused by name (`UnsupportedAdapter`). The
saved tensors are part of the adapter's stored tensors (the store's checksums cover them, the registry hands
them over with the rest); `SavedModules.nbytes` is what they hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.nn import functional

from madapt.adapter_types import PEFT_PREFIX, tensor_marker
from madapt.compat.torch import detached_copy
from madapt.serve.tuners import UnsupportedAdapter

TOKENS_DELTA = ".token_adapter.trainable_tokens_delta"
"""The key suffix of a TrainableTokens layer's rows (PEFT's name for them)."""
SAVED_OPTIONS = ("modules_to_save", "trainable_token_indices")
Layers = TypeVar("Layers")


@dataclass(frozen=True)
class SavedModules:
    """What an adapter saves besides its layers: whole modules by path (each its state dict, as PEFT saves
    it) and retrained embedding rows by path (token ids, their rows)."""

    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokens: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)
    tied: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """With `ensure_weight_tying`, the heads PEFT tied to a saved embedding's copy (and saved as well)."""
    ensure_weight_tying: bool = False
    adapted: frozenset[str] = frozenset()
    """The module paths the adapter's layers adapt: none may be replaced as well."""

    def __bool__(self) -> bool:
        return bool(self.modules or self.tokens or self.tied)

    @property
    def nbytes(self) -> int:
        """Bytes the saved tensors hold (as stored; a replica holds them in the base's dtype)."""
        tensors = [t for states in (self.modules, self.tied) for state in states.values() for t in state.values()]
        return sum(t.nbytes for t in [*tensors, *(rows for _, rows in self.tokens.values())])


@dataclass(frozen=True)
class WithSaved(Generic[Layers]):
    """An adapter as its layers are served (gathered factors, or PEFT's layers) plus what it saves besides."""

    adapter: Layers
    saved: SavedModules


def split_saved(
    ref: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], SavedModules]:
    """(the config without the saving options, the tensors of the adapter's layers, what it saves besides)."""
    names = config.get("modules_to_save") or []
    names = [names] if isinstance(names, str) else names
    indices = config.get("trainable_token_indices")
    if not names and not indices:
        return config, tensors, SavedModules()
    check_options(ref, names, indices)
    tie = bool(config.get("ensure_weight_tying"))
    try:
        marker = tensor_marker(str(config.get("peft_type", "")).lower())
    except (ValueError, KeyError):
        raise UnsupportedAdapter(
            f"{ref}: peft_type {config.get('peft_type')!r} is not a layer tuner serving runs"
        ) from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    tied: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, tuple[list[int], torch.Tensor]] = {}
    layers: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        path = key.removeprefix(PEFT_PREFIX)
        if indices and path.endswith(TOKENS_DELTA):
            module = path.removesuffix(TOKENS_DELTA)
            tokens[module] = (token_indices(ref, indices, module, tensor), tensor)
            continue
        owner = saved_module(path, names) if marker not in path else None
        if owner is not None:
            modules.setdefault(owner, {})[path.removeprefix(owner + ".")] = tensor
        elif tie and names and marker not in path:  # a head PEFT tied to a saved embedding (checked at build)
            owner, _, name = path.rpartition(".")
            tied.setdefault(owner, {})[name] = tensor
        else:
            layers[key] = tensor
    if indices and not tokens:
        raise UnsupportedAdapter(f"{ref}: trainable_token_indices is set but no {TOKENS_DELTA[1:]} is stored")
    rest = {k: v for k, v in config.items() if k not in SAVED_OPTIONS}
    adapted = frozenset(k.removeprefix(PEFT_PREFIX).split("." + marker)[0] for k in layers)
    return rest, layers, SavedModules(modules, tokens, tied, tie, adapted)


def check_options(ref: str, names: Any, indices: Any) -> None:
    """modules_to_save: a list of module names; trainable_token_indices: token ids, or per module name."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UnsupportedAdapter(f"{ref}: modules_to_save is not a list of module names: {names!r}")
    lists = list(indices.values()) if isinstance(indices, dict) else [indices or []]
    if not all(isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids) for ids in lists):
        raise UnsupportedAdapter(f"{ref}: trainable_token_indices is not token ids (or token ids per module)")


def saved_module(path: str, names: list[str]) -> str | None:
    """The module of `names` (modules_to_save, matched as PEFT matches them: a whole trailing part of a
    module path) that the tensor at `path` belongs to, or None."""
    for name in names:
        at = ("." + path).find("." + name + ".")
        if at >= 0:
            return path[: at + len(name)]
    return None


def token_indices(ref: str, indices: list[int] | dict[str, list[int]], module: str, rows: torch.Tensor) -> list[int]:
    """The token ids whose rows `module` retrains: trainable_token_indices' list (the input embedding), or
    its entry for that module."""
    if isinstance(indices, dict):
        found = [v for name, v in indices.items() if module == name or module.endswith("." + name)]
        if not found:
            raise UnsupportedAdapter(
                f"{ref}: trainable_token_indices has no entry for {module!r}, whose rows it stores"
            )
        indices = found[0]
    if rows.ndim != 2 or len(indices) != rows.shape[0]:
        raise UnsupportedAdapter(f"{ref}: {len(indices)} trainable token indices but {tuple(rows.shape)} stored rows")
    return [int(i) for i in indices]


def saved_layers(
    ref: str, saved: SavedModules, modules: dict[str, nn.Module], model: nn.Module
) -> dict[str, nn.Module]:
    """A replacement per base module path for the rows of this adapter. `modules`: every base module by
    path, unwrapped; `model`: the base model (which of its modules are tied to the input embedding)."""
    layers = {
        path: saved_copy(ref, path, state, base_module(ref, modules, path)) for path, state in saved.modules.items()
    }
    embedding = input_embedding(modules, model)
    if saved.tied or (saved.ensure_weight_tying and embedding in saved.modules):
        check_tied_copies(ref, saved, tied_heads(modules, embedding), embedding)
        layers.update({path: saved_copy(ref, path, state, modules[path]) for path, state in saved.tied.items()})
    for path, (indices, rows) in saved.tokens.items():
        if path in layers:
            raise UnsupportedAdapter(f"{ref}: {path!r} is saved whole and has retrained tokens as well")
        layers[path] = token_layer(ref, path, base_module(ref, modules, path), indices, rows)
        if path != embedding:
            continue
        for tied in tied_heads(modules, path):  # PEFT ties them to the embedding's rows, unless they have their own
            if tied in saved.modules:
                raise UnsupportedAdapter(f"{ref}: the head {tied!r} tied to the retrained tokens is saved as well")
            if tied not in saved.tokens:
                layers[tied] = token_layer(ref, tied, modules[tied], indices, rows)
    clash = sorted(a for a in saved.adapted for path in layers if a == path or a.startswith(path + "."))
    if clash:
        raise UnsupportedAdapter(f"{ref}: {clash[0]!r} is adapted by its layers and replaced by what it saves")
    return layers


def check_tied_copies(ref: str, saved: SavedModules, heads: list[str], embedding: str | None) -> None:
    """With `ensure_weight_tying`, PEFT ties each head sharing the embedding's weight to the embedding's saved
    copy and saves it as well: the stored heads must be exactly those, each holding that weight."""
    copy = saved.modules.get(embedding or "", {}).get("weight")
    for head in sorted({*saved.tied, *heads}):
        weight = saved.tied.get(head, {}).get("weight")
        if copy is None or head not in heads or weight is None or not torch.equal(weight, copy):
            raise UnsupportedAdapter(
                f"{ref}: ensure_weight_tying: {head!r} is not stored as a head tied to the saved embedding"
            )


def token_layer(ref: str, path: str, module: nn.Module, indices: list[int], rows: torch.Tensor) -> nn.Module:
    """PEFT's TrainableTokens layer over one base module: an embedding's rows, or an output head's logits."""
    if isinstance(module, nn.Embedding):
        size, width = module.num_embeddings, module.embedding_dim
    elif isinstance(module, nn.Linear):
        size, width = module.out_features, module.in_features
    else:
        raise UnsupportedAdapter(f"{ref}: trainable tokens of {path!r}, a {type(module).__name__}, are not served")
    if rows.ndim != 2 or rows.shape[1] != width or max(indices, default=0) >= size:
        raise UnsupportedAdapter(f"{ref}: trainable tokens of {path!r} do not fit its {tuple(module.weight.shape)}")
    return TokenRows(module, indices, rows) if isinstance(module, nn.Embedding) else TokenLogits(module, indices, rows)


def base_module(ref: str, modules: dict[str, nn.Module], path: str) -> nn.Module:
    module = modules.get(path)
    if module is None:
        raise UnsupportedAdapter(f"{ref}: the base model has no module {path!r} to replace")
    return module


def input_embedding(modules: dict[str, nn.Module], model: nn.Module) -> str | None:
    """The path of the base model's input embedding (compared unwrapped), or None."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    embedding = getattr(embedding, "base", embedding)  # madapt's routing wrapper keeps the module as `.base`
    return next((path for path, module in modules.items() if module is embedding), None)


def tied_heads(modules: dict[str, nn.Module], embedding: str | None) -> list[str]:
    """The paths of the modules whose weight is the embedding's own Parameter (an output head tied to it)."""
    weight = getattr(modules.get(embedding or ""), "weight", None)
    return [
        p for p, m in modules.items() if weight is not None and p != embedding and getattr(m, "weight", None) is weight
    ]


def saved_copy(ref: str, path: str, state: dict[str, torch.Tensor], module: nn.Module) -> nn.Module:
    """A copy of `module` (and of its submodules) holding `state` in the module's dtypes and device; the
    base's own parameters are never written."""
    twin = structure_copy(module)
    own = twin.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the module does not"
        raise UnsupportedAdapter(f"{ref}: the saved {path!r} {what}")
    cast = {}
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise UnsupportedAdapter(
                f"{ref}: the saved {path}.{key} is {tuple(tensor.shape)}, the base's {tuple(own[key].shape)}"
            )
        dtype = own[key].dtype if tensor.is_floating_point() else tensor.dtype
        cast[key] = tensor.to(device=own[key].device, dtype=dtype)
    twin.load_state_dict(cast, strict=True, assign=True)
    return twin.eval()


def structure_copy(module: nn.Module) -> nn.Module:
    """`detached_copy` all the way down: new module objects and Parameter objects, the same storage."""
    twin = detached_copy(module)
    twin._modules = {
        name: structure_copy(child) if child is not None else None for name, child in module._modules.items()
    }
    return twin


class TokenRows(nn.Module):
    """An embedding whose rows for some tokens are an adapter's (PEFT's TrainableTokensLayer): the base's
    lookup, with those tokens' rows put in."""

    def __init__(self, base: nn.Embedding, indices: list[int], rows: torch.Tensor):
        super().__init__()
        self.base = base
        weight = base.weight
        self.rows = rows.to(device=weight.device, dtype=weight.dtype)
        self.lookup = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=weight.device)
        self.lookup[torch.tensor(indices, device=weight.device)] = torch.arange(len(indices), device=weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        row = self.lookup[ids]
        hit = row >= 0
        if hit.any():
            scale = getattr(self.base, "embed_scale", None)  # Gemma's scaled embedding multiplies in its forward
            rows = self.rows[row[hit]]
            out = out.clone()
            out[hit] = rows * scale.to(rows.dtype) if isinstance(scale, torch.Tensor) else rows
        return out


class TokenLogits(nn.Module):
    """The output head tied to an embedding with retrained tokens: the base's logits, with those tokens'
    logits from the adapter's rows (PEFT's tied TrainableTokensLayer: `F.linear` over the merged weight)."""

    def __init__(self, head: nn.Linear, indices: list[int], rows: torch.Tensor):
        super().__init__()
        self.head = head
        self.rows = rows.to(device=head.weight.device, dtype=head.weight.dtype)
        self.indices = torch.tensor(indices, device=head.weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = functional.linear(hidden, self.head.weight)  # PEFT's tied layer leaves out any bias
        out[..., self.indices] = functional.linear(hidden, self.rows)
        return out
