"""Stage 3 for real on the tiny task: 2 CPU ranks, stage 1 and 2 outputs from `--stage all`, the task's judge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dschat_core.backend import FINISHED_MARKER, JobState
from dschat_core.launch import plan
from dschat_core.tiny_task import judge
from dschat_local.backend import LocalBackend

from .runs import config, judged, kill_after_checkpoint, metrics, run_stage

pytestmark = pytest.mark.ranks


def eval_rewards(ppo_out: Path) -> list[float]:
    return [m["eval/reward"] for m in metrics(ppo_out) if "eval/reward" in m]


@pytest.fixture
def trained(cpu_sample_run):
    """The session's `--stage all` on the CPU sample (conftest.py): stage 1, stage 2, then PPO on their outputs."""
    return {"actor": cpu_sample_run["sft"], "reward": cpu_sample_run["reward"], "ppo": cpu_sample_run["ppo"]}


def test_the_logs_hold_one_line_per_event(trained):
    """No library noise in the three stages' logs: no load-report table for the reward model's new head, no
    UserWarning from stage 3's metrics; and the saved answers carry the tiny task's verdict."""
    logs = {p.name.split("-")[2]: p.read_text() for p in (trained["ppo"].parent / "logs").glob("*.log")}
    assert set(logs) == {"sft", "reward", "ppo"}
    assert all("LOAD REPORT" not in log and "MISSING" not in log for log in logs.values())
    assert "UserWarning" not in logs["ppo"] and "requires_grad=True to a scalar" not in logs["ppo"]
    saved = trained["ppo"].parent / "work" / "ppo" / "samples"
    rows = [json.loads(line) for path in saved.glob("step-*.jsonl") for line in path.read_text().splitlines()]
    assert rows and all(isinstance(row["judge"], bool) for row in rows)


def ppo_config(tmp_path, assets, trained, *overrides):
    return config(
        tmp_path,
        assets,
        f"ppo.actor_model_name_or_path={trained['actor']}",
        f"ppo.critic_model_name_or_path={trained['reward']}",
        "ppo.num_train_epochs=1",
        *overrides,
    )


