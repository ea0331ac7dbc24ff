"""The PPO arithmetic of DeepSpeed-Chat's ``ppo_trainer.py``, as pure tensor functions.

All per-token tensors cover the answer only: column ``t`` is the action that produced answer token ``t`` (the
full sequence's logits/values are sliced from ``prompt_len - 1``). ``mask`` marks the real answer tokens: every
token up to and including the first EOS. Two deliberate differences from DeepSpeed-Chat, both documented in
docs/training.md: the clipped score lands on the last real answer token (DeepSpeed-Chat adds it one position
later, on the masked action after EOS, so it reaches the loss only through GAE), and the EOS token stays in the
mask even where the tokenizer's pad token equals EOS (DeepSpeed-Chat masks it there, so OPT never learns to stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Tensor = Any  # torch.Tensor; torch is imported lazily so the CLI starts fast


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as Hugging Face ``generate`` computes them: the forward passes that
    score a rollout must see the same positions as the generation that produced it."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_mask(answer_ids: Tensor, eos_token_id: int) -> Tensor:
    """1 for every answer token up to and including the first EOS, 0 after it."""
    is_eos = (answer_ids == eos_token_id).long()
    return ((is_eos.cumsum(dim=1) - is_eos) == 0).long()


def gather_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) under ``logits`` [B, T, V] for tokens [B, T]."""
    import torch.nn.functional as F

    return F.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def step_logprobs(step_logits: Sequence[Tensor], tokens: Tensor, fp32: bool = True) -> Tensor:
    """log p(token) [B, T] from one logits tensor [B, V] per generated token, as ``generate(output_logits=True)``
    returns them: the same values as :func:`gather_logprobs` on a forward over the whole sequence."""
    import torch

    return torch.cat(
        [
            gather_logprobs((logits.float() if fp32 else logits).unsqueeze(1), tokens[:, t : t + 1])
            for t, logits in enumerate(step_logits)
        ],
        dim=1,
    )


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def shaped_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor, kl_ctl: float, clip_reward_value: float
) -> Tensor:
    """r_t = -β·(log π_old − log π_ref) on every real answer token, plus clip(score, ±c) on the last one."""
    import torch

    rewards = -kl_ctl * (logprobs - ref_logprobs) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.clamp(-clip_reward_value, clip_reward_value).to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (trlx's, as DeepSpeed-Chat): δ_t = r_t + γV_{t+1} − V_t,
    A_t = δ_t + γλA_{t+1}, R_t = A_t + V_t; rewards and values past the answer count as 0. No whitening."""
    import torch

    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    advantages = []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages.append(last)
    advantages_t = torch.stack(advantages[::-1], dim=1)
    return advantages_t.detach(), (advantages_t + values).detach()


def actor_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate, masked token mean. Returns (loss, mean ratio)."""
    import torch

    ratio = torch.exp((logprobs - old_logprobs) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean(ratio.detach(), mask)


def critic_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float) -> Tensor:
    """Clipped value loss: 0.5 · masked mean of max((V − R)², (clip(V, V_old ± c) − R)²)."""
    import torch

    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
