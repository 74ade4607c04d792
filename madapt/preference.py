"""Preference-tuning losses for adapters, as Ludwig's LLM trainers name them (trainer.type dpo, kto, orpo):
sequence log-probabilities from logits and labels, the losses on them, the reward metrics practitioners read,
and the reference log-probabilities taken from the same PEFT model with its adapters disabled (no second model).

Every loss takes per-sequence log-probabilities, shape [batch], and returns per-row losses: the training loop
averages them (and divides by gradient accumulation) as it does the fine-tuning loss. Conventions follow TRL,
whose formulas tests/test_preference.py restates independently and compares within 1e-6:

- DPO and KTO score a completion by the *sum* of its token log-probabilities; IPO and ORPO by their *mean* per
  completion token (`uses_mean_logps`), as TRL does (IPO: "confirmed with the IPO authors"; ORPO: the paper's
  Eq. 4 odds are of the length-normalised likelihood).
- rewards: beta x (policy - reference) log-ratio (DPO/IPO/KTO), beta x mean log-prob for ORPO (no reference).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""The label of a token the loss skips (prompt, padding); madapt.data uses the same value."""


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each next token, mask of the tokens scored), both [batch, seq-1]: position t of the
    logits predicts label t+1; positions whose label is IGNORE_INDEX are 0 and unmasked. Row by row in float32
    (or wider),
    so a bf16 batch never holds a float32 copy of all its logits at once."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    index = targets.clamp(min=0).unsqueeze(-1)
    rows = []
    for row_logits, row_index in zip(logits[:, :-1], index, strict=True):
        row_logits = row_logits.to(torch.promote_types(row_logits.dtype, torch.float32))
        picked = row_logits.gather(-1, row_index).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows) * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Each row's log-probability of its completion, shape [batch]: the sum over the tokens whose label is not
    IGNORE_INDEX (the completion, as madapt.data masks rows), or with `average` their mean."""
    per_token, mask = token_logps(logits, labels)
    total = per_token.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def uses_mean_logps(kind: str, loss_type: str = "sigmoid") -> bool:
    """Whether a trainer scores completions by mean token log-probability (IPO, ORPO) rather than the sum."""
    return kind == "orpo" or (kind == "dpo" and loss_type == "ipo")


def needs_reference(kind: str) -> bool:
    """DPO and KTO compare with the reference (the base, adapters disabled); ORPO has no reference term."""
    return kind in ("dpo", "kto")


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model's behaviour for the duration: PEFT's `disable_adapter()` on the PeftModel inside `model`
    (a DDP/DeepSpeed wrapper keeps it in `.module`), under torch.no_grad."""
    inner = getattr(model, "module", model)
    disable = getattr(inner, "disable_adapter", None)
    if disable is None:
        raise TypeError(f"expected a PEFT model, got {type(inner).__name__}")
    with torch.no_grad(), disable():
        yield


