"""GRPO, RLOO, REINFORCE++, the KL estimators, the clipped policy loss and its aggregations, and DAPO's overlong
handling, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dschat_core.training import rl_math

SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of four; the second all equal


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_grpo_divides_by_the_group_std():
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2 has no variance
    a = 0.5 / math.sqrt(1 / 3)
    assert close(rl_math.grpo_advantages(SCORES, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_grpo_scaled_by_the_batch_std_and_dr_grpo_unscaled():
    batch_std = math.sqrt(5.5 / 7)  # unbiased std of all eight scores (mean 1.25)
    b = 0.5 / batch_std
    assert close(rl_math.grpo_advantages(SCORES, 4, "batch"), [b, -b, -b, b, 0, 0, 0, 0])
    assert close(rl_math.grpo_advantages(SCORES, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    assert close(
        rl_math.grpo_advantages(SCORES, 4, "batch", batch_std=torch.tensor(2.0)), [0.25, -0.25, -0.25, 0.25, 0, 0, 0, 0]
    )


def test_single_sample_groups_have_no_advantage():
    scores = torch.tensor([3.0, -1.0])
    assert close(rl_math.grpo_advantages(scores, 1), [0, 0])
    assert close(rl_math.rloo_advantages(scores, 1), [0, 0])


def test_rloo_leaves_one_out():
    # r = 1: baseline (0 + 0 + 1)/3 = 1/3; r = 0: baseline 2/3
    assert close(rl_math.rloo_advantages(SCORES, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])


def test_zero_variance_groups():
    assert rl_math.zero_variance_groups(SCORES, 4).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 3"):
        rl_math.zero_variance_groups(SCORES, 3)


def test_reinforce_pp_discounted_returns_and_global_whitening():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 9.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # the last answer all masked
    returns = rl_math.discounted_returns(rewards, mask, gamma=0.5)
    assert close(returns, [[2.75, 3.5, 3.0], [1.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    total, squares, count = rl_math.masked_moments(returns, mask)
    assert (total, count) == (11.75, 5.0) and squares == pytest.approx(2.75**2 + 3.5**2 + 9 + 2.25 + 1)
    mean, std = rl_math.moments_to_mean_std(total, squares, count)
    assert mean == pytest.approx(2.35) and std == pytest.approx(math.sqrt(squares / 5 - 2.35**2))
    white = rl_math.whiten(returns, mask, mean, std)
    assert close(white[0, 0], (2.75 - 2.35) / std) and close(white[2], [0, 0, 0]) and close(white[1, 2], 0)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])  # δ = ref − logp = −1, +1
    assert close(rl_math.kl_estimate(logp, ref, "k1"), [1.0, -1.0])
    assert close(rl_math.kl_estimate(logp, ref, "k2"), [0.5, 0.5])
    assert close(rl_math.kl_estimate(logp, ref, "k3"), [math.exp(-1), math.e - 2])
    assert close(rl_math.kl_estimate(logp, logp, "k3"), [0.0, 0.0])


def test_loss_aggregations_including_an_all_masked_answer():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert close(rl_math.aggregate(per_token, mask, "token_mean"), 2.5)
    assert close(rl_math.aggregate(per_token, mask, "seq_mean_token_mean"), (2.0 + 4.0) / 2)
    assert close(rl_math.aggregate(per_token, mask, "seq_mean_token_sum_norm", max_len=4), (6 / 4 + 4 / 4) / 2)
    gone = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # the second answer masked out whole
    assert close(rl_math.aggregate(per_token, gone, "token_mean"), 2.0)
    assert close(rl_math.aggregate(per_token, gone, "seq_mean_token_mean"), 2.0)
    assert close(rl_math.aggregate(per_token, gone, "seq_mean_token_sum_norm", max_len=3), 2.0)
    assert close(rl_math.aggregate(per_token, torch.zeros_like(mask), "token_mean"), 0.0)


def test_clip_higher_and_the_clipped_fraction():
    logprobs, old = torch.tensor([[0.0, math.log(1.5)]]), torch.zeros(1, 2)
    adv, mask = torch.ones(1, 2), torch.ones(1, 2)
    # ratio (1, 1.5): the second clipped to 1.2; the loss is the max of −A·r and −A·clip(r)
    loss, stats = rl_math.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert close(loss, (-1.0 - 1.2) / 2) and close(stats["clip_high"], 0.5) and close(stats["ratio"], 1.25)
    loss, stats = rl_math.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert close(loss, (-1.0 - 1.5) / 2) and close(stats["clip_high"], 0.0)


def test_dual_clip_bounds_negative_advantages():
    logprobs, old, adv, mask = torch.tensor([[math.log(4.0)]]), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1)
    # ratio 4, A = −1: max(4, 1.2) = 4 without dual clip; min(4, 3·|A|) = 3 with c = 3
    assert close(rl_math.policy_loss(logprobs, old, adv, mask, 0.2, 0.2)[0], 4.0)
    assert close(rl_math.policy_loss(logprobs, old, adv, mask, 0.2, 0.2, dual_clip=3.0)[0], 3.0)
    low = rl_math.policy_loss(torch.tensor([[math.log(0.5)]]), old, adv, mask, 0.2, 0.2)[1]["clip_low"]
    assert close(low, 1.0)  # ratio 0.5 < 0.8 with a negative advantage: clipped low


def test_the_policy_loss_with_equal_clips_is_ppo_actor_loss():
    from dschat_core.training import ppo_math

    torch.manual_seed(0)
    logprobs, old, adv = torch.randn(3, 5) * 0.3, torch.randn(3, 5) * 0.3, torch.randn(3, 5)
    mask = (torch.rand(3, 5) > 0.3).float()
    ours = rl_math.policy_loss(logprobs, old, adv, mask, 0.2, 0.2)[0]
    assert close(ours, ppo_math.actor_loss(logprobs, old, adv, mask, 0.2)[0])


def test_entropy_of_uniform_and_certain_distributions():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    assert close(rl_math.entropy(logits, torch.tensor([[1.0, 0.0]])), math.log(4))
    assert close(rl_math.entropy(logits, torch.tensor([[0.0, 1.0]])), 0.0)


def test_overlong_answers_are_found_and_softly_penalised():
    eos = 9
    answers = torch.tensor([[5, 6, 7], [5, eos, 0], [5, 6, eos]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    assert rl_math.truncated(mask, answers, eos).tolist() == [True, False, False]
    penalty = rl_math.overlong_penalty(torch.tensor([10, 12, 14, 16]), max_len=16, buffer=4, factor=1.0)
    assert close(penalty, [0.0, 0.0, -0.5, -1.0])


def test_k3_is_bounded_for_tokens_far_off_the_reference():
    """δ = log π_ref − log π of ±30 would give e^30 ≈ 1e13: δ is clamped to ±20 and k3 to 10 (verl's bounds)."""
    logprobs = torch.tensor([[-40.0, -10.0, -1.0, -1.2]])
    ref = torch.tensor([[-10.0, -40.0, -1.0, -1.0]])  # δ = 30, −30, 0, 0.2
    k3 = rl_math.kl_estimate(logprobs, ref, "k3")[0]
    assert k3[0].item() == pytest.approx(10.0) and k3[1].item() == pytest.approx(10.0)
    assert k3[2].item() == 0.0 and k3[3].item() == pytest.approx(math.exp(0.2) - 0.2 - 1.0, rel=1e-5)
    assert rl_math.K3_LOG_RATIO_BOUND == 20.0 and rl_math.K3_BOUND == 10.0
    # between the bounds: e^19 − 19 − 1 is over 10, so capped; e^2 − 3 = 4.39 is not
    mid = rl_math.kl_estimate(torch.tensor([0.0, 0.0]), torch.tensor([19.0, 2.0]), "k3")
    assert mid.tolist() == pytest.approx([10.0, math.exp(2.0) - 3.0], rel=1e-5)


def test_batch_reward_scaling_uses_the_unbiased_std_like_torch_and_trl():
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0])
    total, squares, count = float(scores.sum()), float((scores**2).sum()), float(scores.numel())
    mean, std = rl_math.moments_to_mean_std(total, squares, count, unbiased=True)
    assert mean == pytest.approx(1.25) and std == pytest.approx(float(scores.std()))
    assert rl_math.moments_to_mean_std(total, squares, count)[1] == pytest.approx(float(scores.std(unbiased=False)))
    # the stage's global std and the function's own fallback agree
    by_moments = rl_math.grpo_advantages(scores, 2, "batch", torch.tensor(std))
    assert torch.allclose(by_moments, rl_math.grpo_advantages(scores, 2, "batch"))
