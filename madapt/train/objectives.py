"""What one micro-batch's loss is, chosen from trainer.type: fine-tuning's own loss (the model's token
cross-entropy) or a preference objective (madapt/preference.py) on a collated preference batch, with the rows,
batches and held-out scores each kind needs. The loop (loop.py) runs whichever `objective_for` returns, in both
drivers and under every strategy.

- dpo (sigmoid, ipo) / orpo: a batch of n pairs is 2n rows, chosen first (preference_data.collate_pairs); one
  policy forward scores both halves. DPO's reference log-probs come from the same model with its adapters
  disabled, under no_grad, once per batch; ORPO has no reference and adds the chosen half's token-mean NLL.
- kto: n labelled rows plus their mismatched KL rows (`kl_*` keys): KL(pi || pi_ref) from the KL rows, no
  gradient, averaged over the data-parallel ranks when there are several.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from madapt import data, preference
from madapt.preference_data import (
    KtoExample,
    PreferenceExample,
    accuracy_pairs,
    collate_kto,
    collate_pairs,
    mismatched,
    tokenize_kto,
    tokenize_pair,
)
from madapt.train.settings import PreferenceSettings, TrainSettings

Batch = dict[str, torch.Tensor]
Collate = Callable[[Sequence[Any], int], Batch]


@dataclass
class Outcome:
    """A micro-batch's loss (to backpropagate) and what the trackers show of it (rewards/*, kl, ...)."""

    loss: torch.Tensor
    metrics: dict[str, float]


Objective = Callable[[torch.nn.Module, Batch], Outcome]


def finetune(model: torch.nn.Module, batch: Batch) -> Outcome:
    return Outcome(model(**batch).loss, {})


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over Ray Train's data-parallel ranks (itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone().reshape(1).float()
    dist.all_reduce(total)
    return (total / dist.get_world_size()).reshape(value.shape).to(value.dtype)


def forward_logps(model: torch.nn.Module, batch: Batch, *, average: bool, prefix: str = "") -> torch.Tensor:
    """The model's per-row completion log-probabilities of a batch (the `prefix`ed keys of it)."""
    logits = model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).logits
    return preference.sequence_logps(logits, batch[prefix + "labels"], average=average)


def reference_of(model: torch.nn.Module, batch: Batch, *, average: bool, prefix: str = "") -> torch.Tensor:
    """The base's log-probabilities (adapters disabled, no_grad): the reference of DPO and KTO."""
    rows = {key: batch[prefix + key] for key in ("input_ids", "attention_mask", "labels")}
    return preference.reference_logps(model, rows, average=average)


def pair_objective(settings: PreferenceSettings, model: torch.nn.Module, batch: Batch) -> Outcome:
    """DPO / IPO / ORPO on 2n rows, the n chosen first."""
    average = preference.uses_mean_logps(settings.kind, settings.loss_type)
    reference = None
    if preference.needs_reference(settings.kind):
        reference = reference_of(model, batch, average=average).chunk(2)  # before the graph-building forward
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token, mask = preference.token_logps(logits, batch["labels"])
    sums, counts = per_token.sum(-1), mask.sum(-1)
    policy_chosen, policy_rejected = (sums / counts.clamp(min=1) if average else sums).chunk(2)
    if settings.kind == "orpo":
        half = len(sums) // 2
        chosen_nll = -sums[:half].sum() / counts[:half].sum().clamp(min=1)
        result = preference.orpo_loss(policy_chosen, policy_rejected, chosen_nll, beta=settings.beta)
        return Outcome(result.loss, {**result.metrics(), "nll_loss": float(chosen_nll.detach())})
    assert reference is not None
    if settings.loss_type == "ipo":
        result = preference.ipo_loss(policy_chosen, policy_rejected, *reference, beta=settings.beta)
    else:
        result = preference.dpo_loss(
            policy_chosen, policy_rejected, *reference, beta=settings.beta, label_smoothing=settings.label_smoothing
        )
    return Outcome(result.loss, result.metrics())


def kto_objective(settings: PreferenceSettings, model: torch.nn.Module, batch: Batch) -> Outcome:
    """KTO on n labelled rows, its reference point from the batch's mismatched `kl_` rows."""
    reference = reference_of(model, batch, average=False)
    reference_kl = reference_of(model, batch, average=False, prefix="kl_")
    with torch.no_grad():
        policy_kl = forward_logps(model, batch, average=False, prefix="kl_")
    kl = mean_over_ranks(preference.kto_kl(policy_kl, reference_kl))
    result = preference.kto_loss(
        forward_logps(model, batch, average=False),
        reference,
        batch["desirable"],
        kl,
        beta=settings.beta,
        desirable_weight=settings.desirable_weight,
        undesirable_weight=settings.undesirable_weight,
    )
    return Outcome(result.loss, result.metrics(paired=False))


def objective_for(settings: TrainSettings) -> Objective:
    """The micro-batch loss trainer.type asks for."""
    chosen = settings.preference
    if chosen is None:
        return finetune
    return functools.partial(kto_objective if chosen.kind == "kto" else pair_objective, chosen)


