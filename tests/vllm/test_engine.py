"""The vllm rollout engine against transformers' generate on the same weights, in one process: the same greedy
answers, the same log-probs, and after a sync the new weights' answers (a LoRA actor's merged ones too)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dschat_core.config import PPO
from dschat_core.stages.rl.engines import Sampling
from dschat_core.stages.rl.engines.hf import HFEngine
from dschat_core.stages.rl.engines.vllm import VLLMEngine
from dschat_core.training.batching import left_pad
from dschat_core.training.distributed import local_dist

TEXTS = ["Human: what is two plus three? Assistant:", "Human: hi Assistant:", "Human: count to four", "Q: 7 - 2 ="]


@pytest.fixture(scope="module", params=["opt", "llama"])
def engines(request, wide_heads):
    path = str(wide_heads[request.param])
    tokenizer = AutoTokenizer.from_pretrained(path)
    section = PPO(actor_model_name_or_path=path, max_prompt_seq_len=32, max_answer_seq_len=16, dtype="fp32")
    vllm_engine = VLLMEngine.for_stage(section, None, tokenizer, local_dist())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = left_pad([tokenizer(t)["input_ids"] for t in TEXTS], tokenizer.pad_token_id)
    yield vllm_engine, model, tokenizer, ids, mask
    del vllm_engine


def compare(vllm_engine, model, tokenizer, ids, mask) -> float:
    """vLLM's greedy rollout equals transformers' token for token (masks and padding included); returns the
    largest log-prob difference on real answer tokens."""
    greedy = Sampling(max_new_tokens=16)
    ours = vllm_engine.generate(ids, mask, greedy, logprobs=True)
    theirs = HFEngine(model, tokenizer, fp32_logprobs=True).generate(ids, mask, greedy, logprobs=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.action_mask, theirs.action_mask) and torch.equal(ours.attention_mask, theirs.attention_mask)
    assert torch.equal(ours.position_ids, theirs.position_ids)
    real = theirs.action_mask.bool()
    assert real.sum() > len(TEXTS)
    return float((ours.logprobs - theirs.logprobs)[real].abs().max())


def test_greedy_answers_and_log_probs_equal_transformers(engines):
    assert compare(*engines) < 1e-4


def test_after_a_sync_the_engine_follows_the_new_weights(engines):
    vllm_engine, model, tokenizer, ids, mask = engines
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    before = vllm_engine.generate(ids, mask, Sampling(max_new_tokens=16))
    vllm_engine.sync(model)
    assert compare(vllm_engine, model, tokenizer, ids, mask) < 1e-4
    after = vllm_engine.generate(ids, mask, Sampling(max_new_tokens=16))
    assert not torch.equal(before.sequences, after.sequences)  # the change was visible, and the engine took it


def test_a_lora_actor_syncs_its_merged_weights(engines):
    from peft import LoraConfig, get_peft_model

    vllm_engine, model, tokenizer, ids, mask = engines
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=1, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)  # peft starts B at 0: give the adapters a real effect
    vllm_engine.sync(lora)  # the peft model, as stage 3's actor is with actor_lora_dim
    merged = lora.merge_and_unload().eval()
    assert compare(vllm_engine, merged, tokenizer, ids, mask) < 1e-4


def test_sampling_draws_n_answers_that_end_at_eos_or_the_limit(engines):
    vllm_engine, _, tokenizer, ids, mask = engines
    sampling = Sampling(max_new_tokens=16, greedy=False, temperature=1.0, top_k=20, top_p=0.9)
    out = vllm_engine.generate(ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), sampling, logprobs=True)
    answers = out.sequences[:, ids.shape[1] :]
    assert out.logprobs.shape == answers.shape and (out.logprobs[out.action_mask.bool()] <= 0).all()
    assert (out.logprobs[~out.action_mask.bool()] == 0).all()
    lengths = out.action_mask.sum(dim=1)
    for row, length in zip(answers, lengths, strict=True):  # each answer ends at its first EOS, or at the limit
        assert row[length - 1] == tokenizer.eos_token_id or length == 16
    assert len({tuple(r.tolist()) for r in answers}) > ids.shape[0]  # sampled: not one answer per prompt


def test_a_batch_seed_replays_the_sampled_answers(engines):
    """Answer i of a batch draws from seed + i: the same seed, the same answers (what a resumed run relies on)."""
    from dataclasses import replace

    vllm_engine, _, _, ids, mask = engines
    sampling = Sampling(max_new_tokens=16, greedy=False, temperature=1.0)
    first = vllm_engine.generate(ids, mask, replace(sampling, seed=7)).sequences
    vllm_engine.generate(ids, mask, replace(sampling, seed=8))  # the engine's own generator moves on between
    assert torch.equal(first, vllm_engine.generate(ids, mask, replace(sampling, seed=7)).sequences)
    assert not torch.equal(first, vllm_engine.generate(ids, mask, replace(sampling, seed=9)).sequences)
