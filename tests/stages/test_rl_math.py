"""GRPO, RLOO, REINFORCE++, the KL estimators, the clipped policy loss and its aggregations, and DAPO's overlong
handling, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dschat_core.stages.rl import estimators, losses, scoring, tokens

SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of four; the second all equal


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_grpo_divides_by_the_group_std():
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2 has no variance
    a = 0.5 / math.sqrt(1 / 3)
    assert close(estimators.grpo_advantages(SCORES, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_grpo_scaled_by_the_batch_std_and_dr_grpo_unscaled():
    batch_std = math.sqrt(5.5 / 7)  # unbiased std of all eight scores (mean 1.25)
    b = 0.5 / batch_std
    assert close(estimators.grpo_advantages(SCORES, 4, "batch"), [b, -b, -b, b, 0, 0, 0, 0])
    assert close(estimators.grpo_advantages(SCORES, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    assert close(
        estimators.grpo_advantages(SCORES, 4, "batch", batch_std=torch.tensor(2.0)),
        [0.25, -0.25, -0.25, 0.25, 0, 0, 0, 0],
    )


def test_single_sample_groups_have_no_advantage():
    scores = torch.tensor([3.0, -1.0])
    assert close(estimators.grpo_advantages(scores, 1), [0, 0])
    assert close(estimators.rloo_advantages(scores, 1), [0, 0])


def test_rloo_leaves_one_out():
    # r = 1: baseline (0 + 0 + 1)/3 = 1/3; r = 0: baseline 2/3
    assert close(estimators.rloo_advantages(SCORES, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])


def test_zero_variance_groups():
    assert estimators.zero_variance_groups(SCORES, 4).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 3"):
        estimators.zero_variance_groups(SCORES, 3)


def test_reinforce_pp_discounted_returns_and_global_whitening():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 9.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # the last answer all masked
    returns = estimators.discounted_returns(rewards, mask, gamma=0.5)
    assert close(returns, [[2.75, 3.5, 3.0], [1.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    total, squares, count = estimators.masked_moments(returns, mask)
    assert (total, count) == (11.75, 5.0) and squares == pytest.approx(2.75**2 + 3.5**2 + 9 + 2.25 + 1)
    mean, std = estimators.moments_to_mean_std(total, squares, count)
    assert mean == pytest.approx(2.35) and std == pytest.approx(math.sqrt(squares / 5 - 2.35**2))
    white = estimators.whiten(returns, mask, mean, std)
    assert close(white[0, 0], (2.75 - 2.35) / std) and close(white[2], [0, 0, 0]) and close(white[1, 2], 0)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])  # δ = ref − logp = −1, +1
    assert close(losses.kl_estimate(logp, ref, "k1"), [1.0, -1.0])
    assert close(losses.kl_estimate(logp, ref, "k2"), [0.5, 0.5])
    assert close(losses.kl_estimate(logp, ref, "k3"), [math.exp(-1), math.e - 2])
    assert close(losses.kl_estimate(logp, logp, "k3"), [0.0, 0.0])


def test_loss_aggregations_including_an_all_masked_answer():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert close(losses.aggregate(per_token, mask, "token_mean"), 2.5)
    assert close(losses.aggregate(per_token, mask, "seq_mean_token_mean"), (2.0 + 4.0) / 2)
    assert close(losses.aggregate(per_token, mask, "seq_mean_token_sum_norm", max_len=4), (6 / 4 + 4 / 4) / 2)
    gone = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # the second answer masked out whole
    assert close(losses.aggregate(per_token, gone, "token_mean"), 2.0)
    assert close(losses.aggregate(per_token, gone, "seq_mean_token_mean"), 2.0)
    assert close(losses.aggregate(per_token, gone, "seq_mean_token_sum_norm", max_len=3), 2.0)
    assert close(losses.aggregate(per_token, torch.zeros_like(mask), "token_mean"), 0.0)


def test_clip_higher_and_the_clipped_fraction():
    logprobs, old = torch.tensor([[0.0, math.log(1.5)]]), torch.zeros(1, 2)
    adv, mask = torch.ones(1, 2), torch.ones(1, 2)
    # ratio (1, 1.5): the second clipped to 1.2; the loss is the max of −A·r and −A·clip(r)
    loss, stats = losses.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert close(loss, (-1.0 - 1.2) / 2) and close(stats["clip_high"], 0.5) and close(stats["ratio"], 1.25)
    loss, stats = losses.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert close(loss, (-1.0 - 1.5) / 2) and close(stats["clip_high"], 0.0)


def test_dual_clip_bounds_negative_advantages():
    logprobs, old, adv, mask = torch.tensor([[math.log(4.0)]]), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1)
    # ratio 4, A = −1: max(4, 1.2) = 4 without dual clip; min(4, 3·|A|) = 3 with c = 3
    assert close(losses.policy_loss(logprobs, old, adv, mask, 0.2, 0.2)[0], 4.0)
    assert close(losses.policy_loss(logprobs, old, adv, mask, 0.2, 0.2, dual_clip=3.0)[0], 3.0)
    low = losses.policy_loss(torch.tensor([[math.log(0.5)]]), old, adv, mask, 0.2, 0.2)[1]["clip_low"]
    assert close(low, 1.0)  # ratio 0.5 < 0.8 with a negative advantage: clipped low


def test_the_policy_loss_with_equal_clips_is_ppo_actor_loss():
    torch.manual_seed(0)
    logprobs, old, adv = torch.randn(3, 5) * 0.3, torch.randn(3, 5) * 0.3, torch.randn(3, 5)
    mask = (torch.rand(3, 5) > 0.3).float()
    ours = losses.policy_loss(logprobs, old, adv, mask, 0.2, 0.2)[0]
    # DeepSpeed-Chat's actor_loss_fn, written out: the masked token mean of max(−A·ρ, −A·clip(ρ, 1 ± 0.2))
    ratio = torch.exp((logprobs - old) * mask)
    theirs = (torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)) * mask).sum() / mask.sum()
    assert close(ours, theirs)


def test_entropy_of_uniform_and_certain_distributions():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    assert close(losses.entropy(logits, torch.tensor([[1.0, 0.0]])), math.log(4))
    assert close(losses.entropy(logits, torch.tensor([[0.0, 1.0]])), 0.0)


def test_overlong_answers_are_found_and_softly_penalised():
    eos = 9
    answers = torch.tensor([[5, 6, 7], [5, eos, 0], [5, 6, eos]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    assert tokens.truncated(mask, answers, eos).tolist() == [True, False, False]
    penalty = scoring.overlong_penalty(torch.tensor([10, 12, 14, 16]), max_len=16, buffer=4, factor=1.0)
    assert close(penalty, [0.0, 0.0, -0.5, -1.0])


def test_k3_is_bounded_for_tokens_far_off_the_reference():
    """δ = log π_ref − log π of ±30 would give e^30 ≈ 1e13: δ is clamped to ±20 and k3 to 10 (verl's bounds)."""
    logprobs = torch.tensor([[-40.0, -10.0, -1.0, -1.2]])
    ref = torch.tensor([[-10.0, -40.0, -1.0, -1.0]])  # δ = 30, −30, 0, 0.2
    k3 = losses.kl_estimate(logprobs, ref, "k3")[0]
    assert k3[0].item() == pytest.approx(10.0) and k3[1].item() == pytest.approx(10.0)
    assert k3[2].item() == 0.0 and k3[3].item() == pytest.approx(math.exp(0.2) - 0.2 - 1.0, rel=1e-5)
    assert losses.K3_LOG_RATIO_BOUND == 20.0 and losses.K3_BOUND == 10.0
    # between the bounds: e^19 − 19 − 1 is over 10, so capped; e^2 − 3 = 4.39 is not
    mid = losses.kl_estimate(torch.tensor([0.0, 0.0]), torch.tensor([19.0, 2.0]), "k3")
    assert mid.tolist() == pytest.approx([10.0, math.exp(2.0) - 3.0], rel=1e-5)


def test_batch_reward_scaling_uses_the_unbiased_std_like_torch_and_trl():
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0])
    total, squares, count = float(scores.sum()), float((scores**2).sum()), float(scores.numel())
    mean, std = estimators.moments_to_mean_std(total, squares, count, unbiased=True)
    assert mean == pytest.approx(1.25) and std == pytest.approx(float(scores.std()))
    assert estimators.moments_to_mean_std(total, squares, count)[1] == pytest.approx(float(scores.std(unbiased=False)))
    # the stage's global std and the function's own fallback agree
    by_moments = estimators.grpo_advantages(scores, 2, "batch", torch.tensor(std))
    assert torch.allclose(by_moments, estimators.grpo_advantages(scores, 2, "batch"))


