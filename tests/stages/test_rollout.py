"""Stage 3's speed changes give the results they replace (issue 18): the behaviour policy's log-probs read off
generation equal a separate forward over the rollout (left-padded prompts of different lengths, sampled with
temperature and top-k, answers that end early); the static cache (and its compiled decode step) generates the
same tokens; micro-batches trimmed of all-padding columns give the same losses."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dschat_core.config import PPO
from dschat_core.stages.rl import losses, tokens
from dschat_core.stages.rl.engines import Sampling
from dschat_core.stages.rl.engines.hf import HFEngine
from dschat_core.stages.rl.experience import Experience
from dschat_core.stages.rl.tokens import answer_logprobs, keeps_logits
from dschat_core.training.batching import left_pad
from dschat_core.training.distributed import local_dist


def rollout(model, ids, mask, section: PPO, tokenizer, greedy: bool = False, logprobs: bool = False):
    """Stage 3's hf engine as stage 3 builds it, its rollout as a tuple."""
    engine = HFEngine.for_stage(section, model, tokenizer, local_dist())
    sampling = Sampling.of(section)
    out = engine.generate(ids, mask, replace(sampling, greedy=True) if greedy else sampling, logprobs)
    return out.sequences, out.attention_mask, out.position_ids, out.action_mask, out.logprobs


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_logprobs_from_generation_equal_a_separate_forward(assets, arch, kv_cache):
    tokenizer = AutoTokenizer.from_pretrained(assets[arch])
    model = AutoModelForCausalLM.from_pretrained(assets[arch], dtype=torch.float32).eval()
    section = PPO(max_answer_seq_len=12, temperature=0.7, top_k=20, generation_kv_cache=kv_cache)
    texts = ["Human: what is two plus three? Assistant:", "Human: hi Assistant:", "Human: count to four"]
    ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    assert (mask == 0).any()  # the batch really is left-padded
    torch.manual_seed(0)
    sequences, attention_mask, positions, answer_mask, from_generation = rollout(
        model, ids, mask, section, tokenizer, greedy=False, logprobs=True
    )
    answer_len = answer_mask.shape[1]
    assert from_generation.shape == answer_mask.shape
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions).logits
    separate = tokens.gather_logprobs(logits[:, -answer_len - 1 : -1].float(), sequences[:, -answer_len:])
    real = answer_mask.bool()
    assert real.sum() > len(texts)  # more than one token per answer is compared
    assert torch.allclose(from_generation[real], separate[real], atol=1e-5), (from_generation - separate).abs().max()
    # the same rollout without them: the same tokens under the same seed
    torch.manual_seed(0)
    again = rollout(model, ids, mask, section, tokenizer, greedy=False)
    assert again[4] is None and torch.equal(again[0], sequences)


def test_step_logprobs_pick_each_steps_token():
    step_logits = [torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])), torch.zeros(2, 3)]
    picked = torch.tensor([[0, 2], [1, 1]])
    got = tokens.step_logprobs(step_logits, picked)
    expected = torch.log(torch.tensor([[0.5, 1 / 3], [0.8, 1 / 3]]))
    assert torch.allclose(got, expected, atol=1e-6)


def sampled_rollout(model, tokenizer, section, **kwargs):
    texts = ["Human: what is two plus three? Assistant:", "Human: hi Assistant:", "Human: count to four"]
    ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    torch.manual_seed(0)
    return rollout(model, ids, mask, section, tokenizer, greedy=False, logprobs=True, **kwargs)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_static_cache_generates_what_the_dynamic_cache_does(assets, arch):
    tokenizer = AutoTokenizer.from_pretrained(assets[arch])
    model = AutoModelForCausalLM.from_pretrained(assets[arch], dtype=torch.float32).eval()
    dynamic = sampled_rollout(model, tokenizer, PPO(max_answer_seq_len=12, temperature=0.7, top_k=20))
    static = sampled_rollout(
        model, tokenizer, PPO(max_answer_seq_len=12, temperature=0.7, top_k=20, generation_cache="static")
    )
    assert torch.equal(static[0], dynamic[0]) and torch.equal(static[3], dynamic[3])
    real = dynamic[3].bool()
    assert torch.allclose(static[4][real], dynamic[4][real], atol=1e-5)


def test_compiled_decode_step_generates_the_same_answers(assets):
    """The compiled path pads prompts to a multiple of 32 on the left: the answers and their log-probs stay."""
    tokenizer = AutoTokenizer.from_pretrained(assets["opt"])
    model = AutoModelForCausalLM.from_pretrained(assets["opt"], dtype=torch.float32).eval()
    dynamic = sampled_rollout(model, tokenizer, PPO(max_answer_seq_len=8, temperature=0.7, top_k=20))
    compiled = sampled_rollout(
        model,
        tokenizer,
        PPO(max_answer_seq_len=8, temperature=0.7, top_k=20, generation_cache="static", compile_generation=True),
    )
    assert compiled[0].shape[1] - 8 == 32  # the prompt width, rounded up
    answers = dynamic[0][:, -8:]
    assert torch.equal(compiled[0][:, -8:], answers) and torch.equal(compiled[3], dynamic[3])
    real = dynamic[3].bool()
    assert torch.allclose(compiled[4][real], dynamic[4][real], atol=1e-5)
    # the real tokens keep their positions: the rollout's position ids over the answer are unchanged
    assert torch.equal(compiled[2][:, -8:], dynamic[2][:, -8:])


