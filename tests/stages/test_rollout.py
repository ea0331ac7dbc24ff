"""The behaviour policy's log-probs read off generation equal a separate forward over the rollout (issue 18):
left-padded prompts of different lengths, sampled with temperature and top-k, answers that end early."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dschat_core.config import PPO
from dschat_core.stages.rollout import rollout
from dschat_core.training import ppo_math
from dschat_core.training.batching import left_pad


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
    separate = ppo_math.gather_logprobs(logits[:, -answer_len - 1 : -1].float(), sequences[:, -answer_len:])
    real = answer_mask.bool()
    assert real.sum() > len(texts)  # more than one token per answer is compared
    assert torch.allclose(from_generation[real], separate[real], atol=1e-5), (from_generation - separate).abs().max()
    # the same rollout without them: the same tokens under the same seed
    torch.manual_seed(0)
    again = rollout(model, ids, mask, section, tokenizer, greedy=False)
    assert again[4] is None and torch.equal(again[0], sequences)


def test_step_logprobs_pick_each_steps_token():
    step_logits = [torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])), torch.zeros(2, 3)]
    tokens = torch.tensor([[0, 2], [1, 1]])
    got = ppo_math.step_logprobs(step_logits, tokens)
    expected = torch.log(torch.tensor([[0.5, 1 / 3], [0.8, 1 / 3]]))
    assert torch.allclose(got, expected, atol=1e-6)