# -- rows and batches ------------------------------------------------------------------------------


def collate_kto_with_kl(rows: Sequence[dict[str, list[int]]], pad_token_id: int, *, max_length: int) -> Batch:
    """A KTO batch and its mismatched KL rows (`kl_input_ids`, ...); a lone row is its own KL row."""
    kl_rows = mismatched(rows, max_length) if len(rows) > 1 else list(rows)
    kl = data.collate(kl_rows, pad_token_id)
    return {**collate_kto(rows, pad_token_id), **{"kl_" + key: value for key, value in kl.items()}}


def collate_for(settings: TrainSettings) -> Collate:
    """How tokenised rows become a micro-batch: `data.collate`, pairs, or KTO rows with their KL rows."""
    chosen = settings.preference
    if chosen is None:
        return data.collate
    if chosen.kind == "kto":
        return functools.partial(collate_kto_with_kl, max_length=settings.max_length)
    return collate_pairs


def sequences(rows: Sequence[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """Every tokenised sequence of the rows (a pair's chosen and rejected)."""
    return [part for row in rows for part in ((row["chosen"], row["rejected"]) if "chosen" in row else (row,))]


def tokenize_preference(
    tokenizer: Any, examples: Sequence[PreferenceExample | KtoExample], max_length: int
) -> tuple[list[dict[str, Any]], data.Truncation]:
    """Preference examples as training rows (tokenize_pair / tokenize_kto), with the sequences max_length
    reached (counted as cut; how many tokens were cut is not known here)."""
    rows: list[dict[str, Any]] = [
        tokenize_kto(tokenizer, e, max_length) if isinstance(e, KtoExample) else tokenize_pair(tokenizer, e, max_length)
        for e in examples
    ]
    cut = sum(len(row["input_ids"]) >= max_length for row in sequences(rows))
    return rows, data.Truncation(cut, 0, max_length)


# -- held-out preference scores ----------------------------------------------------------------------


@dataclass
class PreferenceHeldOut:
    """Held-out preference data: `rows` the objective scores at each evaluation (eval/loss, eval/rewards/*)
    and `pairs` (tokenised) that preference accuracy is measured on, with the adapter and with it disabled."""

    objective: Objective
    collate: Collate
    rows: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    pad_token_id: int
    batch_size: int
    device: torch.device

    def batches(self, rows: Sequence[Any], collate: Collate) -> Iterator[tuple[int, Batch]]:
        """(rows in it, the batch on the device) for each held-out micro-batch."""
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            yield len(chunk), {k: v.to(self.device) for k, v in collate(chunk, self.pad_token_id).items()}

    def score(self, model: torch.nn.Module) -> tuple[float | None, dict[str, float]]:
        """The objective's mean loss and metrics over the held-out rows (None without any); leaves the model
        training. Every Ray Train rank scores the same rows (a collective under FSDP)."""
        if not self.rows:
            return None, {}
        model.eval()
        loss, totals, counts = 0.0, dict[str, float](), dict[str, int]()
        with torch.no_grad():
            for n, batch in self.batches(self.rows, self.collate):
                outcome = self.objective(model, batch)
                loss += float(outcome.loss) * n
                for key, value in outcome.metrics.items():
                    totals[key], counts[key] = totals.get(key, 0.0) + value * n, counts.get(key, 0) + n
        model.train()
        return loss / len(self.rows), {key: totals[key] / counts[key] for key in totals}

    def accuracy(self, model: torch.nn.Module) -> dict[str, Any]:
        """preference_accuracy: the share of held-out pairs whose chosen completion the adapter gives the
        higher mean token log-probability; base_preference_accuracy: the same with adapters disabled (the
        base; its DPO rewards would all be 0). Empty without held-out pairs."""
        if not self.pairs:
            return {}
        model.eval()
        wins, base_wins = 0, 0
        for _, batch in self.batches(self.pairs, collate_pairs):
            wins += preference.pair_wins(model, batch)
            with preference.adapters_disabled(model):
                base_wins += preference.pair_wins(model, batch)
        model.train()
        n = len(self.pairs)
        return {"preference_accuracy": wins / n, "base_preference_accuracy": base_wins / n, "preference_pairs": n}


def preference_held_out(
    tokenizer: Any,
    examples: Sequence[PreferenceExample | KtoExample],
    settings: TrainSettings,
    pad_token_id: int,
    device: torch.device,
    limit: int,
) -> PreferenceHeldOut:
    """The held-out preference data of a run: the first `limit` examples, tokenised as training rows, and
    the pairs among them (accuracy_pairs)."""
    examples = list(examples[:limit])
    rows, _ = tokenize_preference(tokenizer, examples, settings.max_length)
    pairs = [tokenize_pair(tokenizer, pair, settings.max_length) for pair in accuracy_pairs(examples)]
    return PreferenceHeldOut(
        objective_for(settings),
        collate_for(settings),
        rows,
        pairs,
        pad_token_id,
        settings.held_out_batch_size,
        torch.device(device),
    )