def experience_of(sequences, attention_mask, positions, action_mask, logprobs) -> Experience:
    torch.manual_seed(1)
    advantages = torch.randn(action_mask.shape) * action_mask
    zeros = torch.zeros_like(logprobs)
    return Experience(
        sequences,
        attention_mask,
        positions,
        action_mask.float(),
        logprobs,
        logprobs,
        zeros,
        zeros,
        advantages,
        advantages,
        torch.zeros(sequences.shape[0]),
        answer_mask=action_mask.float(),
        truncated=torch.zeros(sequences.shape[0], dtype=torch.bool),
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_trimmed_micro_batches_give_the_same_losses(assets, aggregation):
    """A micro-batch of the short answers of a rollout, trimmed of the columns that are padding in all its rows,
    gives the policy loss and gradient of the untrimmed one (within 1e-5, fp32)."""
    tokenizer = AutoTokenizer.from_pretrained(assets["opt"])
    model = AutoModelForCausalLM.from_pretrained(assets["opt"], dtype=torch.float32)
    texts = ["Human: what is two plus three? Assistant:", "Human: hi Assistant:", "Human: count to four please"]
    ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    torch.manual_seed(0)
    rolled = rollout(model.eval(), ids, mask, PPO(max_answer_seq_len=12), tokenizer, greedy=False, logprobs=True)
    exp = experience_of(*rolled)
    # a micro-batch whose rows' padding leaves whole columns empty: the two shorter prompts, answers cut short
    exp.action_mask[:, 6:] = 0
    exp.attention_mask[:, -6:] = 0
    part = exp.select(slice(1, 3))
    trimmed = part.trimmed()
    assert trimmed.input_ids.shape[1] < part.input_ids.shape[1]
    assert trimmed.action_mask.sum() == part.action_mask.sum()

    def loss_and_grads(e: Experience):
        model.zero_grad()
        answer_len = e.action_mask.shape[1]
        logits = model(input_ids=e.input_ids, attention_mask=e.attention_mask, position_ids=e.position_ids).logits
        logprobs = tokens.gather_logprobs(logits[:, -answer_len - 1 : -1].float(), e.input_ids[:, -answer_len:])
        loss, _ = losses.policy_loss(
            logprobs, e.old_logprobs + 0.05, e.advantages, e.action_mask, 0.2, 0.2, None, aggregation, 12
        )
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads(part)
    trimmed_loss, trimmed_grads = loss_and_grads(trimmed)
    assert torch.allclose(full_loss, trimmed_loss, atol=1e-5), (full_loss, trimmed_loss)
    for full, short in zip(full_grads, trimmed_grads, strict=True):
        assert torch.allclose(full, short, atol=1e-5)


def test_by_length_sorts_answers_and_keeps_every_one():
    attention = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 1]])
    action = attention[:, 2:]
    exp = experience_of(torch.arange(16).view(4, 4), attention, attention.cumsum(1), action, torch.zeros(4, 2))
    ordered = exp.by_length()
    assert ordered.attention_mask.sum(dim=1).tolist() == [2, 2, 3, 4]
    assert ordered.input_ids[:, 0].tolist() == [4, 12, 8, 0]  # stable: equal lengths keep their order


@pytest.mark.parametrize("arch", ["opt", "llama", "lora"])
def test_the_lm_head_over_answer_positions_only_gives_the_full_forwards_log_probs(assets, arch):
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(assets["llama" if arch == "llama" else "opt"])
    model = AutoModelForCausalLM.from_pretrained(assets["llama" if arch == "llama" else "opt"], dtype=torch.float32)
    if arch == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.eval()
    assert keeps_logits(model)
    sequences, attention_mask, positions, answer_mask, _ = sampled_rollout(model, tokenizer, PPO(max_answer_seq_len=10))
    answer_len = answer_mask.shape[1]
    kept, kept_logits = answer_logprobs(model, sequences, attention_mask, positions, answer_len, fp32=True)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions).logits
    full = tokens.gather_logprobs(logits[:, -answer_len - 1 : -1].float(), sequences[:, -answer_len:])
    assert kept_logits.shape == (sequences.shape[0], answer_len, logits.shape[-1])
    assert torch.allclose(kept, full, atol=1e-6), (kept - full).abs().max()
