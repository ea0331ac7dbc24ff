"""GRPO with ``rollout_engine: vllm`` for real (2 CPU ranks, an engine in each beside its DeepSpeed engines): the
tiny question-answer task of samples/tiny-cpu-grpo.yaml learned as on the hf engine, and a run killed with SIGKILL
resumes to the weights of the run never killed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dschat_core.backend import FINISHED_MARKER
from dschat_core.tiny_task import judge

from ..stages.runs import grpo_config, kill_after_checkpoint, metrics, run_stage

pytestmark = pytest.mark.ranks


@pytest.fixture(scope="module")
def actor(tmp_path_factory, wide_heads) -> Path:
    """Stage 1 of the GRPO sample on the 32-wide-head OPT."""
    out, _ = run_stage(grpo_config(tmp_path_factory.mktemp("sft"), wide_heads), "sft")
    return out


def on_vllm(root: Path, assets: dict, actor: Path, *overrides: str):
    return grpo_config(root, assets, f"ppo.actor_model_name_or_path={actor}", "ppo.rollout_engine=vllm", *overrides)


def test_grpo_on_vllm_raises_greedy_accuracy(tmp_path, wide_heads, actor):
    out, log = run_stage(on_vllm(tmp_path, wide_heads, actor), "ppo")
    assert "rollout engine vllm" in log
    evals = [m for m in metrics(out) if "eval/accuracy" in m]
    acc = [m["eval/accuracy"] for m in evals]
    assert acc[0] <= 0.3 and acc[-1] >= 0.8, acc
    samples = out.parent / "work" / "ppo" / "samples"
    rates = {}
    for path in samples.glob("step-*.jsonl"):  # the task's own judge on the saved greedy answers agrees
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rates[int(path.stem.split("-")[1])] = sum(judge(r["prompt"], r["answer"]) for r in rows) / len(rows)
    assert rates[min(rates)] <= 0.3 and rates[max(rates)] >= 0.8, rates
    steps = [m for m in metrics(out) if "train/actor_loss" in m]
    # The engine's log-probs are the trainer's up to kernels (both fp32): the correction's ratios stay near 1.
    assert all(0.98 < m["rollout_correction/ratio_mean"] < 1.02 for m in steps), [
        m["rollout_correction/ratio_mean"] for m in steps
    ]
    assert all(m["rollout_correction/capped_frac"] < 0.01 for m in steps)
    assert all(m["time/sync_s"] > 0 for m in steps)


def test_a_killed_vllm_run_under_zero_3_resumes_to_the_same_weights(tmp_path, wide_heads, actor):
    """Resume on vLLM: the checkpoint restores the actor, optimizer, data position and RNG states; the engine is
    synced to the restored actor (under ZeRO-3 each parameter gathered) and samples each batch from the batch's
    own seed, so the resumed run ends with the weights of the run never killed."""
    overrides = ["ppo.max_steps=12", "ppo.save_interval=4", "ppo.eval_interval=0", "ppo.actor_zero_stage=3"]
    straight, _ = run_stage(on_vllm(tmp_path / "straight", wide_heads, actor, *overrides), "ppo")
    cfg = on_vllm(tmp_path / "killed", wide_heads, actor, *overrides)
    p = kill_after_checkpoint(cfg, "ppo", "ppo", step=4)
    assert not (Path(p.output_dir) / FINISHED_MARKER).exists()
    resumed, log = run_stage(cfg, "ppo")
    assert "resumed ppo from" in log
    assert [m["step"] for m in metrics(resumed) if "train/actor_loss" in m] == list(range(1, 13))
    a, b = load_file(straight / "actor" / "model.safetensors"), load_file(resumed / "actor" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    steps = [m for m in metrics(resumed) if "train/actor_loss" in m]
    assert all(0.98 < m["rollout_correction/ratio_mean"] < 1.02 for m in steps)