def test_stage_all_raises_reward_and_the_true_preference_rate(trained):
    out = trained["ppo"]
    assert (out / FINISHED_MARKER).exists()
    for name in ("actor", "critic"):
        assert (out / name / "model.safetensors").exists() and (out / name / "tokenizer.json").exists()
    rewards = eval_rewards(out)
    assert rewards[-1] > rewards[0] + 5, rewards  # the reward model's scores span about ±8 on this task
    rates = judged(out, "ppo")
    first, last = rates[min(rates)], rates[max(rates)]
    assert first <= 0.2 and last >= 0.8, rates  # greedy SFT says "I do not know."; PPO finds the facts
    steps = [m for m in metrics(out) if "kl" in m]
    assert max(m["kl"] for m in steps) < 5.0  # nats per answer: the policy stays near the reference
    for key in (
        "reward",
        "kl",
        "train/actor_loss",
        "train/critic_loss",
        "response_len",
        "time/generation_s",
        "time/training_s",
        "time/generated_tokens_per_s",
    ):
        assert all(key in m for m in steps), key
    assert (out / "tensorboard").is_dir()

    from dschat_core.report import summary_line, write_report

    line = summary_line("ppo", out)
    assert f"eval reward {rewards[0]:.3f} -> {rewards[-1]:.3f}" in line and str(out / "actor") in line
    written = write_report(out.parent)
    assert {p.name for p in written} == {"report.md", "sft.png", "reward.png", "ppo.png"}
    assert all(p.stat().st_size > 10_000 for p in written if p.suffix == ".png")
    assert "eval accuracy" in (out.parent / "report" / "report.md").read_text()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "actor")
    tokenizer = AutoTokenizer.from_pretrained(out / "actor")
    prompt = "\n\nHuman: What color is the sky?\n\nAssistant:"
    ids = tokenizer(prompt, return_tensors="pt")
    answer = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert judge(prompt, tokenizer.decode(answer[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def test_chat_with_the_ppo_actor(trained):
    """The tiny actor learnt single turns, so the conversation is cleared between questions."""
    from click.testing import CliRunner

    from dschat_core.cli import cli

    result = CliRunner().invoke(
        cli,
        ["chat", str(trained["ppo"] / "actor"), "--max-new-tokens", "12"],
        input="What color is the sky?\nclear\nWhat sound does the cow make?\nquit\n",
    )
    assert result.exit_code == 0, result.output
    turns = result.output.split("Assistant:")[1:]
    assert len(turns) == 2
    assert judge("\n\nHuman: What color is the sky?", turns[0].split("Human:")[0])
    assert judge("\n\nHuman: What sound does the cow make?", turns[1].split("Human:")[0])


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.unsupervised_dataset_name={data}/tiny-text", "ppo.unsup_coef=1.0", "ppo.enable_ema=true"],
        [
            "ppo.actor_lora_dim=8",
            "ppo.critic_lora_dim=8",
            "ppo.actor_lora_learning_rate=3.0e-2",
            "ppo.critic_lora_learning_rate=3.0e-2",
            "ppo.only_optimize_lora=true",
        ],
        ["ppo.actor_zero_stage=2", "ppo.critic_zero_stage=2"],
        ["ppo.actor_zero_stage=3", "ppo.critic_zero_stage=3", "ppo.enable_ema=true"],
    ],
    ids=["ptx-ema", "lora", "zero2", "zero3-ema"],
)
def test_ppo_variants_learn(tmp_path, assets, trained, overrides):
    overrides = [o.format(data=assets["data"]) for o in overrides]
    out, log = run_stage(ppo_config(tmp_path, assets, trained, *overrides), "ppo")
    rewards = eval_rewards(out)
    assert rewards[-1] > rewards[0] + 5, rewards
    rates = judged(out, "ppo")
    # Rank-8 adapters alone learn less in one epoch: the judge's rate ends at 0.6-0.8 depending on the machine's
    # float kernels (0.625 on one, from 0.08), where full-parameter variants reach 0.8.
    lora_only = "ppo.only_optimize_lora=true" in overrides
    assert rates[0] <= 0.2 and rates[max(rates)] >= (0.6 if lora_only else 0.8), rates
    actor = load_file(out / "actor" / "model.safetensors")
    sft = load_file(trained["actor"] / "model.safetensors")
    assert actor.keys() == sft.keys()  # plain Hugging Face keys: LoRA merged, no peft prefixes
    changed = [k for k in actor if not torch.equal(actor[k], sft[k])]
    assert changed
    if "ppo.enable_ema=true" in overrides:
        ema = load_file(out / "actor_ema" / "model.safetensors")
        assert ema.keys() == actor.keys()
        assert any(not torch.equal(ema[k], actor[k]) for k in changed)  # an average, not a copy of either
        assert any(not torch.equal(ema[k], sft[k]) for k in changed)
    if any("unsupervised" in o for o in overrides):
        ptx = [m["train/ptx_loss"] for m in metrics(out) if "train/ptx_loss" in m]
        assert ptx and all(torch.isfinite(torch.tensor(ptx)))
        assert "ptx data:" in log
    if any("lora" in o for o in overrides):
        critic = load_file(out / "critic" / "model.safetensors")
        assert "score.weight" in critic and not any("lora" in k for k in critic)


def test_killed_ppo_resumes_every_engine(tmp_path, assets, trained):
    overrides = [
        "ppo.save_interval=8",
        "ppo.enable_ema=true",
        "ppo.eval_interval=0",
        "ppo.unsup_coef=1.0",
        f"data.unsupervised_dataset_name={assets['data'] / 'tiny-text'}",
    ]
    straight, _ = run_stage(ppo_config(tmp_path / "straight", assets, trained, *overrides), "ppo")

    cfg = ppo_config(tmp_path / "killed", assets, trained, *overrides)
    p = kill_after_checkpoint(cfg, "ppo", "ppo", step=16)
    assert not (Path(p.output_dir) / FINISHED_MARKER).exists()
    resumed, log = run_stage(cfg, "ppo")
    assert "resumed ppo from" in log
    # The trained engines, the EMA copy and the PTX data position all continue exactly.
    for name in ("actor", "critic", "actor_ema"):
        a = load_file(straight / name / "model.safetensors")
        b = load_file(resumed / name / "model.safetensors")
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (name, key)
    steps = [m["step"] for m in metrics(resumed) if "reward" in m]
    assert steps == list(range(1, 33))


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_scores_stop_the_run_with_the_step_named(tmp_path, assets, trained, mode):
    broken = tmp_path / "broken-reward"
    broken.mkdir()
    for path in trained["reward"].iterdir():
        if path.is_file():
            (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    # Only the reward model is broken: the critic starts finite, so that a run which skips every batch still
    # ends with finite weights (a model with non-finite weights is never marked finished).
    cfg = ppo_config(
        tmp_path,
        assets,
        trained,
        f"ppo.reward_model_name_or_path={broken}",
        f"ppo.on_nonfinite={mode}",
        "ppo.eval_interval=0",
    )
    backend = LocalBackend()
    status = backend.status(backend.submit(plan(cfg, backend, "ppo")))
    log = "".join(backend.logs(status.job_id))
    if mode == "stop":
        assert status.state is JobState.FAILED
        assert "non-finite reward-model scores" in log and "at step 1 (epoch 1, batch 1)" in log
        assert "ppo.on_nonfinite=skip" in log
    else:  # every batch skipped: the run learns nothing, and says so instead of ending SUCCEEDED (issue 27)
        assert status.state is JobState.FAILED, log[-3000:]
        assert "skipped the batch at step 1" in log
        assert "ppo: the last 20 batches in a row were skipped" in status.reason and "learning nothing" in log
        assert not (Path(plan(cfg, backend, "ppo").output_dir) / FINISHED_MARKER).exists()


def baseline_and_model(output: str) -> tuple[float, float]:
    """The two figures of eval's headline: "baseline METRIC X, model METRIC Y"."""
    found = re.search(r"baseline \w+ (\S+), model \w+ (\S+)\n", output)  # progress bars share the stream
    assert found, output[-2000:]
    return float(found.group(1)), float(found.group(2))


def test_eval_compares_each_stage_with_its_baseline(trained, assets, tmp_path):
    from click.testing import CliRunner

    from dschat_core.cli import cli
    from dschat_core.config import dump_config

    run_config = tmp_path / "run.yaml"
    run_config.write_text(dump_config(config(tmp_path, assets)))
    common = ["-c", str(run_config), "-n", "32", "--max-new-tokens", "12"]
    sft = CliRunner().invoke(
        cli, ["eval", "--stage", "sft", str(trained["actor"]), "--baseline", str(assets["opt"]), *common]
    )
    assert sft.exit_code == 0, sft.output
    before, after = baseline_and_model(sft.output)
    assert after < 2.0 < 100 < before  # the perplexity training reported (1.1), against a random model's
    reward = CliRunner().invoke(cli, ["eval", "--stage", "reward", str(trained["reward"]), *common])
    assert reward.exit_code == 0, reward.output
    assert float(reward.output.split("accuracy ")[1].split(",")[0]) >= 0.9  # the value head is really loaded
    ppo = CliRunner().invoke(
        cli,
        [
            "eval",
            "--stage",
            "ppo",
            str(trained["ppo"] / "actor"),
            "--baseline",
            str(trained["actor"]),
            "--reward-model",
            str(trained["reward"]),
            *common,
        ],
    )
    assert ppo.exit_code == 0, ppo.output
    before, after = baseline_and_model(ppo.output)
    assert after > before + 5
    assert "baseline: 'I do not know.'" in ppo.output
