"""Multi-turn episodes: the calculator parses and never evaluates, an episode's observations carry no loss and no
log-probs (token by token), and an environment that raises, hangs or floods stops the run with one line, or fails
only its episode under ``on_error: score``."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from dschat_core.config import EnvironmentSettings
from dschat_core.environments import CALCULATOR, Environment, Step, calculate
from dschat_core.errors import UserError
from dschat_core.models import init_tiny, load_causal_lm
from dschat_core.stages.rl import losses
from dschat_core.stages.rl.engines import Rollout, Sampling
from dschat_core.stages.rl.engines.hf import HFEngine
from dschat_core.stages.rl.episodes import EpisodeRunner, episode_scores
from dschat_core.stages.rl.scoring import texts, transcripts
from dschat_core.stages.rl.tokens import answer_logprobs, answer_mask, position_ids
from dschat_core.tiny_tools import TOOL_TOKENS, corpus
from dschat_core.training.batching import left_pad

DIST = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory):
    path = init_tiny("opt", tmp_path_factory.mktemp("tools") / "m", texts=corpus(), extra_tokens=TOOL_TOKENS)
    return path, AutoTokenizer.from_pretrained(path)


def test_the_calculator_parses_arithmetic_and_refuses_everything_else():
    assert calculate(" 47 * 38 ") == 1786 and calculate("(2 + 3) ** 2 - 10 / 4") == 22.5 and calculate("-7 // 2") == -4
    for text in ("__import__('os').system('true')", "x + 1", "2 ** 1000", "1 / 0", "[1, 2]", "print(1)", "1e400"):
        with pytest.raises(ValueError):
            calculate(text)
    episode = CALCULATOR.start({})
    assert episode.step(" <calc> 12 * 3 </calc>") == Step(" <result> 36 </result>", tool_call=True)
    assert episode.step(" <calc> open('x') </calc>").tool_error
    assert episode.step(" no call") == Step()


class ScriptedEngine:
    """Answers each turn with the next scripted text (a stand-in for the model, whose output a test cannot choose):
    the rollout an engine returns, built with the engines' own mask."""

    same_model = True

    def __init__(self, tokenizer, turns: list[str]) -> None:
        self.tokenizer, self.turns, self.calls = tokenizer, turns, 0

    def generate(self, prompt_ids, prompt_mask, sampling: Sampling, logprobs: bool = False) -> Rollout:
        ids = self.tokenizer(self.turns[self.calls], add_special_tokens=False)["input_ids"]
        self.calls += 1
        answer = torch.tensor([ids + [self.tokenizer.pad_token_id] * 3] * prompt_ids.shape[0])
        mask = answer_mask(answer, [self.tokenizer.eos_token_id, *sampling.stop_token_ids])
        attention = torch.cat([prompt_mask, mask], dim=1)
        probs = -torch.arange(1, answer.shape[1] + 1, dtype=torch.float).expand_as(answer) * mask
        return Rollout(torch.cat([prompt_ids, answer], 1), attention, position_ids(attention), mask, probs)


def runner(tokenizer, environment=CALCULATOR, **settings) -> EpisodeRunner:
    return EpisodeRunner(environment, EnvironmentSettings(name=environment.name, **settings), tokenizer, DIST)


def test_a_two_turn_episode_trains_on_the_models_tokens_only(tools_model):
    path, tokenizer = tools_model
    eos = tokenizer.eos_token
    engine = ScriptedEngine(tokenizer, [" <calc> 47 * 38 </calc>", f" The answer is 1786.{eos}"])
    prompt = tokenizer("\n\nHuman: What is 47 times 38?\n\nAssistant:")["input_ids"]
    ids, mask = left_pad([prompt], tokenizer.pad_token_id)
    played = runner(tokenizer).run(engine, ids, mask, [{}], Sampling(max_new_tokens=32), logprobs=True)
    out = played.rollout
    turn_1 = tokenizer(" <calc> 47 * 38 </calc>", add_special_tokens=False)["input_ids"]
    observation = tokenizer(" <result> 1786 </result>", add_special_tokens=False)["input_ids"]
    turn_2 = tokenizer(f" The answer is 1786.{eos}", add_special_tokens=False)["input_ids"]
    answer = out.sequences[0, ids.shape[1] :].tolist()
    assert answer == turn_1 + observation + turn_2
    model = [1] * len(turn_1) + [0] * len(observation) + [1] * len(turn_2)
    assert out.action_mask[0].tolist() == model  # token by token
    assert out.attention_mask[0, ids.shape[1] :].tolist() == [1] * len(answer)  # observations are attended
    assert out.logprobs is not None and (out.logprobs[0][torch.tensor(model) == 0] == 0).all()
    assert (out.logprobs[0][torch.tensor(model) == 1] < 0).all()  # the engine's, turn by turn
    figures = played.figures()
    assert figures["turns"] == [2.0] and figures["tool_calls"] == [1.0] and figures["truncated"] == [0.0]
    assert texts(tokenizer, out.sequences, out.action_mask, out.attention_mask)[1] == [" The answer is 1786."]
    assert transcripts(tokenizer, out.sequences, out.attention_mask, out.action_mask.shape[1]) == [
        " <calc> 47 * 38 </calc> <result> 1786 </result> The answer is 1786."
    ]

    # The loss on a real model: no gradient reaches the logits that predict an observation token, and changing
    # the advantages there changes nothing.
    policy = load_causal_lm(str(path), 0.0, False)
    width = out.action_mask.shape[1]
    logprobs, logits = answer_logprobs(policy, out.sequences, out.attention_mask, out.position_ids, width, True)
    logits.retain_grad()
    advantages = torch.ones(1, width)
    loss, _ = losses.policy_loss(logprobs, logprobs.detach(), advantages, out.action_mask.float(), 0.2, 0.2)
    loss.backward()
    grads = logits.grad[0].abs().sum(dim=-1)
    assert (grads[torch.tensor(model) == 0] == 0).all() and (grads[torch.tensor(model) == 1] > 0).all()
    noisy = advantages + 100.0 * (1 - out.action_mask.float())
    other, _ = losses.policy_loss(logprobs, logprobs.detach(), noisy, out.action_mask.float(), 0.2, 0.2)
    assert torch.equal(other, loss)