def test_seq_mean_token_sum_is_each_answers_sum_then_the_mean_over_answers():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert close(losses.aggregate(per_token, mask, "seq_mean_token_sum"), (6.0 + 4.0) / 2)
    gone = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # an answer masked out whole is not in the mean
    assert close(losses.aggregate(per_token, gone, "seq_mean_token_sum"), 6.0)
    assert set(losses.AGGREGATIONS) == {
        "token_mean",
        "seq_mean_token_mean",
        "seq_mean_token_sum",
        "seq_mean_token_sum_norm",
    }


def one_rank(values: list[float]) -> list[float]:
    """The sum over ranks of one process: the values themselves."""
    return values


def settings(**kw):
    from dschat_core.config import PPO

    return PPO(**kw)


def test_reinforce_pp_baseline_centres_each_score_on_its_group_then_whitens_the_returns():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])  # groups of 2: centred −1, 1, 0, 0
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    kl = torch.zeros(4, 2)
    s = settings(algorithm="reinforce_pp_baseline", n_samples_per_prompt=2, gamma=1.0, kl_ctl=0.0)
    got = estimators.ESTIMATORS["reinforce_pp_baseline"](scores, kl, torch.zeros(4, 2), mask, s, one_rank)
    # returns: the centred score on every real token (γ = 1): [−1, −1], [1, 0(masked)], [0, 0], [0, 0]
    returns = torch.tensor([[-1.0, -1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert close(got.returns, returns)
    real = returns[mask.bool()]  # 7 real tokens: mean −1/7, population std
    mean, std = float(real.mean()), float(real.std(unbiased=False))
    assert close(got.advantages, (returns - mean) / (std + estimators.EPS) * mask)
    # the plain REINFORCE++ on the same scores has no baseline: all its returns are positive
    plain = estimators.ESTIMATORS["reinforce_pp"](scores, kl, torch.zeros(4, 2), mask, s, one_rank)
    assert (plain.returns[mask.bool()] > 0).all()


def test_the_estimator_table_gives_each_algorithm_its_advantages():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mask = torch.ones(4, 3)
    zeros = torch.zeros(4, 3)
    for name, per_answer in (
        ("grpo", estimators.grpo_advantages(scores, 2)),
        ("rloo", estimators.rloo_advantages(scores, 2)),
    ):
        s = settings(algorithm=name, n_samples_per_prompt=2)
        got = estimators.ESTIMATORS[name](scores, zeros, zeros, mask, s, one_rank)
        assert close(got.advantages, per_answer.unsqueeze(1).expand(4, 3)) and close(got.rewards, zeros), name
    ppo = estimators.ESTIMATORS["ppo"](scores, zeros, zeros, mask, settings(lam=1.0), one_rank)
    assert close(ppo.rewards[:, -1], scores) and close(ppo.returns[:, 0], scores)  # γ = λ = 1, no values: R = score
    from dschat_core.config import PPO

    assert set(estimators.ESTIMATORS) == set(PPO.model_fields["algorithm"].annotation.__args__)


def test_the_rollout_correction_weights_tokens_by_the_capped_ratio():
    trainer = torch.log(torch.tensor([[0.5, 0.9, 0.2], [0.3, 0.3, 0.3]]))
    engine = torch.log(torch.tensor([[0.5, 0.3, 0.4], [0.3, 0.1, 0.3]]))  # ratios 1, 3, 0.5 / 1, 3, (masked)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights, stats = losses.rollout_correction(trainer, engine, mask, cap=2.0)
    assert close(weights, [[1.0, 2.0, 0.5], [1.0, 2.0, 0.0]])
    assert close(stats["mean"], (1 + 3 + 0.5 + 1 + 3) / 5) and close(stats["max"], 3.0)
    assert close(stats["capped_frac"], 2 / 5)
    # in the loss: each token's term times its weight (ratio 1 to the old log-probs: the loss is −A·w)
    adv = torch.ones(2, 3)
    loss, _ = losses.policy_loss(trainer, trainer, adv, mask, 0.2, 0.2, weights=weights)
    assert close(loss, -(1 + 2 + 0.5 + 1 + 2) / 5)
