"""Offline preference losses (DPO and its variants) as pure tensor functions.

Inputs per pair, [B] each: the summed log-probability of the chosen and rejected answers under the policy
(``chosen``, ``rejected``) and the reference (``ref_chosen``, ``ref_rejected``), and the answers' token counts.
Each loss returns (per-pair loss [B], chosen reward [B], rejected reward [B]) where the rewards are the implicit
ones the method optimises (β·log π/π_ref; β × the mean log-probability for the reference-free ones).
"""

from __future__ import annotations

from typing import Any

Tensor = Any  # torch.Tensor; torch is imported lazily so the CLI starts fast


def _margin(chosen, rejected, ref_chosen, ref_rejected):
    """(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)."""
    return (chosen - ref_chosen) - (rejected - ref_rejected)


def pair_accuracy(chosen_reward, rejected_reward):
    """1 where the chosen answer is rewarded above the rejected one, 0 below, and 0.5 for a tie: at step 0 the
    policy is its reference, every implicit reward is 0, and counting those ties as wrong would start at 0."""
    return (chosen_reward > rejected_reward).float() + 0.5 * (chosen_reward == rejected_reward).float()


def sigmoid(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al.): −log σ(β·margin). With ``label_smoothing`` ε, conservative DPO (cDPO): each label is
    taken to be wrong with probability ε, −(1−ε)·log σ(βm) − ε·log σ(−βm)."""
    import torch.nn.functional as F

    logits = beta * _margin(chosen, rejected, ref_chosen, ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def robust(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float):
    """Robust DPO (Chowdhury et al.): the unbiased loss under label noise ε,
    (−(1−ε)·log σ(βm) + ε·log σ(−βm)) / (1 − 2ε)."""
    import torch.nn.functional as F

    logits = beta * _margin(chosen, rejected, ref_chosen, ref_rejected)
    loss = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return loss, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def hinge(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """SLiC's hinge: max(0, 1 − β·margin)."""
    import torch

    loss = torch.relu(1 - beta * _margin(chosen, rejected, ref_chosen, ref_rejected))
    return loss, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def ipo(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta: float):
    """IPO (Azar et al.): (margin − 1/(2β))², on log-probabilities averaged over each answer's tokens (as TRL)."""
    c, r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
    rc, rr = ref_chosen / chosen_len.clamp(min=1), ref_rejected / rejected_len.clamp(min=1)
    loss = (_margin(c, r, rc, rr) - 1 / (2 * beta)) ** 2
    return loss, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def simpo(chosen, rejected, chosen_len, rejected_len, beta: float, gamma: float):
    """SimPO (Meng et al.), no reference: −log σ(β·(mean log π(y_w) − mean log π(y_l)) − γ), the means over each
    answer's tokens (length-normalised), γ the target margin."""
    import torch.nn.functional as F

    c, r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
    return -F.logsigmoid(beta * (c - r) - gamma), beta * c, beta * r


def orpo(chosen, rejected, chosen_len, rejected_len, nll, beta: float):
    """ORPO (Hong et al.), no reference: the SFT loss on the chosen answer plus λ·(−log σ(log odds(y_w) −
    log odds(y_l))), where odds(y) = p/(1 − p) of the answer's mean token probability p; λ is ``beta``."""
    import torch.nn.functional as F

    c, r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return nll - beta * F.logsigmoid(log_odds), beta * c, beta * r


#: log1mexp's argument is kept below this: log(1 − e^x) is −inf at x = 0 (an answer of probability 1).
LOG1MEXP_CEILING = -1e-20


def log1mexp(x):
    """log(1 − e^x) for x ≤ 0, exact where p = e^x is near 1 (Mächler's two branches: log(−expm1(x)) above
    −log 2, log1p(−e^x) below), with its true gradient; x is capped at ``LOG1MEXP_CEILING`` (log(1 − e^x) ≈ −46)."""
    import math

    import torch

    x = x.clamp(max=LOG1MEXP_CEILING)
    near = x > -math.log(2.0)
    # Each branch sees only its own x (else the other's inf would turn the gradient into NaN through where).
    high = torch.log(-torch.expm1(torch.where(near, x, -1.0)))
    low = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return torch.where(near, high, low)


def answer_logps(logits, input_ids, answer_mask):
    """Summed log-probability of each sequence's answer tokens ([B]) and their count ([B]): ``answer_mask`` [B, L]
    marks the answer's tokens in ``input_ids``; logits at position t predict token t + 1."""
    import torch.nn.functional as F

    targets = input_ids[:, 1:]
    mask = answer_mask[:, 1:].to(logits.dtype)
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(dim=1), mask.sum(dim=1)
