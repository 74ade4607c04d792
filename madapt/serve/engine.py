"""Batched token generation over a `MultiLora` base: one row per request, each with its own adapter,
sampling settings, token budget and stop strings.

Rows are left-padded into one batch and decoded together with a KV cache; each row stops on EOS, a stop
string or its own `max_tokens`, and text is handed out as it grows (held back while it could still
turn into a stop string) so the HTTP layer can stream it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from madapt.serve.batching import MultiLora


@dataclass
class Row:
    """One request's generation: inputs, settings and (filled in) results."""

    prompt_ids: list[int]
    slot: int
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None


class Engine:
    def __init__(self, lora: MultiLora, tokenizer: PreTrainedTokenizerBase, *, context_length: int):
        self.lora = lora
        self.model = lora.model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos = {t for t in [tokenizer.eos_token_id] if t is not None}

    @torch.inference_mode()
    def generate(self, rows: list[Row], clock: Callable[[], float] | None = None) -> list[Row]:
        """Decode every row to completion in one batch; `clock` stamps each row's first token."""
        slots = [r.slot for r in rows]
        self.lora.begin_batch(slots)
        try:
            self._decode(rows, clock)
        finally:
            self.lora.end_batch(slots)
        return rows

    def _decode(self, rows: list[Row], clock: Callable[[], float] | None) -> None:
        device = next(self.model.parameters()).device
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [_generator(r.seed) if r.temperature > 0 else None for r in rows]
        cache = DynamicCache(config=self.model.config)
        for step in range(max(r.max_tokens for r in rows)):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.cache
            logits = out.logits[:, -1, :].float()
            tokens = logits.argmax(-1)
            for i, row in enumerate(rows):
                if row.finish_reason is not None:
                    continue
                token = int(tokens[i]) if generators[i] is None else _sample(logits[i], row, generators[i])
                tokens[i] = token
                if step == 0 and clock is not None:
                    row.first_token_s = clock()
                self._advance(row, token)
            if all(r.finish_reason is not None for r in rows):
                return
            ids = tokens.unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            positions = positions[:, -1:] + 1

    def _advance(self, row: Row, token: int) -> None:
        if token in self.eos:
            row.finish_reason = "stop"
        else:
            row.ids.append(token)
            row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = min((i for i in (row.text.find(s) for s in row.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text, row.finish_reason = row.text[:cut], "stop"
            elif len(row.ids) >= row.max_tokens:
                row.finish_reason = "length"
        ready = len(row.text) if row.finish_reason else len(row.text) - _held_back(row.text, row.stop)
        if ready > row.emitted and row.on_text is not None:
            row.on_text(row.text[row.emitted : ready])
        row.emitted = max(row.emitted, ready)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop string or a whole multi-byte character."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[-n:]):
                held = n
                break
    return held


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _sample(logits: torch.Tensor, row: Row, generator: torch.Generator) -> int:
    """Temperature + nucleus (top-p) sampling with the row's own generator, so a seed reproduces."""
    probs = torch.softmax(logits.cpu() / row.temperature, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < row.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
