"""madapt.preference: the DPO/IPO/KTO/ORPO losses equal TRL's formulas (restated below in float64 with math,
written independently of the module; TRL's own ORPO code and log-prob helper where TRL is installed) and
Ludwig's dpo_loss.py on fixed tensors within 1e-6; the reference log-probs equal the base model's."""

from __future__ import annotations

import math

import pytest
import torch

from madapt.preference import (
    dpo_loss,
    ipo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    reference_logps,
    reward_metrics,
    sequence_logps,
    uses_mean_logps,
)

TOL = 1e-6
PC = [-12.5, -30.25, -7.0, -50.0]
PR = [-14.0, -28.0, -9.5, -49.0]
RC = [-13.0, -29.0, -8.0, -52.0]
RR = [-13.5, -29.5, -9.0, -48.0]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- TRL's formulas, restated (TRL DPOTrainer 'sigmoid' with label_smoothing as in TRL <= 0.x and Ludwig;
#    'ipo' per TRL's Eq. 17 comment; KTOTrainer 'kto'; ORPOTrainer.odds_ratio_loss + nll) ------------------


def trl_dpo(pc, pr, rc, rr, beta, eps):
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        h = (a - c) - (b - d)
        out.append(-log_sigmoid(beta * h) * (1 - eps) - log_sigmoid(-beta * h) * eps)
    return (
        sum(out) / len(out),
        [beta * (a - c) for a, c in zip(pc, rc, strict=True)],
        [beta * (b - d) for b, d in zip(pr, rr, strict=True)],
    )


def trl_ipo(pc, pr, rc, rr, beta):
    losses = [((a - c) - (b - d) - 1 / (2 * beta)) ** 2 for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]
    return sum(losses) / len(losses)


def trl_kto(policy, ref, labels, kl, beta, wd, wu):
    chosen = [wd * (1 - sigmoid(beta * ((p - r) - kl))) for p, r, y in zip(policy, ref, labels, strict=True) if y]
    rejected = [wu * (1 - sigmoid(beta * (kl - (p - r)))) for p, r, y in zip(policy, ref, labels, strict=True) if not y]
    losses = chosen + rejected
    return sum(losses) / len(losses)


def trl_orpo(chosen_mean, rejected_mean, nll, beta):
    def log1mexp(x):
        return math.log(-math.expm1(x))

    ratios = [
        log_sigmoid((c - r) - (log1mexp(c) - log1mexp(r))) for c, r in zip(chosen_mean, rejected_mean, strict=True)
    ]
    return nll - beta * sum(ratios) / len(ratios)


def ludwig_dpo(pc, pr, rc, rr, beta, eps, loss_type):
    """Ludwig's ludwig/modules/dpo_loss.py (5d19f3e63), on precomputed log-probs."""
    diffs = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]
    if loss_type == "sigmoid":
        losses = [-log_sigmoid(x) * (1 - eps) - log_sigmoid(-x) * eps if eps > 0 else -log_sigmoid(x) for x in diffs]
    else:
        losses = [(x - 1 / (2 * beta)) ** 2 for x in diffs]
    return sum(losses) / len(losses)


@pytest.mark.parametrize(("beta", "eps"), [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (0.3, 0.5)])
def test_dpo_equals_trl_and_ludwig(beta, eps):
    result = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    expected, chosen, rejected = trl_dpo(PC, PR, RC, RR, beta, eps)
    assert abs(result.loss.item() - expected) < TOL
    assert abs(result.loss.item() - ludwig_dpo(PC, PR, RC, RR, beta, eps, "sigmoid")) < TOL
    assert result.chosen_rewards.tolist() == pytest.approx(chosen, abs=TOL)
    assert result.rejected_rewards.tolist() == pytest.approx(rejected, abs=TOL)


def test_dpo_in_float32_within_tolerance():
    result = dpo_loss(t(PC).float(), t(PR).float(), t(RC).float(), t(RR).float(), beta=0.1, label_smoothing=0.1)
    assert abs(result.loss.item() - trl_dpo(PC, PR, RC, RR, 0.1, 0.1)[0]) < TOL


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_ipo_is_the_papers_eq_17_as_trl_takes_it(beta):
    assert abs(ipo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta).loss.item() - trl_ipo(PC, PR, RC, RR, beta)) < TOL


def test_ludwig_ipo_scales_h_by_beta_which_the_paper_does_not():
    """Ludwig squares beta*h - 1/(2 beta); Eq. 17 (and TRL) square h - 1/(2 tau). Equal only at beta = 1."""
    assert (
        abs(ipo_loss(t(PC), t(PR), t(RC), t(RR), beta=1.0).loss.item() - ludwig_dpo(PC, PR, RC, RR, 1.0, 0, "ipo"))
        < TOL
    )
    assert (
        abs(ipo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1).loss.item() - ludwig_dpo(PC, PR, RC, RR, 0.1, 0, "ipo")) > 1
    )