def test_episodes_run_on_the_hf_engine_and_stop_at_the_turns_end(tools_model):
    """The real engine: every turn ends at EOS or </calc> (kept, in the mask), the budget holds."""
    path, tokenizer = tools_model
    engine = HFEngine(load_causal_lm(str(path), 0.0, False).eval(), tokenizer)
    prompts = [tokenizer(f"\n\nHuman: What is {a} times 12?\n\nAssistant:")["input_ids"] for a in range(10, 18)]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    torch.manual_seed(0)
    sampling = Sampling(max_new_tokens=24, greedy=False)
    played = runner(tokenizer, max_turns=3).run(engine, ids, mask, [{}] * 8, sampling)
    out = played.rollout
    assert out.sequences.shape[1] - ids.shape[1] <= 24
    assert (out.action_mask.sum(dim=1) >= 1).all()
    for t in played.transcripts:
        assert 1 <= t.turns <= 3 and len(t.tokens) <= 24 and t.done


def flaky(behaviour: str) -> Environment:
    class Episode:
        def step(self, turn: str) -> Step:
            if behaviour == "raises":
                raise RuntimeError("tool crashed")
            if behaviour == "hangs":
                time.sleep(30)
            return Step("x" * 100_000)

    return Environment(f"{behaviour}-env", lambda row: Episode(), ("</calc>",))


@pytest.mark.parametrize(
    ("behaviour", "said"),
    [("raises", "raised RuntimeError('tool crashed')"), ("hangs", "did not return within 0.5 s"), ("floods", "100000")],
)
def test_an_environment_that_raises_hangs_or_floods_stops_the_run_in_one_line(tools_model, behaviour, said):
    _, tokenizer = tools_model
    eos = tokenizer.eos_token
    prompt = tokenizer("\n\nHuman: What is 1 plus 2?\n\nAssistant:")["input_ids"]
    ids, mask = left_pad([prompt, prompt], tokenizer.pad_token_id)
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        runner(tokenizer, flaky(behaviour), timeout=0.5).run(
            ScriptedEngine(tokenizer, [" <calc> 1 + 2 </calc>", f" 3{eos}"]), ids, mask, [{}, {}], Sampling(16)
        )
    message = str(caught.value)
    assert time.monotonic() - start < 5 and "\n" not in message
    assert f"environment '{behaviour}-env'" in message and said in message and "at turn 1 of episode 0" in message
    assert "ppo.environment.on_error=score" in message

    # on_error: score ends those episodes as failed, with failure_reward, and the batch goes on
    played = runner(tokenizer, flaky(behaviour), timeout=0.5, on_error="score", failure_reward=-1.0).run(
        ScriptedEngine(tokenizer, [" <calc> 1 + 2 </calc>", f" 3{eos}"]), ids, mask, [{}, {}], Sampling(16)
    )
    assert played.figures()["failed"] == [1.0, 1.0]
    scores, parts = episode_scores(played, torch.tensor([1.0, 0.5]), {})
    assert scores.tolist() == [-1.0, -1.0]


def test_a_stop_string_that_is_not_one_token_is_refused(tools_model):
    _, tokenizer = tools_model
    with pytest.raises(UserError, match="splits into .* tokens; fix: add it to the tokenizer"):
        runner(tokenizer, Environment("multi", CALCULATOR.start, ("</stop here>",)))
