"""Generate text with any stored adapter on one loaded base: adapters are attached once and switched,
never reloading the base."""

from __future__ import annotations

import torch

from madapt.data import render_prompt
from madapt.lora import attach
from madapt.models import LoadedBase
from madapt.store import AdapterStore

BASE_ID = "base"
"""The id that selects the base model without any adapter."""


class Predictor:
    def __init__(self, base: LoadedBase, store: AdapterStore):
        self.base = base
        self.store = store
        self.model = base.model
        self.loaded: dict[str, str] = {}  # adapter ref -> slot name in the PeftModel

    def use(self, ref: str) -> str:
        """Attach `ref` (NAME or NAME@VERSION) if needed; return the slot name to activate."""
        if ref in self.loaded:
            return self.loaded[ref]
        stored = self.store.open(ref, expected_fingerprint=self.base.fingerprint)
        slot = stored.ref.replace("@", "_v")
        if slot not in self.loaded.values():
            self.model = attach(self.model, stored, slot)
        self.loaded[ref] = slot
        return slot

    @torch.inference_mode()
    def generate(self, prompt: str, adapter: str | None = None, *, max_new_tokens: int = 48) -> str:
        """Greedy completion of `prompt` with `adapter` (None or 'base' for the bare base model)."""
        tokenizer = self.base.tokenizer
        inputs = tokenizer(render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(self.model.device)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
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
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
