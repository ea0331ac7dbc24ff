"""Multi-turn episodes with the calculator on ``rollout_engine: vllm`` (2 CPU ranks, an engine in each): greedy
episodes equal the hf engine's token for token, and the tools sample learns to call the calculator as on hf."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from dschat_core.config import PPO, EnvironmentSettings
from dschat_core.environments import CALCULATOR
from dschat_core.models import load_causal_lm
from dschat_core.stages.rl.engines import Sampling
from dschat_core.stages.rl.engines.hf import HFEngine
from dschat_core.stages.rl.engines.vllm import VLLMEngine
from dschat_core.stages.rl.episodes import EpisodeRunner
from dschat_core.training.batching import left_pad
from dschat_core.training.distributed import local_dist

from ..stages.runs import metrics, run_stage, tools_assets, tools_config


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    return tools_assets(tmp_path_factory.mktemp("tools-assets"))


@pytest.fixture(scope="module")
def actor(tmp_path_factory, tools):
    """Stage 1 of the tools sample (its model's heads are 32 wide, as vLLM's CPU kernels need)."""
    out, _ = run_stage(tools_config(tmp_path_factory.mktemp("sft"), tools), "sft")
    return out


@pytest.mark.ranks
def test_greedy_episodes_on_vllm_equal_the_hf_engines(actor):
    tokenizer = AutoTokenizer.from_pretrained(actor)
    section = PPO(max_prompt_seq_len=24, max_answer_seq_len=32, actor_model_name_or_path=str(actor), dtype="fp32")
    dist = local_dist()
    settings = EnvironmentSettings(name="calculator", max_turns=3)
    prompts = [tokenizer(f"\n\nHuman: What is {a} times {a + 7}?\n\nAssistant:")["input_ids"] for a in range(20, 36)]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    greedy = Sampling(max_new_tokens=32)
    runner = EpisodeRunner(CALCULATOR, settings, tokenizer, dist)
    hf = runner.run(HFEngine(load_causal_lm(str(actor), 0.0, False).eval(), tokenizer), ids, mask, [{}] * 16, greedy)
    engine = VLLMEngine.for_stage(section, None, tokenizer, dist)
    on_vllm = runner.run(engine, ids, mask, [{}] * 16, greedy, logprobs=True)
    assert torch.equal(hf.rollout.sequences, on_vllm.rollout.sequences)
    assert torch.equal(hf.rollout.action_mask, on_vllm.rollout.action_mask)
    assert sum(t.tool_calls for t in hf.transcripts) > 0  # the episodes did call the calculator
    observed = (on_vllm.rollout.attention_mask[:, ids.shape[1] :] == 1) & (on_vllm.rollout.action_mask == 0)
    assert observed.any() and (on_vllm.rollout.logprobs[observed] == 0).all()


@pytest.mark.ranks
def test_the_tools_sample_learns_on_vllm(tmp_path, tools, actor):
    cfg = tools_config(tmp_path, tools, f"ppo.actor_model_name_or_path={actor}", "ppo.rollout_engine=vllm")
    out, log = run_stage(cfg, "ppo")
    assert "rollout engine vllm" in log
    evals = [m for m in metrics(out) if "eval/accuracy" in m]
    acc = [m["eval/accuracy"] for m in evals]
    assert acc[0] <= 0.3 and acc[-1] >= 0.8, acc
    assert evals[-1]["eval/episodes/tool_calls"] >= 0.8
