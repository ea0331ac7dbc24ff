"""Stage 3's arithmetic against values worked out by hand (β = 0.1, clip 5, γ = 1, λ = 0.5 for round numbers)."""

from __future__ import annotations

import pytest
import torch

from dschat_core.config import PPO
from dschat_core.stages.rl import estimators, losses, tokens
from dschat_core.stages.rl.experience import Experience
from dschat_core.stages.rl.roles import total_update_steps
from dschat_core.training.batching import left_pad

EOS = 9


def test_answer_mask_keeps_the_first_eos_and_drops_what_follows():
    answers = torch.tensor([[5, 6, EOS, 0, 0], [5, 6, 7, 8, 4], [EOS, EOS, 0, 0, 0]])
    assert tokens.answer_mask(answers, EOS).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_position_ids_skip_left_padding_as_generate_does():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert tokens.position_ids(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_gather_logprobs():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    assert torch.allclose(tokens.gather_logprobs(logits, torch.tensor([[0, 2]])), torch.log(torch.tensor([[0.5, 0.8]])))


# Two answers over three positions: the first has two real tokens, the second three.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
LOGPROBS = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
REF_LOGPROBS = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, -1.5, -0.25]])
SCORES = torch.tensor([2.0, -7.0])  # the second is clipped to -5


def test_token_rewards_are_deepspeed_chats_shaped_rewards():
    rewards = estimators.token_rewards(LOGPROBS - REF_LOGPROBS, SCORES, MASK, kl_ctl=0.1, clip=5.0)  # k1
    # row 0: -0.1·(−1 − −1.5) = −0.05; −0.1·(−2 − −1) = 0.1, + score 2 on the last real token; masked after.
    # row 1: 0; −0.1·(−0.5 − −1.5) = −0.1; −0.1·(−0.5 − −0.25) = 0.025, + clip(−7) = −5.
    expected = torch.tensor([[-0.05, 2.1, 0.0], [0.0, -0.1, -4.975]])
    assert torch.allclose(rewards, expected)


def test_gae_by_hand():
    rewards = torch.tensor([[-0.05, 2.1, 0.0], [0.0, -0.1, -4.975]])
    values = torch.tensor([[0.5, 1.0, 7.0], [-1.0, -2.0, -3.0]])  # 7.0 sits past the end: counts as 0
    advantages, returns = estimators.gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    # row 0, backwards: t=2 masked: δ=0, A=0.  t=1: δ = 2.1 + 0 − 1.0 = 1.1, A = 1.1.
    #                   t=0: δ = −0.05 + 1.0 − 0.5 = 0.45, A = 0.45 + 0.5·1.1 = 1.0.
    # row 1: t=2: δ = −4.975 + 0 + 3 = −1.975, A = −1.975.  t=1: δ = −0.1 − 3 + 2 = −1.1, A = −1.1 − 0.9875 = −2.0875.
    #        t=0: δ = 0 − 2 + 1 = −1, A = −1 − 1.04375 = −2.04375.
    assert torch.allclose(advantages, torch.tensor([[1.0, 1.1, 0.0], [-2.04375, -2.0875, -1.975]]))
    assert torch.allclose(returns, torch.tensor([[1.5, 2.1, 0.0], [-3.04375, -4.0875, -4.975]]))


def test_actor_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, stats = losses.policy_loss(new, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    ratio = stats["ratio"]
    # max(−A·ρ, −A·clip(ρ)): t0 max(−1.5, −1.2) = −1.2; t1 max(−0.5, −0.8) = −0.5; t2 max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert ratio.item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    masked, _ = losses.policy_loss(new, old, advantages, torch.tensor([[1.0, 1.0, 0.0]]), 0.2, 0.2)
    assert masked.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_critic_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 5.0]])
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # t0: clip(1.0, 0.3, 0.7) = 0.7: max(1, 0.49) = 1.  t1: clip(0, 0.3, 0.7) = 0.3: max(1, 0.49) = 1.
    assert losses.value_loss(values, old, returns, mask, cliprange_value=0.2).item() == pytest.approx(0.5)
    returns = torch.tensor([[0.6, 0.5, 0.0]])
    # t0: max(0.16, 0.01) = 0.16.  t1: max(0.25, 0.04) = 0.25.
    assert losses.value_loss(values, old, returns, mask, cliprange_value=0.2).item() == pytest.approx(
        0.5 * (0.16 + 0.25) / 2
    )


def test_experience_splits_into_micro_batches():
    exp = Experience(*(torch.arange(10).view(5, 2) for _ in range(10)), torch.arange(5))
    parts = exp.split(2)
    assert [p.input_ids.shape[0] for p in parts] == [2, 2, 1]
    assert parts[2].scores.tolist() == [4]


def test_total_update_steps_follows_deepspeed_chat():
    section = PPO(
        per_device_generation_batch_size=16,
        per_device_training_batch_size=8,
        ppo_epochs=2,
        num_train_epochs=3,
        gradient_accumulation_steps=2,
    )
    assert total_update_steps(section, prompt_batches=10) == 3 * 10 * 2 * 2 // 2
