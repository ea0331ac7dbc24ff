"""The rollout-engine seam: what generates stage 3's answers.

An engine turns a left-padded prompt batch into a :class:`Rollout` (the tensors the rest of stage 3 works on) and
follows the trained weights (:meth:`RolloutEngine.sync`). ``ppo.rollout_engine`` names one in :data:`ENGINES`;
a new engine is one new file here and its entry. The held-out evaluation, ``dschat-core eval`` and DPO's sample
answers generate greedily through the same seam (:mod:`..evaluation`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ....config import PPO

if TYPE_CHECKING:
    from torch import Tensor

    from ....training.distributed import Dist
else:
    Tensor = Any


@dataclass
class Rollout:
    """Answers to a prompt batch: the sequences [B, P + T] (the prompt as given, then the answer right-padded),
    their attention mask and position ids, the answer mask [B, T] (up to and including the first EOS) and, where
    asked for, each answer token's log-prob under the engine [B, T] (0 past the answer)."""

    sequences: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    action_mask: Tensor
    logprobs: Tensor | None = None
    #: [B] booleans where the rollout says which answers the token budget cut (multi-turn episodes); None: an
    #: answer is cut when it fills the budget without an EOS.
    truncated: Tensor | None = None

    @classmethod
    def joined(
        cls,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        answer: Tensor,
        answer_attended: Tensor,
        action_mask: Tensor,
        logprobs: Tensor | None = None,
        truncated: Tensor | None = None,
    ) -> Rollout:
        """The prompts as given, then the right-padded answers: sequences, attention mask and position ids
        follow from the two halves (``answer_attended``: the answer tokens the model reads, observations of an
        episode included; ``action_mask``: the model's own)."""
        import torch

        from ..tokens import position_ids

        attention_mask = torch.cat([prompt_mask, answer_attended.to(prompt_mask.dtype)], dim=1)
        return cls(
            torch.cat([prompt_ids, answer], dim=1),
            attention_mask,
            position_ids(attention_mask),
            action_mask,
            logprobs,
            truncated,
        )


@dataclass(frozen=True)
class Sampling:
    """How to pick each token: greedy, or sampled at ``temperature`` with top-k (0: off) and top-p filtering.
    ``seed``: where an engine samples with a generator of its own (vLLM), answer i of the batch draws from
    ``seed + i``, so that a resumed run samples what the run never killed sampled; the hf engine draws from torch's
    generator, which checkpoints keep. ``stop_token_ids``: tokens that end an answer besides EOS, kept in it."""

    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    #: Tokens that end an answer besides EOS (an environment's turn ends: episodes.py).
    stop_token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, section: PPO, greedy: bool = False) -> Sampling:
        """Stage 3's rollout sampling (``greedy``: its held-out evaluation's)."""
        return cls(
            max_new_tokens=section.max_answer_seq_len,
            greedy=greedy or not section.do_sample,
            temperature=section.temperature,
            top_k=section.top_k,
            top_p=section.top_p,
        )


class RolloutEngine(Protocol):
    #: Whether :attr:`Rollout.logprobs` are the trained model's own (the same weights and kernels): where they are
    #: not, stage 3 computes the trainer's and corrects for the difference (docs/training.md).
    same_model: bool

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling, logprobs: bool = False
    ) -> Rollout: ...

    def sync(self, module: Any) -> None:
        """Take the trained weights of ``module`` (the actor's module, after an update)."""
        ...


#: ``ppo.rollout_engine`` → the class that implements it ("module:Class", imported only when chosen).
ENGINES: dict[str, str] = {
    "hf": "dschat_core.stages.rl.engines.hf:HFEngine",
    "vllm": "dschat_core.stages.rl.engines.vllm:VLLMEngine",
}


def make_engine(name: str, section: PPO, policy: Any, tokenizer: Any, dist: Dist) -> RolloutEngine:
    """The engine ``name`` for stage 3, generating as ``policy`` (the actor's module, or its Hybrid Engine)."""
    module_name, class_name = ENGINES[name].split(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    return engine_class.for_stage(section, policy, tokenizer, dist)


def right_pad(rows: list[list[Any]], fill: Any) -> list[list[Any]]:
    """Rows of different lengths padded on the right to the longest (at least one column)."""
    width = max([len(r) for r in rows] + [1])
    return [list(r) + [fill] * (width - len(r)) for r in rows]
