"""Multi-turn episodes: a rollout engine and an environment taking turns (``ppo.environment``).

Each turn generates, for every unfinished episode at once, until EOS or one of the environment's stop tokens;
the environment answers each turn that ended on a stop token with an observation, which is appended to the
conversation. The result is one :class:`~.engines.Rollout` like a single answer's: the answer region holds the
model's tokens and the observations, all attended; ``action_mask`` marks only the model's tokens, so only they carry
loss, log-probs, KL and advantages. Episodes finish at different turns; every rank runs as many turns as the
rank that runs most (generation under ZeRO-3 is collective), generating for a placeholder when it has none left.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ...config import PPO
from ...environments import Environment, EnvironmentFailure, Episode, Step
from ...errors import UserError
from ...rewards import TimedCall
from ...training.batching import left_pad
from ...training.distributed import Dist, all_reduce_max, first_message
from .engines import Rollout, RolloutEngine, Sampling, right_pad

Tensor = Any


@dataclass
class Transcript:
    """One episode so far: its answer tokens, which of them are the model's, the engine's log-probs of those."""

    prompt: list[int]
    episode: Episode | None
    tokens: list[int] = field(default_factory=list)
    model: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False
    truncated: bool = False
    failed: bool = False
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    reward: float = 0.0

    def add(self, tokens: list[int], model: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += tokens
        self.model += [int(model)] * len(tokens)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)


@dataclass
class Episodes:
    """A batch of finished episodes: the rollout and, per episode, its turns, tool calls, tool errors, whether the
    budget cut it, whether the environment failed it, and the environment's reward."""

    rollout: Rollout
    transcripts: list[Transcript]

    def figures(self) -> dict[str, list[float]]:
        return {
            "turns": [float(t.turns) for t in self.transcripts],
            "tool_calls": [float(t.tool_calls) for t in self.transcripts],
            "tool_errors": [float(t.tool_errors) for t in self.transcripts],
            "truncated": [float(t.truncated) for t in self.transcripts],
            "failed": [float(t.failed) for t in self.transcripts],
        }


class EpisodeRunner:
    """Runs batches of episodes of ``environment`` with ``settings`` (``ppo.environment``)."""

    def __init__(self, environment: Environment, settings: Any, tokenizer: Any, dist: Dist) -> None:
        self.environment, self.settings, self.tokenizer, self.dist = environment, settings, tokenizer, dist
        self.environment_settings = environment.resolved(settings.settings)
        self.stop_ids = tuple(stop_token_id(tokenizer, stop, environment.name) for stop in environment.stop)
        self.call = TimedCall(settings.timeout)

    def run(
        self,
        engine: RolloutEngine,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        rows: list[dict[str, Any]],
        sampling: Sampling,
        logprobs: bool = False,
    ) -> Episodes:

        budget, pad = sampling.max_new_tokens, self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        episodes = [
            Transcript(ids[mask.bool()].tolist(), None)
            for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        ]
        for index, (transcript, row) in enumerate(zip(episodes, rows, strict=True)):
            transcript.episode = self.guarded(lambda row=row: self.start(row), transcript, index, 0)
        for turn in range(self.settings.max_turns):
            active = [i for i, t in enumerate(episodes) if not t.done]
            if not all_reduce_max(float(bool(active)), self.dist.device):
                break
            contexts = [episodes[i].prompt + episodes[i].tokens for i in active] or [episodes[0].prompt]
            left = max([budget - len(episodes[i].tokens) for i in active] + [1])
            ids, mask = left_pad(contexts, pad)
            turn_sampling = replace(
                sampling,
                max_new_tokens=left,
                stop_token_ids=self.stop_ids,
                seed=None if sampling.seed is None else sampling.seed + 7919 * turn,
            )
            out = engine.generate(ids.to(prompt_ids.device), mask.to(prompt_ids.device), turn_sampling, logprobs)
            answers = out.sequences[:, ids.shape[1] :].cpu()
            for k, i in enumerate(active):
                transcript = episodes[i]
                real = int(out.action_mask[k].sum())
                tokens = answers[k, : min(real, budget - len(transcript.tokens))].tolist()
                probs = out.logprobs[k, : len(tokens)].tolist() if out.logprobs is not None else None
                transcript.add(tokens, model=True, logprobs=probs)
                transcript.turns += 1
                self.after_turn(transcript, tokens, eos, budget, i)
            problem = first_message(self.problem)
            if problem:
                raise UserError(problem)
        for transcript in episodes:
            if not transcript.done:  # out of turns while the model was still calling tools
                transcript.done = transcript.truncated = True
        return Episodes(self.rollout(episodes, prompt_ids, prompt_mask, logprobs), episodes)

    problem = ""

    def start(self, row: dict[str, Any]) -> Episode:
        return self.environment.start(row, **self.environment_settings)

    def after_turn(self, transcript: Transcript, tokens: list[int], eos: int, budget: int, index: int) -> None:
        """End the episode (EOS, or the budget), or step the environment and append its observation."""
        if not tokens or tokens[-1] == eos:
            transcript.done = True
            return
        if tokens[-1] not in self.stop_ids:  # the token budget ran out inside the turn
            transcript.done = transcript.truncated = True
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        episode = transcript.episode
        assert episode is not None
        step = self.guarded(lambda: self.checked(episode.step(text)), transcript, index, transcript.turns)
        if step is None:
            return
        transcript.tool_calls += int(step.tool_call)
        transcript.tool_errors += int(step.tool_error)
        if step.reward is not None:
            transcript.reward += float(step.reward)
        if step.observation:
            observation = self.tokenizer(step.observation, add_special_tokens=False)["input_ids"]
            if len(observation) > self.settings.max_observation_tokens:
                self.fail(
                    transcript,
                    index,
                    transcript.turns,
                    f"answered with {len(observation)} tokens, more than max_observation_tokens "
                    f"{self.settings.max_observation_tokens}",
                )
                return
            room = budget - len(transcript.tokens)
            transcript.add(observation[:room], model=False)
            if len(observation) >= room:
                transcript.done = transcript.truncated = True
                return
        if step.done:
            transcript.done = True

    def checked(self, step: Any) -> Step:
        if not isinstance(step, Step):
            raise TypeError(f"step() returned {type(step).__name__}, not a Step")
        limit = 16 * self.settings.max_observation_tokens  # characters: a flood is refused before it is tokenized
        if len(step.observation) > limit:
            raise EnvironmentFailure(f"answered with {len(step.observation)} characters (more than {limit})")
        return step

    def guarded(self, fn, transcript: Transcript, index: int, turn: int):
        """``fn()`` under the environment's timeout; a failure fails the episode (on_error: score) or is kept
        to stop every rank with one line after this turn (on_error: fail)."""
        try:
            return self.call(fn)
        except Exception as exc:  # noqa: BLE001 - any failure of the plugin's code is reported, named
            why = str(exc) if isinstance(exc, (EnvironmentFailure, TimeoutError)) else f"raised {exc!r}"
            self.fail(transcript, index, turn, why)
            return None

    def fail(self, transcript: Transcript, index: int, turn: int, why: str) -> None:
        transcript.done = transcript.failed = True
        transcript.reward = self.settings.failure_reward
        if self.settings.on_error == "fail" and not self.problem:
            where = "at the start" if turn == 0 else f"at turn {turn}"
            self.problem = (
                f"ppo.environment: environment {self.environment.name!r} {why} {where} of episode {index} on rank "
                f"{self.dist.rank}; fix: repair the environment, or set ppo.environment.on_error=score to count "
                "such episodes as failed and go on"
            )

    def rollout(self, episodes: list[Transcript], prompt_ids, prompt_mask, logprobs: bool) -> Rollout:
        """The episodes as one rollout: the prompts as given, then each answer region right-padded."""
        import torch

        device = prompt_ids.device
        pad = self.tokenizer.pad_token_id
        answer = torch.tensor(right_pad([t.tokens for t in episodes], pad), device=device)
        attended = torch.tensor(right_pad([[1] * len(t.tokens) for t in episodes], 0), device=device)
        action_mask = torch.tensor(right_pad([t.model for t in episodes], 0), device=device)
        answer_logprobs = None
        if logprobs:
            answer_logprobs = torch.tensor(right_pad([t.logprobs for t in episodes], 0.0), device=device)
        truncated = torch.tensor([t.truncated for t in episodes], device=device)
        return Rollout.joined(prompt_ids, prompt_mask, answer, attended, action_mask, answer_logprobs, truncated)


