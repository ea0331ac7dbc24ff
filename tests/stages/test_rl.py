"""Stage 3 beyond PPO for real (2 CPU ranks): the rl pipeline of samples/tiny-cpu-grpo.yaml (SFT, then GRPO scored
by normalised match against reference answers), RLOO and REINFORCE++, no reference without KL, resume, and reward
functions that fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dschat_core.backend import FINISHED_MARKER, JobState
from dschat_core.launch import plan, stages_of
from dschat_local.backend import LocalBackend

from .runs import docs_plugin, grpo_config, judged, kill_after_checkpoint, metrics, run_stage

pytestmark = pytest.mark.ranks


def accuracies(out: Path) -> list[float]:
    return [m["eval/accuracy"] for m in metrics(out) if "eval/accuracy" in m]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets, cpu_sample_run):
    """The GRPO sample's pipeline is sft, then ppo (grpo) — no reward model stage. Its stage 1 has the CPU sample's
    data and settings: the session's (conftest.py) is used; GRPO runs here."""
    root = tmp_path_factory.mktemp("grpo")
    cfg = grpo_config(root, assets, f"ppo.actor_model_name_or_path={cpu_sample_run['sft']}")
    assert stages_of("all", cfg) == ("sft", "ppo")
    ppo, _ = run_stage(cfg, "ppo")
    return {"root": root, "actor": cpu_sample_run["sft"], "ppo": ppo}


def stage_3(tmp_path, assets, trained, *overrides):
    return grpo_config(tmp_path, assets, f"ppo.actor_model_name_or_path={trained['actor']}", *overrides)


def test_grpo_with_a_verifier_raises_greedy_accuracy(trained):
    out = trained["ppo"]
    assert (out / FINISHED_MARKER).exists() and (out / "actor" / "model.safetensors").exists()
    assert not (out / "critic").exists() and not (trained["root"] / "runs" / "tiny-cpu-grpo" / "reward").exists()
    summary = json.loads((out / FINISHED_MARKER).read_text())
    assert summary["algorithm"] == "grpo" and summary["engines"] == ["actor", "reference"]
    acc = accuracies(out)
    assert acc[0] <= 0.3 and acc[-1] >= 0.8, acc
    rates = judged(out, "ppo")  # the ground truth agrees with the verifier
    assert rates[min(rates)] <= 0.3 and rates[max(rates)] >= 0.8, rates
    steps = [m for m in metrics(out) if "reward" in m and "train/actor_loss" in m]
    assert max(m["kl"] for m in steps) < 5.0  # nats per answer: the policy stays near the reference
    for key in (
        "reward_std",
        "reward/normalized_match",
        "zero_variance_frac",
        "train/clip_low",
        "train/clip_high",
        "train/entropy",
        "train/kl_loss",
        "truncated_frac",
        "response_len",
        "time/generation_s",
    ):
        assert all(key in m for m in steps), key


@pytest.mark.parametrize("algorithm", ["rloo", "reinforce_pp"])
def test_rloo_and_reinforce_pp_learn_without_a_critic(tmp_path, assets, trained, algorithm):
    out, log = run_stage(stage_3(tmp_path, assets, trained, f"ppo.algorithm={algorithm}"), "ppo")
    acc = accuracies(out)
    assert acc[-1] >= acc[0] + 0.5, acc
    assert json.loads((out / FINISHED_MARKER).read_text())["engines"] == ["actor", "reference"]
    assert f"stage ppo ({algorithm})" in log


def test_killed_grpo_resumes_to_the_same_weights(tmp_path, assets, trained):
    overrides = [
        "ppo.max_steps=16",
        "ppo.save_interval=4",
        "ppo.eval_interval=0",
        "ppo.dynamic_sampling=true",
        "ppo.clip_high=0.28",
        "ppo.overlong=penalty",
        "ppo.group_by_length=true",  # prompts and micro-batches by length: the same on a resumed run
    ]
    straight, _ = run_stage(stage_3(tmp_path / "straight", assets, trained, *overrides), "ppo")
    cfg = stage_3(tmp_path / "killed", assets, trained, *overrides)
    p = kill_after_checkpoint(cfg, "ppo", "ppo", step=8)
    assert not (Path(p.output_dir) / FINISHED_MARKER).exists()
    resumed, log = run_stage(cfg, "ppo")
    assert "resumed ppo from" in log
    a, b = load_file(straight / "actor" / "model.safetensors"), load_file(resumed / "actor" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert [m["step"] for m in metrics(resumed) if "reward" in m and "train/actor_loss" in m] == list(range(1, 17))
    assert any("sampling/dropped_groups" in m for m in metrics(resumed))


PLUGIN = """
import math
import time

from dschat_core.hookspecs import hookimpl
from dschat_core.rewards import RewardFunction


@hookimpl
def register_reward_functions(register):
    register(RewardFunction("boom", lambda prompt, answer, row: 1 / 0, "always raises"))
    register(RewardFunction("nan_reward", lambda prompt, answer, row: math.nan, "always NaN"))
    register(RewardFunction("sleepy", lambda prompt, answer, row: time.sleep(3600), "never returns"))
"""


@pytest.fixture
def broken_rewards(tmp_path, monkeypatch, register):
    """A plugin package with two broken reward functions, installed where the ranks find it."""
    package = tmp_path / "broken-rewards"
    package.mkdir()
    (package / "broken_rewards.py").write_text(PLUGIN)
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "broken-rewards"\nversion = "0.1"\n'
        '[project.entry-points.dschat]\nbroken = "broken_rewards"\n[tool.setuptools]\npy-modules = ["broken_rewards"]\n'
    )
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("DSCHAT_PLUGINS", "broken")
    monkeypatch.syspath_prepend(str(site))
    import broken_rewards

    register(broken_rewards, "broken")


