"""Scored answers, the unit stage 3 trains on: one row per answer, tensors typed."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor
else:
    Tensor = Any  # torch is imported lazily so the CLI starts fast


@dataclass
class Experience:
    """Per-token tensors cover the answer: [B, T]; sequence tensors the left-padded prompt, then the answer."""

    input_ids: Tensor  # [B, P + T]
    attention_mask: Tensor  # [B, P + T]
    position_ids: Tensor  # [B, P + T]
    action_mask: Tensor  # [B, T] the tokens the loss sees (overlong answers masked out there)
    old_logprobs: Tensor  # [B, T] the trainer's, before the update
    ref_logprobs: Tensor  # [B, T]
    old_values: Tensor  # [B, T] the critic's (zeros without one)
    rewards: Tensor  # [B, T] per token (PPO, REINFORCE++): the KL penalty, and the score on the last real token
    advantages: Tensor  # [B, T]
    returns: Tensor  # [B, T]
    scores: Tensor  # [B] the reward of each answer
    parts: dict[str, Tensor] | None = None  # [B] each: the reward model's score, each function's value, verdicts
    answer_mask: Tensor | None = None  # [B, T] every real answer token (for lengths and KL)
    truncated: Tensor | None = None  # [B] cut off at max_answer_seq_len
    correction: Tensor | None = None  # [B, T] the rollout correction's weights (answers from another engine)

    def split(self, size: int) -> list[Experience]:
        count = self.input_ids.shape[0]
        return [self.select(slice(i, i + size)) for i in range(0, count, size)]

    def select(self, rows) -> Experience:
        """The answers ``rows`` picks (a slice or an index tensor)."""
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                picked[f.name] = {k: v[rows] for k, v in value.items()}
            else:
                picked[f.name] = None if value is None else value[rows]
        return Experience(**picked)

    def trimmed(self) -> Experience:
        """The same answers without the columns that are padding in every row: the prompt's left padding and the
        answer's right padding. Exact: real tokens keep their position ids, attend to the same tokens, and
        masked sums do not see the columns removed."""
        attended = self.attention_mask.sum(dim=0) > 0
        answer_len = self.action_mask.shape[1]
        prompt_len = attended.shape[0] - answer_len
        real = attended.nonzero().squeeze(1)
        first = min(int(real[0]), prompt_len) if real.numel() else prompt_len
        answer_real = attended[prompt_len:].nonzero().squeeze(1)
        keep = int(answer_real[-1]) + 1 if answer_real.numel() else 1
        if first == 0 and keep == answer_len:
            return self
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SEQUENCE_FIELDS:
                picked[f.name] = value[:, first : prompt_len + keep]
            elif value is not None and not isinstance(value, dict) and value.dim() == 2:
                picked[f.name] = value[:, :keep]
            else:
                picked[f.name] = value
        return Experience(**picked)

    def by_length(self) -> Experience:
        """The answers sorted by their attended length (stable, so deterministic): micro-batches cut from it pad
        to short widths. Groups of a prompt's answers are split; each loss term is per answer, so only which
        answers share a micro-batch changes."""
        import torch

        order = torch.sort(self.attention_mask.sum(dim=1), stable=True).indices
        return self.select(order)


#: Experience fields over the whole sequence (left-padded prompt, then the answer); the rest cover the answer.
SEQUENCE_FIELDS = ("input_ids", "attention_mask", "position_ids")


def concat(parts: list[Experience], pad_id: int) -> Experience:
    """One experience from batches generated apart: prompts left-padded to the longest, answers right-padded
    (masked), so that the answer is the last T tokens of every row again."""
    import torch
    import torch.nn.functional as F

    if len(parts) == 1:
        return parts[0]
    answer = max(p.action_mask.shape[1] for p in parts)
    prompt = max(p.input_ids.shape[1] - p.action_mask.shape[1] for p in parts)
    joined: dict[str, Any] = {}
    for f in fields(Experience):
        values = [getattr(p, f.name) for p in parts]
        if values[0] is None:
            joined[f.name] = None
        elif isinstance(values[0], dict):
            joined[f.name] = {k: torch.cat([v[k] for v in values]) for k in values[0]}
        elif f.name in SEQUENCE_FIELDS:
            fill = pad_id if f.name == "input_ids" else 0
            joined[f.name] = torch.cat(
                [
                    F.pad(
                        v, (prompt - (v.shape[1] - p.action_mask.shape[1]), answer - p.action_mask.shape[1]), value=fill
                    )
                    for v, p in zip(values, parts, strict=True)
                ]
            )
        elif values[0].dim() == 2:
            joined[f.name] = torch.cat([F.pad(v, (0, answer - v.shape[1])) for v in values])
        else:
            joined[f.name] = torch.cat(values)
    return Experience(**joined)
