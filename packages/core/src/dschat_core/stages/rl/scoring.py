"""An answer's reward: the reward model's score and the configured reward functions, weighted, and DAPO's
overlong rule; and which answers the verifiers accept."""

from __future__ import annotations

from typing import Any

from ...config import PPO
from ...models import token_values
from ...rewards import Rewarder, RewardFunctionError
from ...training.distributed import Dist, first_message
from ...training.run import NonFinite
from .engines import Rollout
from .tokens import last_index, truncated

Tensor = Any


def final_turn(attention_mask, action_mask):
    """[B, T] the model's last turn: its tokens after the last observation (all of a single answer)."""
    import torch

    observed = attention_mask[:, -action_mask.shape[1] :].bool() & ~action_mask.bool()
    after = torch.arange(action_mask.shape[1], device=action_mask.device) > last_index(observed).unsqueeze(1)
    return action_mask * (after | ~observed.any(dim=1, keepdim=True))


def texts(tokenizer, sequences, action_mask, attention_mask=None) -> tuple[list[str], list[str]]:
    """The prompts' and answers' texts of a rollout: an answer up to its end (nothing after its EOS), and of an
    episode with observations its last turn (what reward functions judge; :func:`transcripts` has the rest)."""
    prompt_len = sequences.shape[1] - action_mask.shape[1]
    answer_mask = action_mask if attention_mask is None else final_turn(attention_mask, action_mask)
    answers = sequences[:, prompt_len:].masked_fill(answer_mask == 0, tokenizer.pad_token_id)
    return (
        tokenizer.batch_decode(sequences[:, :prompt_len], skip_special_tokens=True),
        tokenizer.batch_decode(answers, skip_special_tokens=True),
    )


def transcripts(tokenizer, sequences, attention_mask, answer_len: int) -> list[str]:
    """Each answer region as text: the model's turns and the observations between them."""
    region = sequences[:, -answer_len:].masked_fill(attention_mask[:, -answer_len:] == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(region, skip_special_tokens=True)


def reward_scores(reward_model, sequences, attention_mask, positions):
    """The reward model's score at each sequence's last attended token (the end of the answer, or episode)."""
    values = token_values(reward_model, sequences, attention_mask, positions)
    return values.gather(1, last_index(attention_mask).unsqueeze(1)).squeeze(1).float()


class Scorer:
    """An answer's reward: ``reward_model_weight`` × the reward model's score plus the weighted reward functions.
    Every rank scores its own answers; a function that fails on any rank stops every rank alike."""

    def __init__(self, reward_model, section: PPO, rewarder: Rewarder | None, tokenizer, dist: Dist) -> None:
        self.reward_model, self.rewarder, self.tokenizer, self.dist = reward_model, rewarder, tokenizer, dist
        self.weight = section.reward_model_weight if section.reward_model_weight is not None else 1.0

    @property
    def verifies(self) -> bool:
        return bool(self.rewarder and self.rewarder.verifiers)

    def __call__(self, sequences, attention_mask, positions, action_mask, rows: list[dict[str, Any]]):
        """(total reward [B], the parts by name [B] each: ``model``, each function, ``correct``)."""
        import torch

        parts: dict[str, Any] = {}
        total = torch.zeros(sequences.shape[0], device=sequences.device)
        if self.reward_model is not None:
            parts["model"] = reward_scores(self.reward_model, sequences, attention_mask, positions)
            total = total + self.weight * parts["model"]
        if self.rewarder is not None:
            prompts, answers = texts(self.tokenizer, sequences, action_mask, attention_mask)
            values, problem, fix = [], "", ""
            for i, (prompt, answer, row) in enumerate(zip(prompts, answers, rows, strict=True)):
                try:
                    values.append(self.rewarder.score(prompt, answer, row))
                except RewardFunctionError as exc:
                    problem = f"{exc} on sample {i} of rank {self.dist.rank} (prompt {prompt.strip()[:80]!r})"
                    fix = exc.fix
                    break
            problem = first_message(problem)
            if problem:  # every rank raises, with the first failing rank's message and fix
                raise NonFinite(problem, first_message(fix))
            for name in self.rewarder.names:
                parts[name] = torch.tensor([v[name] for v in values], device=total.device)
            total = total + torch.tensor([self.rewarder.total(v) for v in values], device=total.device)
            if self.rewarder.verifiers:
                parts["correct"] = torch.tensor([float(self.rewarder.correct(v)) for v in values], device=total.device)
        return total, parts


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_len − buffer`` tokens, then falling linearly to ``−factor``
    at ``max_len``."""
    start = max_len - buffer
    return -factor * ((lengths.float() - start) / max(buffer, 1)).clamp(min=0.0, max=1.0)


def overlong(section: PPO, rollout: Rollout, eos_token_id: int):
    """DAPO's overlong handling of answers cut off at ``max_answer_seq_len``: (truncated [B], the mask the loss
    uses, a reward penalty [B]). An episode's length counts its observations too (they share the budget)."""
    import torch

    sequences, action_mask = rollout.sequences, rollout.action_mask
    answers = sequences[:, -action_mask.shape[1] :]
    cut = rollout.truncated if rollout.truncated is not None else truncated(action_mask, answers, eos_token_id)
    mask = action_mask.float()
    penalty = torch.zeros(sequences.shape[0], device=sequences.device)
    if section.overlong == "mask":
        mask = mask * (~cut).unsqueeze(1).float()
    elif section.overlong == "penalty":
        penalty = overlong_penalty(
            rollout.attention_mask[:, -action_mask.shape[1] :].sum(dim=1),
            section.max_answer_seq_len,
            section.overlong_buffer,
            section.overlong_penalty,
        )
    return cut, mask, penalty


def make_rewarder(section: PPO) -> Rewarder | None:
    """The reward functions ``ppo.reward_functions`` names, or None."""
    from ...plugins import get_reward_functions

    if not section.reward_functions:
        return None
    return Rewarder(section.reward_functions, get_reward_functions(), section.reward_function_timeout)
