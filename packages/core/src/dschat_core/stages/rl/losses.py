"""Stage 3's losses as pure tensor functions: the KL estimators, the aggregation of a per-token loss (a table), the
clipped policy loss with its rollout correction, the clipped value loss and the policy's entropy.

Per-token tensors [B, T] cover the answer; ``mask`` is 1 on the tokens the loss sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .tokens import masked_mean

Tensor = Any  # torch.Tensor; torch is imported lazily so the CLI starts fast

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


# -- aggregation: a per-token loss to one number --------------------------------------------------------------------
def _per_answer(per_token: Tensor, mask: Tensor, per_seq: Tensor) -> Tensor:
    """The mean over answers of ``per_seq``, answers masked out whole (overlong) left out of the mean."""
    present = (mask.sum(dim=1) > 0).to(per_seq.dtype)
    return (per_seq * present).sum() / present.sum().clamp(min=1)


def token_mean(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    """Every real token weighs the same (DAPO, PPO)."""
    return masked_mean(per_token, mask)


def seq_mean_token_mean(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    """The mean over each answer, then over answers (GRPO's paper)."""
    return _per_answer(per_token, mask, (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))


def seq_mean_token_sum(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    """Each answer's sum, then the mean over answers (verl's ``seq-mean-token-sum``)."""
    return _per_answer(per_token, mask, (per_token * mask).sum(dim=1))


def seq_mean_token_sum_norm(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    """Each answer's sum divided by a constant, ``max_len``, then the mean over answers (Dr. GRPO: no length
    bias)."""
    return _per_answer(per_token, mask, (per_token * mask).sum(dim=1) / float(max_len or per_token.shape[1]))


#: ``ppo.loss_agg`` → its function. A new aggregation is one function and one entry here.
AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return AGGREGATIONS[mode](per_token, mask, max_len)


# -- the policy loss ---------------------------------------------------------------------------------------------
def rollout_correction(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float):
    """Truncated importance sampling for answers sampled by another engine (vLLM) than the one that trains: per
    token w = min(π_train(y)/π_rollout(y), cap), from the trainer's log-probs before the update and the engine's.
    Returns (w [B, T], detached, and its statistics: mean and max ratio before the cap, fraction capped)."""
    import torch

    with torch.no_grad():
        ratio = torch.exp((old_logprobs - rollout_logprobs) * mask)
        capped = (ratio > cap).float()
        real = mask > 0
        stats = {
            "mean": masked_mean(ratio, mask),
            "max": ratio[real].max() if real.any() else ratio.new_ones(()),
            "capped_frac": masked_mean(capped, mask),
        }
        return ratio.clamp(max=cap) * mask, stats


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
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate, ratio clipped to [1 − clip_low, 1 + clip_high] (DAPO's clip-higher when they
    differ), with dual clipping of negative advantages at ``dual_clip`` × |A| (Ye et al.); each token's term times
    ``weights`` (the rollout correction) where given. Returns the loss and, detached, the mean ratio and the
    fractions of tokens clipped low and high."""
    import torch

    ratio = torch.exp((logprobs - old_logprobs) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.max(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.min(per_token, -advantages * dual_clip), per_token)
    if weights is not None:
        per_token = per_token * weights
    with torch.no_grad():
        low = ((ratio < 1.0 - clip_low) & (advantages < 0)).float()
        high = ((ratio > 1.0 + clip_high) & (advantages > 0)).float()
        stats = {
            "ratio": masked_mean(ratio, mask),
            "clip_low": masked_mean(low, mask),
            "clip_high": masked_mean(high, mask),
        }
    return aggregate(per_token, mask, aggregation, max_len), stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float) -> Tensor:
    """PPO's clipped value loss (DeepSpeed-Chat's critic): 0.5 · masked mean of max((V − R)², (clip(V, V_old ± c) −
    R)²)."""
    import torch

    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy of the policy's next-token distributions over the real answer tokens (detached)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logp = F.log_softmax(logits.float(), dim=-1)
        return masked_mean(-(logp.exp() * logp).sum(dim=-1), mask)