@torch.no_grad()
def pair_wins(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """How many pairs of a collated pair batch (preference_data.collate_pairs: chosen rows first) the model
    gives the chosen completion the higher mean token log-probability: preference accuracy's numerator."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = sequence_logps(logits, batch["labels"], average=True).chunk(2)
    return int((chosen > rejected).sum())


def reference_logps(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, average: bool = False
) -> torch.Tensor:
    """The reference log-probabilities of a collated batch (input_ids, attention_mask, labels): the same PEFT
    model with its adapters disabled, so the reference is the base the adapter was initialised on. The forward
    goes through `model` itself (a DDP/FSDP wrapper included); nothing is kept for backward."""
    with adapters_disabled(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"], average=average)


@dataclass(frozen=True)
class PreferenceLoss:
    """Per-row losses and the rewards behind them (detached); `loss` is their mean."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: Mapping[str, float] | None = None

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self, *, paired: bool = True) -> dict[str, float]:
        """rewards/chosen, rewards/rejected, rewards/margins and (paired rows only) rewards/accuracies, as TRL
        logs them: means over the batch; accuracy is the share of pairs whose chosen reward is the higher."""
        return {**reward_metrics(self.chosen_rewards, self.rejected_rewards, paired=paired), **(self.extra or {})}


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, *, paired: bool = True) -> dict[str, float]:
    """The reward metrics of a batch; for unpaired rows (KTO) the margin is the difference of the means and
    there is no accuracy. An empty side (a KTO batch without desirable rows) is left out."""
    out: dict[str, float] = {}
    if chosen.numel():
        out["rewards/chosen"] = chosen.float().mean().item()
    if rejected.numel():
        out["rewards/rejected"] = rejected.float().mean().item()
    if paired:
        out["rewards/margins"] = (chosen - rejected).float().mean().item()
        out["rewards/accuracies"] = (chosen > rejected).float().mean().item()
    elif chosen.numel() and rejected.numel():
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO, Rafailov et al. 2023, Eq. 7:

        L_DPO = -E[ log sigma( beta log(pi(y_w|x)/pi_ref(y_w|x)) - beta log(pi(y_l|x)/pi_ref(y_l|x)) ) ]

    with conservative DPO's label smoothing eps (Mitchell 2023; TRL's and Ludwig's `label_smoothing`): the
    preference is taken as flipped with probability eps,

        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h),   h = chosen log-ratio - rejected log-ratio.

    Log-probabilities are sums over completion tokens; rewards are beta x log-ratio."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> PreferenceLoss:
    """IPO, Azar et al. 2023, Eq. 17, with tau = beta:

        L_IPO = E[ ( h(y_w, y_l, x) - 1/(2 tau) )^2 ],
        h = log( pi(y_w|x) pi_ref(y_l|x) / (pi(y_l|x) pi_ref(y_w|x)) ).

    h is *not* scaled by beta (TRL's form; Ludwig's dpo_loss.py squares beta h - 1/(2 beta), which is not the
    paper's). Log-probabilities are means over completion tokens, as TRL takes them (`uses_mean_logps`)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def kto_kl(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0 = KL(pi || pi_ref), estimated on mismatched (prompt, completion) pairs of the
    batch (madapt.preference_data.mismatched): the mean log-ratio, clamped at 0 and detached (no gradient flows
    through it, Ethayarajh et al. 2024, section 4.1). Under data parallelism the loop averages it across
    workers before `kto_loss`, as TRL gathers it."""
    return (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO, Ethayarajh et al. 2024, Eq. 7 (HALO with the Kahneman-Tversky value function):

        r(x, y) = log pi(y|x) / pi_ref(y|x),   z_0 = KL(pi || pi_ref)   (`kto_kl`),
        v(x, y) = lambda_D sigma(beta (r - z_0))   if y is desirable,
                  lambda_U sigma(beta (z_0 - r))   if undesirable,
        L_KTO = E[ lambda_y - v(x, y) ].

    Rows are unpaired: `desirable` [batch] (bool) says which is which. `losses` lists the desirable rows'
    losses, then the undesirable rows', as TRL concatenates them; `chosen_rewards`/`rejected_rewards` are
    beta x r of each side."""
    desirable = desirable.bool()
    ratio = policy - reference
    kl = torch.as_tensor(kl, dtype=ratio.dtype, device=ratio.device)
    chosen = ratio[desirable]
    rejected = ratio[~desirable]
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))
    return PreferenceLoss(
        torch.cat([chosen_losses, rejected_losses]),
        beta * chosen.detach(),
        beta * rejected.detach(),
        extra={"kl": float(kl)},
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_nll: torch.Tensor, *, beta: float
) -> PreferenceLoss:
    """ORPO, Hong et al. 2024, Eqs. 6-7, with lambda = beta:

        odds(y|x) = P(y|x) / (1 - P(y|x)),   P the mean-token likelihood (Eq. 4),
        L_OR = -log sigma( log( odds(y_w|x) / odds(y_l|x) ) )                         (Eq. 7)
        L_ORPO = E[ L_SFT + lambda L_OR ]                                              (Eq. 6)

    `policy_chosen`/`policy_rejected`: mean completion-token log-probabilities (`sequence_logps(average=True)`);
    `chosen_nll`: L_SFT, the chosen completions' token-mean negative log-likelihood (madapt's fine-tuning loss
    on the chosen rows; TRL's ORPOTrainer also counts prompt tokens in it). No reference model. Rewards are
    beta x mean log-probability, as TRL logs them."""
    chosen = policy_chosen.float()
    rejected = policy_rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    losses = chosen_nll - beta * ratio
    extra = {"log_odds_ratio": ratio.mean().item(), "log_odds_chosen": log_odds.mean().item()}  # TRL's names
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach(), extra=extra)
