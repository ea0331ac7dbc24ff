"""The three pipelines on conversational data, for real (2 CPU ranks): samples/tiny-cpu-chat.yaml (SFT on
multi-turn conversations, reward model and PPO on conversational pairs; DPO on the same pairs) and
samples/tiny-cpu-chat-grpo.yaml (GRPO on conversational prompts with reference answers), every prompt rendered
through the tiny model's chat template, meet the text samples' thresholds; `chat` keeps its history in the
template. Stage 1 is trained once and shared: the GRPO sample's stage 1 is the same (the same data and settings)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dschat_core.backend import FINISHED_MARKER
from dschat_core.cli import cli

from .runs import chat_config, judged, metrics, run_all, run_stage

pytestmark = pytest.mark.ranks


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets):
    """`--stage all` on the conversational sample: stage 1, stage 2, then PPO."""
    outputs = run_all(chat_config(tmp_path_factory.mktemp("chat"), assets, "tiny-cpu-chat.yaml"))
    assert list(outputs) == ["sft", "reward", "ppo"]
    return outputs


def test_rlhf_on_conversations_learns_the_facts(trained):
    sft_log = next((trained["ppo"].parent / "logs").glob("*-sft-*.log")).read_text()
    assert "conversational" not in sft_log or "malformed" not in sft_log
    reward = [m["eval/accuracy"] for m in metrics(trained["reward"]) if "eval/accuracy" in m]
    assert reward[-1] >= 0.85, reward
    rates = judged(trained["ppo"], "ppo")
    assert rates[min(rates)] <= 0.2 and rates[max(rates)] >= 0.8, rates
    prompts = [
        json.loads(line)["prompt"]
        for line in next((trained["ppo"].parent / "work" / "ppo" / "samples").glob("step-*.jsonl"))
        .read_text()
        .splitlines()
    ]
    assert any(p.count("Human:") == 2 for p in prompts)  # multi-turn prompts, rendered by the template


def test_dpo_on_conversational_pairs(trained, assets, tmp_path):
    cfg = chat_config(
        tmp_path, assets, "tiny-cpu-chat.yaml", "pipeline=dpo", f"dpo.model_name_or_path={trained['sft']}"
    )
    out, _ = run_stage(cfg, "dpo")
    assert (out / FINISHED_MARKER).exists()
    rates = judged(out, "dpo")
    assert rates[min(rates)] <= 0.2 and rates[max(rates)] >= 0.8, rates
    accuracy = [m["eval/rewards/accuracies"] for m in metrics(out) if "eval/rewards/accuracies" in m]
    assert accuracy[-1] >= 0.85, accuracy


def test_grpo_on_conversational_prompts(trained, assets, tmp_path):
    cfg = chat_config(tmp_path, assets, "tiny-cpu-chat-grpo.yaml", f"ppo.actor_model_name_or_path={trained['sft']}")
    out, _ = run_stage(cfg, "ppo")
    acc = [m["eval/accuracy"] for m in metrics(out) if "eval/accuracy" in m]
    assert acc[0] <= 0.3 and acc[-1] >= 0.8, acc


def test_chat_keeps_its_history_in_the_template(trained):
    """Two questions without `clear`: the second answer is the actor's greedy answer to the whole conversation so
    far rendered by the chat template (the first exchange included), as training rendered conversations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    actor = trained["ppo"] / "actor"
    questions = ["What sound does the cow make?", "What color is the grass?"]
    result = CliRunner().invoke(
        cli, ["chat", str(actor), "--max-new-tokens", "12"], input="\n".join(questions) + "\nquit\n"
    )
    assert result.exit_code == 0, result.output
    assert "the tokenizer's chat template" in result.output
    answers = [turn.split("Human:")[0].strip() for turn in result.output.split("Assistant:")[1:]]
    assert len(answers) == 2
    tokenizer, model = AutoTokenizer.from_pretrained(actor), AutoModelForCausalLM.from_pretrained(actor).eval()
    turns = [
        {"role": "user", "content": questions[0]},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": questions[1]},
    ]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert prompt.count("Human:") == 2
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip() == answers[1]
