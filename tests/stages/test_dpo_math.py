"""DPO and its variants against values worked out by hand: β = 0.5, log π(y_w) = −2, log π(y_l) = −5,
log π_ref(y_w) = −3, log π_ref(y_l) = −4, so the margin is (−2 + 3) − (−5 + 4) = 2 and β·margin = 1."""

from __future__ import annotations

import math

import pytest
import torch

from dschat_core.training import dpo_math

C, R, RC, RR = torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0])
LC, LR = torch.tensor([2.0]), torch.tensor([4.0])  # answer lengths in tokens


def softplus(x: float) -> float:  # −log σ(−x)
    return math.log1p(math.exp(x))


def test_sigmoid_is_dpo_and_its_rewards_are_beta_log_ratios():
    loss, chosen, rejected = dpo_math.sigmoid(C, R, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(softplus(-1.0))  # −log σ(1)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_cdpo_and_robust_dpo_under_label_noise():
    cdpo = dpo_math.sigmoid(C, R, RC, RR, beta=0.5, label_smoothing=0.1)[0].item()
    assert cdpo == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0))
    robust = dpo_math.robust(C, R, RC, RR, beta=0.5, label_smoothing=0.1)[0].item()
    assert robust == pytest.approx((0.9 * softplus(-1.0) - 0.1 * softplus(1.0)) / 0.8)
    assert dpo_math.robust(C, R, RC, RR, 0.5, 0.0)[0].item() == pytest.approx(softplus(-1.0))


def test_hinge():
    assert dpo_math.hinge(C, R, RC, RR, beta=0.5)[0].item() == pytest.approx(0.0)  # 1 − 1
    assert dpo_math.hinge(C, R, RC, RR, beta=0.25)[0].item() == pytest.approx(0.5)  # 1 − 0.5


def test_ipo_on_per_token_means():
    # means: π(y_w) −1, π(y_l) −1.25, π_ref(y_w) −1.5, π_ref(y_l) −1 → margin 0.5 + 0.25 = 0.75; target 1/(2β) = 1
    assert dpo_math.ipo(C, R, RC, RR, LC, LR, beta=0.5)[0].item() == pytest.approx((0.75 - 1.0) ** 2)


def test_simpo_is_length_normalised_with_a_margin():
    loss, chosen, rejected = dpo_math.simpo(C, R, LC, LR, beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(2))  # β·(−1 + 1.25) − γ = 0 → −log σ(0)
    assert chosen.item() == pytest.approx(-2.0) and rejected.item() == pytest.approx(-2.5)
    # Twice as long, the same per-token log-probabilities: the same loss (no length bias).
    assert dpo_math.simpo(2 * C, 2 * R, 2 * LC, 2 * LR, 2.0, 0.5)[0].item() == pytest.approx(math.log(2))


def test_orpo_adds_the_odds_ratio_to_the_sft_loss():
    pc, pr = math.exp(-1.0), math.exp(-1.25)  # mean token probabilities
    log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    expected = 1.0 + 0.1 * softplus(-log_odds)  # nll + λ·(−log σ(log odds ratio))
    assert dpo_math.orpo(C, R, LC, LR, torch.tensor([1.0]), beta=0.1)[0].item() == pytest.approx(expected)


def test_answer_log_probabilities_count_only_answer_tokens():
    logits = torch.log(torch.tensor([[[1.0, 3.0], [1.0, 1.0], [5.0, 5.0]]]))  # V = 2
    ids, answer = torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 1]])
    logps, count = dpo_math.answer_logps(logits, ids, answer)
    assert logps.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 2)) and count.item() == 2


def test_pair_accuracy_counts_a_tie_as_half():
    chosen = torch.tensor([1.0, 0.0, -1.0, 0.0])
    rejected = torch.tensor([0.0, 1.0, -1.0, 0.0])
    assert dpo_math.pair_accuracy(chosen, rejected).tolist() == [1.0, 0.0, 0.5, 0.5]
    # the untrained policy is its reference: every implicit reward is 0, so accuracy starts at 0.5, not 0
    _, reward_c, reward_r = dpo_math.sigmoid(C, R, C, R, beta=0.5)
    assert dpo_math.pair_accuracy(reward_c, reward_r).item() == 0.5


def test_orpo_log_odds_are_exact_near_probability_one():
    """log(1 − p) for p = 1 − 1e-7 is log(1e-7) = −16.12, with a gradient (a floor at −13.8 had none)."""
    x = torch.tensor([math.log1p(-1e-7), -1e-3, -0.5, -5.0, -50.0], dtype=torch.float64, requires_grad=True)
    got = dpo_math.log1mexp(x)
    want = [math.log(1e-7), math.log(-math.expm1(-1e-3)), math.log(-math.expm1(-0.5)), math.log1p(-math.exp(-5.0))]
    assert got[:4].tolist() == pytest.approx(want, rel=1e-9)
    assert got[4].item() == pytest.approx(-math.exp(-50.0), rel=1e-9)
    got.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].item() == pytest.approx(-(1 - 1e-7) / 1e-7, rel=1e-6)
    # at p = 1 exactly the value is capped, finite, and so is the ORPO loss
    one = dpo_math.orpo(torch.tensor([0.0]), torch.tensor([-4.0]), LC, LR, torch.tensor([1.0]), beta=0.1)[0]
    assert torch.isfinite(one).all()