def stop_token_id(tokenizer, stop: str, environment: str) -> int:
    """The one token ``stop`` is (a turn must end exactly where the call does, on every engine)."""
    ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(
            f"ppo.environment.name: environment {environment!r} ends turns with {stop!r}, which this tokenizer "
            f"splits into {len(ids)} tokens; fix: add it to the tokenizer as one token (tokenizer.add_tokens, "
            "then resize the model's embeddings) — `dschat-core model init-tiny --tools` does for the tiny model"
        )
    return int(ids[0])


def make_episode_runner(section: PPO, tokenizer: Any, dist: Dist) -> EpisodeRunner | None:
    """The runner for ``ppo.environment`` (None without one)."""
    from ...plugins import get_environments

    settings = section.environment
    if settings.name is None:
        return None
    known = get_environments()
    if settings.name not in known:
        raise UserError(
            f"ppo.environment.name: {settings.name!r} is not a registered environment on this worker; fix: install "
            f"the plugin that provides it in the workers' environment (registered: {', '.join(sorted(known))})"
        )
    return EpisodeRunner(known[settings.name], settings, tokenizer, dist)


def generate_rollouts(
    engine: RolloutEngine,
    runner: EpisodeRunner | None,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    rows: list[dict[str, Any]],
    sampling: Sampling,
    logprobs: bool = False,
) -> tuple[Rollout, Episodes | None]:
    """One answer per prompt from the engine, or with an environment, one episode per prompt."""
    if runner is None:
        return engine.generate(prompt_ids, prompt_mask, sampling, logprobs=logprobs), None
    episodes = runner.run(engine, prompt_ids, prompt_mask, rows, sampling, logprobs)
    return episodes.rollout, episodes


def episode_scores(episodes: Episodes, scores: Tensor, parts: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The reward functions' scores plus the environment's rewards (a part of its own where it gave any); a
    failed episode (``on_error: score``) gets ``failure_reward`` whatever else it earned."""
    import torch

    rewards = torch.tensor([t.reward for t in episodes.transcripts], device=scores.device, dtype=scores.dtype)
    failed = torch.tensor([t.failed for t in episodes.transcripts], device=scores.device)
    if bool(rewards.any()):
        parts = {**parts, "environment": rewards}
    return torch.where(failed, rewards, scores + rewards), parts
