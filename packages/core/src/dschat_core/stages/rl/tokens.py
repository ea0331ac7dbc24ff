"""Answers token by token: masks, position ids and log-probs, as pure tensor functions.

Per-token tensors cover the answer only: column ``t`` is the action that produced answer token ``t`` (the full
sequence's logits are sliced from ``prompt_len - 1``). ``mask`` marks the real answer tokens: every token up to and
including the first EOS. The EOS token stays in the mask even where the tokenizer's pad token equals EOS
(DeepSpeed-Chat masks it there, so OPT never learns to stop; docs/training.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Tensor = Any  # torch.Tensor; torch is imported lazily so the CLI starts fast


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as Hugging Face ``generate`` computes them: the forward passes that
    score a rollout must see the same positions as the generation that produced it."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_mask(answer_ids: Tensor, end_ids: int | Sequence[int]) -> Tensor:
    """1 for every answer token up to and including the first end token (EOS, or a turn's stop token), 0 after."""
    import torch

    ends = torch.tensor([end_ids] if isinstance(end_ids, int) else list(end_ids), device=answer_ids.device)
    is_end = torch.isin(answer_ids, ends).long()
    return ((is_end.cumsum(dim=1) - is_end) == 0).long()


def last_index(mask: Tensor) -> Tensor:
    """[B] the column of each row's last 1 (0 for a row of zeros): an answer's last token, also where
    observations sit between its turns."""
    import torch

    columns = torch.arange(mask.shape[1], device=mask.device)
    return (columns * (mask > 0)).amax(dim=1)


def truncated(mask: Tensor, answer_ids: Tensor, eos_token_id: int) -> Tensor:
    """[B] booleans: answers that used every position without an EOS (cut off by ``max_answer_seq_len``)."""
    return ~(answer_ids == eos_token_id).any(dim=1) & (mask.sum(dim=1) == mask.shape[1])


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


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


def keeps_logits(model) -> bool:
    """Whether ``model`` (an engine, a peft model or a transformers model) takes ``logits_to_keep``."""
    import inspect

    from ...models import unwrapped

    return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters


def answer_logprobs(model, sequences, attention_mask, positions, answer_len: int, fp32: bool):
    """The answer tokens' log-probs under ``model`` [B, T] and the logits they come from. The LM head runs only
    over the positions that predict an answer token (``logits_to_keep``, where the model takes it): over a
    long prompt and a large vocabulary that is most of the head's time and memory."""
    keep = {"logits_to_keep": answer_len + 1} if keeps_logits(model) else {}
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False, **keep
    ).logits[:, -answer_len - 1 : -1]
    return gather_logprobs(logits.float() if fp32 else logits, sequences[:, -answer_len:]), logits