@pytest.mark.parametrize(
    ("beta", "wd", "wu", "kl"), [(0.1, 1.0, 1.0, 0.0), (0.2, 1.33, 1.0, 0.7), (0.5, 1.0, 0.5, 2.0)]
)
def test_kto_equals_trl(beta, wd, wu, kl):
    policy, ref = [-10.0, -20.0, -5.5, -33.0, -8.0], [-11.0, -18.5, -6.0, -30.0, -8.25]
    labels = [True, False, True, False, False]
    result = kto_loss(
        t(policy), t(ref), torch.tensor(labels), kl, beta=beta, desirable_weight=wd, undesirable_weight=wu
    )
    assert abs(result.loss.item() - trl_kto(policy, ref, labels, kl, beta, wd, wu)) < TOL
    assert result.chosen_rewards.tolist() == pytest.approx([beta * 1.0, beta * 0.5], abs=TOL)
    metrics = result.metrics(paired=False)
    assert "rewards/accuracies" not in metrics and metrics["kl"] == pytest.approx(kl)


def test_kto_kl_is_the_clamped_detached_mean_log_ratio():
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    assert kto_kl(policy, torch.tensor([-4.0, -4.5])).item() == pytest.approx(0.75)
    assert kto_kl(policy, torch.tensor([-1.0, -1.0])).item() == 0.0
    assert not kto_kl(policy, torch.tensor([-4.0, -4.5])).requires_grad


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_equals_trl(beta):
    chosen, rejected, nll = [-0.8, -1.5, -0.05, -2.5], [-1.2, -1.4, -0.9, -0.3], 1.234
    result = orpo_loss(t(chosen), t(rejected), torch.tensor(nll, dtype=torch.float64), beta=beta)
    assert abs(result.loss.item() - trl_orpo(chosen, rejected, nll, beta)) < TOL
    assert result.chosen_rewards.tolist() == pytest.approx([beta * c for c in chosen], abs=TOL)


def test_orpo_against_trls_own_code():
    trl_orpo_module = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from types import SimpleNamespace

    chosen, rejected = torch.tensor([-0.8, -1.5, -0.05, -2.5]), torch.tensor([-1.2, -1.4, -0.9, -0.3])
    this = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, _, ratio, log_odds = trl_orpo_module.ORPOTrainer.odds_ratio_loss(this, chosen, rejected)
    ours = orpo_loss(chosen, rejected, torch.tensor(0.0), beta=0.2)
    assert abs(ours.loss.item() - (-losses.mean().item())) < TOL  # TRL: loss = nll - losses.mean()
    assert torch.allclose(ours.chosen_rewards, chosen_rewards)
    assert ours.metrics()["log_odds_ratio"] == pytest.approx(ratio.item(), abs=TOL)
    assert ours.metrics()["log_odds_chosen"] == pytest.approx(log_odds.item(), abs=TOL)


def test_sequence_logps_sum_completion_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected = []
    for b in range(2):
        total, count = 0.0, 0
        for pos in range(1, 5):
            if labels[b, pos] != -100:
                row = logits[b, pos - 1].tolist()
                norm = math.log(sum(math.exp(v) for v in row))
                total, count = total + row[labels[b, pos]] - norm, count + 1
        expected.append((total, total / count))
    assert sequence_logps(logits, labels).tolist() == pytest.approx([e[0] for e in expected], abs=TOL)
    assert sequence_logps(logits, labels, average=True).tolist() == pytest.approx([e[1] for e in expected], abs=TOL)
    trl_orpo_module = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    for average in (False, True):
        trl = trl_orpo_module.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
        assert torch.allclose(sequence_logps(logits, labels, average=average), trl, atol=TOL)


def test_uses_mean_logps_for_ipo_and_orpo_only():
    assert uses_mean_logps("orpo") and uses_mean_logps("dpo", "ipo")
    assert not uses_mean_logps("dpo") and not uses_mean_logps("kto")


def test_reward_metrics_as_trl_logs_them():
    metrics = reward_metrics(torch.tensor([0.3, -0.1, 0.2]), torch.tensor([0.1, 0.0, 0.5]))
    assert metrics["rewards/chosen"] == pytest.approx(0.4 / 3)
    assert metrics["rewards/margins"] == pytest.approx((0.2 - 0.1 - 0.3) / 3)
    assert metrics["rewards/accuracies"] == pytest.approx(1 / 3)


def test_reference_logps_are_the_base_models(base):
    """The same PEFT model with adapters disabled scores exactly as the base did before the adapter."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base.model).eval()
    torch.manual_seed(3)
    ids = torch.randint(5, 400, (2, 12))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.where(torch.arange(12) < 5, torch.tensor(-100), ids),
    }
    with torch.no_grad():
        base_logps = sequence_logps(
            model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        adapted = sequence_logps(
            peft_model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
    assert not torch.allclose(adapted, base_logps)  # the adapter changes the model...
    reference = reference_logps(peft_model, batch)
    assert torch.allclose(reference, base_logps, atol=1e-6)  # ...and disabling it gives the base back
    assert not reference.requires_grad
    assert torch.allclose(reference_logps(peft_model, batch, average=True), base_logps / 7, atol=1e-6)
