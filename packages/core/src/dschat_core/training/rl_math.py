"""The arithmetic of stage 3's critic-free algorithms (GRPO, RLOO, REINFORCE++) and of the policy loss they share
with PPO, as pure tensor functions (PPO's own GAE and value loss are in :mod:`ppo_math`).

Shapes: ``scores`` [B] (one reward per answer), per-token tensors [B, T] over the answer, ``mask`` 1 on real answer
tokens. A group is the ``n`` answers sampled for one prompt, stored next to each other (rows ``g·n … g·n + n − 1``).
"""

from __future__ import annotations

from typing import Any

from .ppo_math import masked_mean

Tensor = Any  # torch.Tensor; torch is imported lazily so the CLI starts fast

EPS = 1e-6


# -- advantages ---------------------------------------------------------------------------------------------------
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


def zero_variance_groups(scores: Tensor, n: int) -> Tensor:
    """[B/n] booleans: groups whose answers all got the same reward (no learning signal for GRPO/RLOO)."""
    groups = group_view(scores.float(), n)
    return (groups.max(dim=1).values - groups.min(dim=1).values).abs() <= EPS


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


# -- KL to the reference -----------------------------------------------------------------------------------------
#: k3's bounds, verl's (``low_var_kl``): δ is clamped to ±20 and the estimate to at most 10, so that a token far off
#: the reference (e^30 ≈ 1e13) cannot swamp the loss; the gradient there is zero.
K3_LOG_RATIO_BOUND = 20.0
K3_BOUND = 10.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimates of KL(π ‖ π_ref) from samples of π (Schulman's k1, k2, k3): with δ = log π_ref − log π,
    k1 = −δ, k2 = δ²/2, k3 = e^δ − δ − 1 (unbiased and never negative; GRPO's), k3 bounded as verl bounds it:
    δ clamped to ±``K3_LOG_RATIO_BOUND``, the estimate to at most ``K3_BOUND``."""
    import torch

    delta = ref_logprobs - logprobs
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta**2
    if estimator == "k3":
        delta = delta.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
        return (torch.exp(delta) - delta - 1.0).clamp(max=K3_BOUND)
    raise ValueError(f"unknown KL estimator {estimator!r}")


# -- the policy loss ---------------------------------------------------------------------------------------------
def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """A per-token loss to one number: ``token_mean`` (every real token weighs the same; DAPO, PPO),
    ``seq_mean_token_mean`` (the mean over each answer, then over answers; GRPO's paper), or
    ``seq_mean_token_sum_norm`` (each answer's sum divided by a constant, ``max_len``, then the mean over answers;
    Dr. GRPO: no length bias). Answers masked out whole do not count in the per-answer means."""
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    lengths = mask.sum(dim=1)
    per_seq = (per_token * mask).sum(dim=1)
    if mode == "seq_mean_token_mean":
        per_seq = per_seq / lengths.clamp(min=1)
    elif mode == "seq_mean_token_sum_norm":
        per_seq = per_seq / float(max_len or per_token.shape[1])
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    present = (lengths > 0).to(per_seq.dtype)  # an answer masked out whole (overlong) is not in the mean
    return (per_seq * present).sum() / present.sum().clamp(min=1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate, ratio clipped to [1 − clip_low, 1 + clip_high] (DAPO's clip-higher when they
    differ), with dual clipping of negative advantages at ``dual_clip`` × |A| (Ye et al.). Returns the loss and,
    detached, the mean ratio and the fractions of tokens clipped low and high."""
    import torch

    ratio = torch.exp((logprobs - old_logprobs) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.max(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.min(per_token, -advantages * dual_clip), per_token)
    with torch.no_grad():
        low = ((ratio < 1.0 - clip_low) & (advantages < 0)).float()
        high = ((ratio > 1.0 + clip_high) & (advantages > 0)).float()
        stats = {
            "ratio": masked_mean(ratio, mask),
            "clip_low": masked_mean(low, mask),
            "clip_high": masked_mean(high, mask),
        }
    return aggregate(per_token, mask, aggregation, max_len), stats


def entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy of the policy's next-token distributions over the real answer tokens (detached)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logp = F.log_softmax(logits.float(), dim=-1)
        return masked_mean(-(logp.exp() * logp).sum(dim=-1), mask)


# -- DAPO's overlong handling ------------------------------------------------------------------------------------
def truncated(mask: Tensor, answer_ids: Tensor, eos_token_id: int) -> Tensor:
    """[B] booleans: answers that used every position without an EOS (cut off by ``max_answer_seq_len``)."""
    return ~(answer_ids == eos_token_id).any(dim=1) & (mask.sum(dim=1) == mask.shape[1])


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_len − buffer`` tokens, then falling linearly to ``−factor``
    at ``max_len``."""
    start = max_len - buffer
    return -factor * ((lengths.float() - start) / max(buffer, 1)).clamp(min=0.0, max=1.0)