@pytest.mark.parametrize(
    ("name", "said"),
    [("boom", "raised ZeroDivisionError"), ("nan_reward", "returned nan"), ("sleepy", "did not return within 2 s")],
)
def test_a_reward_function_that_fails_stops_the_run_naming_it(tmp_path, assets, trained, broken_rewards, name, said):
    """Raising, NaN, or never returning (a stuck call: stopped after ppo.reward_function_timeout, not hung)."""
    overrides = [f"ppo.reward_functions={{{name}: 1.0}}", "ppo.eval_before_training=false"]
    cfg = stage_3(tmp_path, assets, trained, *overrides, "ppo.reward_function_timeout=2")
    backend = LocalBackend()
    p = plan(cfg, backend, "ppo")
    status = backend.status(backend.submit(p))
    log = "".join(backend.logs(status.job_id))
    assert status.state is JobState.FAILED
    assert f"reward function '{name}' {said}" in log and "on sample 0 of rank" in log
    assert "at step 1 (epoch 1, batch 1)" in log and "ppo.on_nonfinite=skip" in log
    fix = "raise ppo.reward_function_timeout" if name == "sleepy" else "make the reward function return a finite"
    assert fix in log and "lower the learning rate" not in log
    assert not (Path(p.output_dir) / FINISHED_MARKER).exists()


def test_the_reward_plugin_of_the_docs_trains_and_without_kl_no_reference_is_built(
    tmp_path, assets, trained, monkeypatch, register
):
    """docs/rewards.md's package, installed from the page: listed with its package and settings, and trained with
    (its verifier gives eval/accuracy, its setting reaches the function); the run has ``kl_coef: 0``, so no
    reference engine."""
    rows = docs_plugin("rewards.md", "dschat_brevity", "brevity", tmp_path, "rewards", monkeypatch, register)
    assert rows["brevity"][1:4] == ["reward", "dschat-brevity 0.1.0", "settings: max_words=8"], rows
    assert rows["mentions_reference"][1] == "verifier"

    reward_functions = "{mentions_reference: 1.0, brevity: {weight: 0.1, max_words: 6}}"
    overrides = [f"ppo.reward_functions={reward_functions}", "ppo.max_steps=2", "ppo.kl_coef=0"]
    out, log = run_stage(stage_3(tmp_path, assets, trained, *overrides), "ppo")
    assert json.loads((out / FINISHED_MARKER).read_text())["engines"] == ["actor"]
    assert "engines: actor;" in log
    steps = [m for m in metrics(out) if "reward/brevity" in m]
    assert steps and all(0.0 <= m["reward/brevity"] <= 1.0 for m in steps)
    assert all("reward/mentions_reference" in m for m in steps)
    assert any("eval/accuracy" in m for m in metrics(out))


@pytest.mark.parametrize("dynamic_sampling", [True, False])
def test_a_run_whose_rewards_carry_no_signal_stops_instead_of_succeeding(tmp_path, assets, trained, dynamic_sampling):
    """A reward no answer can earn: every group flat, every step (dynamic sampling drops them all). Such a run used
    to end SUCCEEDED with an untouched model; it stops after ppo.max_steps_without_signal steps, exit 2, one line."""
    cfg = stage_3(
        tmp_path,
        assets,
        trained,
        "ppo.reward_functions={regex: {weight: 1.0, pattern: '^ZZZZ$'}}",
        f"ppo.dynamic_sampling={str(dynamic_sampling).lower()}",
        "ppo.max_steps_without_signal=3",
        "ppo.eval_before_training=false",
    )
    backend = LocalBackend()
    p = plan(cfg, backend, "ppo")
    status = backend.status(backend.submit(p))
    assert status.state is JobState.FAILED and status.exit_code == 2, status.describe()
    assert "ppo: no learning signal for 3 steps in a row" in status.reason
    said = "dynamic sampling dropped every group" if dynamic_sampling else "every group's answers were rewarded alike"
    assert said in status.reason and "ppo.max_steps_without_signal=0" in status.reason
    assert not (Path(p.output_dir) / FINISHED_MARKER).exists()
