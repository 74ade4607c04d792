"""Per-row token choice: logits processors, greedy or seeded sampling, and the logprobs a row asks for.

Every row of a batch has its own settings, and one row's settings never change another row's token: a
row that needs nothing (greedy, no processors) takes the batch's argmax, the others are processed row
by row. The seam is `Row.processors`, a list of `LogitsProcessor`s applied in order to the row's logits
before it picks its token; the penalties are processors (`penalties`), and a logits mask (structured
output) is one more.

Semantics are vLLM's (OpenAI's for presence and frequency):

- `repetition_penalty` (CTRL, as vLLM and transformers apply it): the logit of every token seen in the
  prompt or the output so far is divided by the penalty when positive and multiplied when negative;
- `presence_penalty`, `frequency_penalty`: `logit -= presence * [count > 0] + frequency * count`, with
  `count` the token's occurrences in the output so far;
- greedy rows take the argmax of the processed logits; sampled rows divide by `temperature`, keep the
  `top_k` most likely tokens, drop those below `min_p` times the likeliest one's probability, then keep
  the nucleus of mass `top_p`.

Logprobs are the model's own: the log-softmax of the raw logits, before penalties, masks, temperature
and truncation (vLLM's default, `raw_logprobs`). They are what scoring needs (`echo` with `logprobs`
scores a text), and prompt tokens can have no other kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
"""`(the row's output ids so far, its logits [vocab]) -> new logits`; must not change its input in place."""


class Row(Protocol):
    """What sampling reads of a row (`madapt.serve.engine.Row`), and its generator, set on first use."""

    ids: list[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    generator: torch.Generator | None
    processors: list[LogitsProcessor]

    @property
    def greedy(self) -> bool: ...


@dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob and the `top` alternatives, most likely first, as (token id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class RepetitionPenalty:
    """CTRL's repetition penalty over the prompt and the output so far."""

    def __init__(self, prompt_ids: list[int], penalty: float):
        self.prompt, self.penalty = torch.tensor(prompt_ids, dtype=torch.long), penalty

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        output = torch.tensor(output_ids, dtype=torch.long)
        seen = torch.cat([self.prompt, output]).to(logits.device)
        picked = logits[seen]
        penalized = logits.clone()
        penalized[seen] = torch.where(picked > 0, picked / self.penalty, picked * self.penalty)
        return penalized


class OutputPenalty:
    """OpenAI's presence and frequency penalties over the output so far."""

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not output_ids:
            return logits
        ids = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
        return logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)


def penalties(
    prompt_ids: list[int], *, repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0
) -> list[LogitsProcessor]:
    """The processors for these penalties; none for the neutral values."""
    processors: list[LogitsProcessor] = []
    if repetition != 1.0:
        processors.append(RepetitionPenalty(prompt_ids, repetition))
    if presence or frequency:
        processors.append(OutputPenalty(presence, frequency))
    return processors


def greedy(logits: torch.Tensor, *, kernel: bool) -> torch.Tensor:
    """Each row's argmax of `logits` `[rows, vocab]` (the first of equal maxima, the first NaN where there is
    one), in madapt's kernel (`kernel`: `madapt.serve.native`'s `argmax_rows`, ~20x torch's on fp32 CPU
    logits) where it applies."""
    if kernel and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() == 2:
        return torch.ops.madapt_cpu.argmax_rows(logits.contiguous())
    return logits.argmax(-1)


def plain(row: Row) -> bool:
    """Whether the row takes the batch's argmax as it is (greedy, nothing to process)."""
    return row.greedy and not row.processors


def pick(logits: torch.Tensor, row: Row) -> int:
    """The row's next token from its raw logits: processors, then greedy or its own seeded sampler."""
    for process in row.processors:
        logits = process(row.ids, logits)
    if row.greedy:
        return int(logits.argmax())
    return sample(logits, row)


def sample(logits: torch.Tensor, row: Row) -> int:
    """Temperature, top-k, min-p and nucleus (top-p) sampling with the row's own generator (a seed
    reproduces)."""
    if not (math.isfinite(row.temperature) and 0 < row.top_p <= 1 and 0 <= row.min_p <= 1 and row.top_k >= -1):
        raise ValueError(
            f"invalid sampling settings: temperature={row.temperature}, top_p={row.top_p}, "
            f"top_k={row.top_k}, min_p={row.min_p}"
        )
    if row.generator is None:
        row.generator = generator(row.seed)
    logits = logits.cpu().float() / row.temperature
    if 0 < row.top_k < logits.shape[-1]:
        kth = logits.topk(row.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if row.min_p > 0:
        probs = probs.masked_fill(probs < row.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if row.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < row.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def generator(seed: int | None) -> torch.Generator:
    made = torch.Generator()
    if seed is None:
        made.seed()
    else:
        made.manual_seed(seed)
    return made


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry from one position's log-softmax, with its `top` alternatives."""
    best = logprobs.topk(min(top, logprobs.shape[-1])) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it (`logits`: the prompt's positions, in order);
    the first token has none."""
    if len(prompt_ids) < 2:
        return [None] * len(prompt_ids)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return [None, *(token_logprob(lp, t, top) for lp, t in zip(logprobs, prompt_ids[1:], strict=True))]
