"""`/v1/models` and the names a request gives: the model cards, and what `model` resolves to (a version, a
label, a traffic split's arm, `default`, a per-request merge), as vLLM's `serving_models.py` holds its
model names."""

from __future__ import annotations

import asyncio
import logging

from madapt.predict import BASE_ID
from madapt.serve.args import ACTIVE_ALIAS, ServeArgs
from madapt.serve.openai.errors import ProtocolError
from madapt.serve.openai.parsing import _check_requested
from madapt.serve.openai.protocol import ModelCard, ModelList, SamplingRequest
from madapt.serve.registry import error_status
from madapt.serve.request_merges import Recipe, requested_merge, resolved
from madapt.store import StoreError
from madapt.store.releases import Resolution, Resolver

log = logging.getLogger(__name__)

_skipped: set[str] = set()


def _skip(entry: str, error: Exception) -> None:
    """Log a store entry that cannot be listed, once per process."""
    if entry not in _skipped and len(_skipped) < 1024:
        _skipped.add(entry)
        log.warning("/v1/models: skipping store entry %s: %s", entry[:200], error)


def _store_refusal(error: StoreError) -> ProtocolError:
    status = error_status(error)
    code = {404: "model_not_found", 400: "invalid_value"}.get(status)
    return ProtocolError(status, str(error), param="model", code=code)


def _user(body: SamplingRequest) -> str | None:
    """The OpenAI `user` field, which makes a traffic split sticky (a string; anything else is ignored)."""
    user = getattr(body, "user", None)
    return user[:256] if isinstance(user, str) and user else None


class OpenAIServingModels:
    """The model cards of `/v1/models` and the resolution of a request's `model`, through `resolver`
    (cached for `resolve_ttl_s`)."""

    def __init__(self, settings: ServeArgs, resolver: Resolver):
        self.settings, self.resolver = settings, resolver

    async def listing(self) -> ModelList:
        """Base and every adapter: what `NAME` serves (`version`), its `versions`, `aliases` and `split`.
        Cached for `resolve_ttl_s`; each version's manifest is read once."""
        try:
            cards = [ModelCard.model_validate(c) for c in await asyncio.to_thread(self.resolver.cards, _skip)]
        except Exception as error:  # the store itself cannot be listed (unreachable bucket, ...)
            log.exception("listing the adapter store failed")
            raise ProtocolError(503, f"the adapter store could not be listed ({type(error).__name__})") from None
        if self.settings.active is not None:
            try:
                default = [await asyncio.to_thread(self._default_card)]
            except StoreError as error:  # the active adapter is not published (yet)
                _skip(ACTIVE_ALIAS, error)
                default = []
            cards = [*default, *(card for card in cards if card.id != ACTIVE_ALIAS)]
        return ModelList(data=[self._base_card(), *cards])

    async def card(self, model_id: str) -> ModelCard:
        """One model: `base`, an adapter (what `NAME` serves) or `NAME@VERSION`, `NAME@LABEL`, `NAME@latest`."""
        if model_id == BASE_ID:
            return self._base_card()
        _check_requested(model_id)
        try:
            if model_id == ACTIVE_ALIAS and self.settings.active is not None:
                return await asyncio.to_thread(self._default_card)
            return ModelCard.model_validate(await asyncio.to_thread(self.resolver.card, model_id))
        except StoreError as error:
            raise _store_refusal(error) from None

    def _base_card(self) -> ModelCard:
        return ModelCard(id=BASE_ID, created=0, root=self.settings.base_model)

    def _default_card(self) -> ModelCard:
        """`default`: the active adapter's card under that id, with `active` naming the adapter."""
        active = self.settings.active
        assert active is not None
        card = self._base_card().model_dump() if active == BASE_ID else self.resolver.card(active)
        return ModelCard.model_validate({**card, "id": ACTIVE_ALIAS, "active": active})

    async def resolve(self, requested: str, user: str | None = None) -> Resolution:
        """The ref serving `requested` by the rule in madapt.store.releases ('base' stays; 'coding' is a split arm,
        the `prod` label's version or the newest; 'coding@prod' a label; 'coding@3' that version, 404 once
        deleted, even while a replica still holds it; 'default' the `active` adapter). Cached for
        `resolve_ttl_s`: no store round trip in the steady state. Unknown ids are 404, malformed ones 400."""
        if requested == ACTIVE_ALIAS and self.settings.active is not None:
            requested = self.settings.active
        if requested == BASE_ID:
            return Resolution(BASE_ID)
        _check_requested(requested)
        try:
            if self.resolver.fresh(requested):
                return self.resolver.resolve(requested, user)
            return await asyncio.to_thread(self.resolver.resolve, requested, user)
        except StoreError as error:
            raise _store_refusal(error) from None

    async def resolve_merge(self, requested: str, body: SamplingRequest) -> Recipe | None:
        """The recipe of a per-request merge (`madapt.serve.request_merges`): each source resolved as a
        `model` is; None when the request names one adapter plainly."""
        asked = requested_merge(requested, body.adapters, body.merge, self.settings.max_merge_sources)
        if asked is None:
            return None
        refs = []
        for name, _ in asked.sources:
            ref = (await self.resolve(name, _user(body))).ref
            if ref == BASE_ID:
                raise ProtocolError(400, "a merge cannot include 'base': it has no adapter", param="model")
            refs.append(ref)
        return resolved(asked, refs)
