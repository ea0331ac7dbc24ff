"""Advantage estimators, as verl's core_algos keeps them: pure tensor functions and one table from
``ppo.algorithm`` to the estimator.

Shapes: ``scores`` [B] (one reward per answer), per-token tensors [B, T] over the answer, ``mask`` 1 on the tokens the
loss sees. A group is the ``n`` answers sampled for one prompt, stored next to each other (rows ``g·n … g·n + n − 1``).
Statistics of the whole batch span every rank: an estimator that needs them gets ``reduce``, which sums a list of
numbers over the ranks (the identity on one process).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config import PPO
from .tokens import last_index

Tensor = Any  # torch.Tensor; torch is imported lazily so the CLI starts fast
Reduce = Callable[[list[float]], list[float]]

EPS = 1e-6


def no_reduce(values: list[float]) -> list[float]:
    """One process: the batch is all there is."""
    return values


# -- groups ---------------------------------------------------------------------------------------------------------
def group_view(scores: Tensor, n: int) -> Tensor:
    """[B] → [B/n, n]: one row per prompt."""
    if scores.shape[0] % n:
        raise ValueError(f"{scores.shape[0]} answers do not split into groups of {n}")
    return scores.view(-1, n)


def grpo_advantages(scores: Tensor, n: int, scale: str = "group", batch_std: Tensor | None = None) -> Tensor:
    """GRPO: each answer's reward minus its group's mean, divided by the group's standard deviation (``group``),
    by the whole batch's (``batch``; pass the global one as ``batch_std`` when the batch spans ranks), or not at
    all (``none``: Dr. GRPO). A group of equal rewards gets advantage 0; so does a group of one."""
    groups = group_view(scores.float(), n)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        std = groups.std(dim=1, keepdim=True) if n > 1 else groups.new_zeros(groups.shape[0], 1)
        centred = centred / (std + EPS)
    elif scale == "batch":
        std = batch_std if batch_std is not None else scores.float().std()
        centred = centred / (std + EPS)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return centred.reshape(-1)


def rloo_advantages(scores: Tensor, n: int) -> Tensor:
    """RLOO: each answer's reward minus the mean of the *other* answers to the same prompt,
    ``r_i − (Σ_j r_j − r_i)/(n − 1)``. A group of one has no baseline and gets advantage 0."""
    groups = group_view(scores.float(), n)
    if n == 1:
        return groups.new_zeros(groups.shape).reshape(-1)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (n - 1)
    return (groups - baseline).reshape(-1)


def group_centred(scores: Tensor, n: int) -> Tensor:
    """Each answer's reward minus its group's mean (REINFORCE++-baseline's baseline)."""
    groups = group_view(scores.float(), n)
    return (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)


def zero_variance_groups(scores: Tensor, n: int) -> Tensor:
    """[B/n] booleans: groups whose answers all got the same reward (no learning signal for GRPO/RLOO)."""
    groups = group_view(scores.float(), n)
    return (groups.max(dim=1).values - groups.min(dim=1).values).abs() <= EPS


# -- per-token rewards and returns ------------------------------------------------------------------------------
def token_rewards(kl: Tensor, scores: Tensor, mask: Tensor, kl_ctl: float, clip: float | None = None) -> Tensor:
    """r_t = −β·KL_t on every real answer token, plus the answer's score (clipped to ±``clip`` where given, as
    DeepSpeed-Chat clips it) on its last real token. DeepSpeed-Chat adds the score one position later, on the
    masked action after EOS, so that it reaches the loss only through GAE (docs/training.md)."""
    import torch

    rewards = -kl_ctl * kl * mask
    last = last_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    scores = scores.clamp(-clip, clip) if clip is not None else scores
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (trlx's, as DeepSpeed-Chat): δ_t = r_t + γV_{t+1} − V_t,
    A_t = δ_t + γλA_{t+1}, R_t = A_t + V_t; rewards and values past the answer count as 0. No whitening. Tokens
    outside ``mask`` inside an answer (an episode's observations) are skipped, as verl's multi-turn GAE does: the
    model token before them bootstraps from the model token after them."""
    import torch

    rewards, values = rewards * mask, values * mask
    last = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(last)
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = mask[:, t].to(last.dtype)
        last = here * (delta + gamma * lam * last) + (1 - here) * last
        next_value = here * values[:, t] + (1 - here) * next_value
        advantages.append(last)
    advantages_t = torch.stack(advantages[::-1], dim=1)
    return advantages_t.detach(), (advantages_t + values).detach()


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """REINFORCE++: G_t = Σ_{k ≥ t} γ^{k−t} r_k over each answer's real tokens (nothing past the answer counts)."""
    import torch

    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def whiten(values: Tensor, mask: Tensor, mean: float, std: float) -> Tensor:
    """(values − mean)/std on the real tokens (the statistics of the global batch, from every rank), 0 elsewhere."""
    return (values - mean) / (std + EPS) * mask


def masked_moments(values: Tensor, mask: Tensor) -> tuple[float, float, float]:
    """(Σ x, Σ x², count) over the real tokens: summed over ranks they give the global mean and std."""
    real = values * mask
    return float(real.sum()), float((real * values).sum()), float(mask.sum())


def moments_to_mean_std(total: float, squares: float, count: float, unbiased: bool = False) -> tuple[float, float]:
    """Mean and standard deviation from the moments; ``unbiased``: with Bessel's correction (n − 1), as
    ``torch.std`` and TRL's reward scaling compute it; else the population's, as whitening uses (OpenRLHF's)."""
    count = max(count, 1.0)
    mean = total / count
    spread = max(squares - count * mean * mean, 0.0)
    return mean, (spread / (count - 1.0 if unbiased and count > 1 else count)) ** 0.5


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """One advantage per answer [B] on every real token of it [B, T]."""
    return advantages.unsqueeze(1).to(mask.dtype) * mask


# -- the estimators ---------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """What an estimator gives the update: per-token rewards (what the critic's returns are made of; zeros for
    the estimators without per-token rewards), advantages and returns, each [B, T]."""

    rewards: Tensor
    advantages: Tensor
    returns: Tensor


#: An estimator: (scores [B], per-token KL to the reference in the reward [B, T] (zeros when the KL goes in the
#: loss), the critic's values [B, T] (zeros without one), mask, the stage's settings, reduce) → Estimate.
Estimator = Callable[[Tensor, Tensor, Tensor, Tensor, PPO, Reduce], Estimate]


def ppo(scores: Tensor, kl: Tensor, values: Tensor, mask: Tensor, s: PPO, reduce: Reduce) -> Estimate:
    """PPO (DeepSpeed-Chat's): per-token rewards with the clipped score, GAE against the critic's values."""
    rewards = token_rewards(kl, scores, mask, s.kl_ctl, s.clip_reward_value)
    advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
    return Estimate(rewards, advantages, returns)


def _whitened_returns(rewards: Tensor, mask: Tensor, gamma: float, reduce: Reduce) -> Estimate:
    returns = discounted_returns(rewards, mask, gamma)
    total, squares, count = reduce(list(masked_moments(returns, mask)))
    mean, std = moments_to_mean_std(total, squares, count)
    return Estimate(rewards, whiten(returns, mask, mean, std), returns)


def reinforce_pp(scores: Tensor, kl: Tensor, values: Tensor, mask: Tensor, s: PPO, reduce: Reduce) -> Estimate:
    """REINFORCE++: discounted returns of the per-token rewards, whitened over the global batch."""
    return _whitened_returns(token_rewards(kl, scores, mask, s.kl_ctl), mask, s.gamma, reduce)


def reinforce_pp_baseline(scores: Tensor, kl: Tensor, values: Tensor, mask: Tensor, s: PPO, reduce: Reduce) -> Estimate:
    """REINFORCE++-baseline (OpenRLHF's ``reinforce_baseline``, verl's ``reinforce_plus_plus_baseline``): each
    score minus its group's mean, then as REINFORCE++."""
    centred = group_centred(scores, s.n_samples_per_prompt)
    return _whitened_returns(token_rewards(kl, centred, mask, s.kl_ctl), mask, s.gamma, reduce)


def _per_answer(advantages: Tensor, mask: Tensor) -> Estimate:
    import torch

    tokens = broadcast_to_tokens(advantages, mask)
    return Estimate(torch.zeros_like(mask), tokens, tokens)


def grpo(scores: Tensor, kl: Tensor, values: Tensor, mask: Tensor, s: PPO, reduce: Reduce) -> Estimate:
    """GRPO: the KL-penalised reward against its group (``scale_rewards``: by the group's, the batch's or no std)."""
    import torch

    penalised = scores - s.kl_ctl * kl.sum(dim=1)
    batch_std = None
    if s.scale_rewards == "batch":
        total, squares, count = reduce([float(penalised.sum()), float((penalised**2).sum()), float(penalised.numel())])
        batch_std = torch.tensor(moments_to_mean_std(total, squares, count, unbiased=True)[1])
    return _per_answer(grpo_advantages(penalised, s.n_samples_per_prompt, s.scale_rewards, batch_std), mask)


def rloo(scores: Tensor, kl: Tensor, values: Tensor, mask: Tensor, s: PPO, reduce: Reduce) -> Estimate:
    """RLOO: the KL-penalised reward against the mean of the group's other answers."""
    return _per_answer(rloo_advantages(scores - s.kl_ctl * kl.sum(dim=1), s.n_samples_per_prompt), mask)


#: ``ppo.algorithm`` → its estimator. A new estimator is one function and one entry here (and its name in the
#: config's ``algorithm``).
ESTIMATORS: dict[str, Estimator] = {
    "ppo": ppo,
    "grpo": grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
}
