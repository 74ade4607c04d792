"""Generate text with any stored adapter on one loaded base: adapters are attached once and switched,
never reloading the base."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from madapt.data import render_prompt
from madapt.lora import adapter_kind, attach, attached_kind
from madapt.models import LoadedBase
from madapt.store import AdapterStore

BASE_ID = "base"
"""The id that selects the base model without any adapter."""


DEFAULT_GENERATION = {"max_new_tokens": 48, "do_sample": False}
"""Greedy, 48 new tokens: what `predict` does when the config's `generation` section says nothing."""


class Predictor:
    def __init__(
        self,
        base: LoadedBase,
        store: AdapterStore,
        generation: dict[str, Any] | None = None,
    ):
        """`generation`: Ludwig's generation section (Config.generation.kwargs()), the defaults of `generate`.
        Prompts come formatted as training formatted its rows (Model.prompts_of)."""
        self.base = base
        self.store = store
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        self.model = base.model
        self.loaded: dict[str, str] = {}  # adapter ref -> slot name in the PeftModel

    def use(self, ref: str) -> str:
        """Attach `ref` (NAME or NAME@VERSION) if needed; return the slot name to activate."""
        if ref in self.loaded:
            return self.loaded[ref]
        stored = self.store.open(ref, expected_fingerprint=self.base.fingerprint)
        slot = stored.ref.replace("@", "_v")
        if slot not in self.loaded.values():
            if isinstance(self.model, PeftModel) and attached_kind(self.model) != adapter_kind(stored.config):
                self.model = self.model.unload()  # PEFT holds one adapter type per model: swap the set
                self.loaded.clear()
            self.model = attach(self.model, stored, slot)
        self.loaded[ref] = slot
        return slot

    def generate(
        self, prompt: str, adapter: str | None = None, *, max_new_tokens: int | None = None, **options: Any
    ) -> str:
        """Complete `prompt` with `adapter` (None or 'base' for the bare base model): the config's generation
        settings (greedy by default), overridden by `max_new_tokens` and `options`."""
        return self.generate_batch([prompt], adapter, max_new_tokens=max_new_tokens, **options)[0]

    @torch.inference_mode()
    def generate_batch(
        self, prompts: list[str], adapter: str | None = None, *, max_new_tokens: int | None = None, **options: Any
    ) -> list[str]:
        """`generate` for several prompts in one left-padded `generate` call: each row's positions and
        attention skip its padding, so greedy output is each prompt's alone (up to float ties)."""
        tokenizer = self.base.tokenizer
        rendered = [render_prompt(tokenizer, prompt) for prompt in prompts]
        inputs = tokenizer(rendered, return_tensors="pt", add_special_tokens=False, padding=True, padding_side="left")
        inputs = inputs.to(self.model.device)
        kwargs = {"pad_token_id": tokenizer.pad_token_id, **self.generation, **options}
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        if adapter in (None, BASE_ID):
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    output = self.model.generate(**inputs, **kwargs)
            else:
                output = self.model.generate(**inputs, **kwargs)
        else:
            slot = self.use(adapter)  # may wrap the base in a PeftModel: resolve before touching self.model
            self.model.set_adapter(slot)
            output = self.model.generate(**inputs, **kwargs)
        answers = output[:, inputs["input_ids"].shape[1] :]
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in answers]
