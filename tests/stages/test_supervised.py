"""Stages 1 and 2 for real: 2 CPU ranks under torchrun through the local backend, tiny models built offline."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dschat_core.backend import FINISHED_MARKER
from dschat_core.worker import extensions_dir

from .runs import config, metrics, resumed_and_straight, run_stage

pytestmark = pytest.mark.ranks


@pytest.mark.parametrize(
    "variant",
    [
        ("opt", ["sft.zero_stage=0"]),
        ("opt", ["sft.zero_stage=2", "sft.lora_dim=8", "sft.lora_learning_rate=1.0e-2"]),
        (
            "opt",
            [
                "sft.zero_stage=3",
                "sft.lora_dim=8",
                "sft.lora_learning_rate=5.0e-2",
                "sft.only_optimize_lora=true",
                "sft.gradient_checkpointing=true",
            ],
        ),
        ("llama", ["sft.zero_stage=0", "sft.dtype=bf16"]),
        ("llama", ["sft.zero_stage=2", "sft.offload=true", "sft.gradient_checkpointing=true"]),
        ("llama", ["sft.zero_stage=3", "sft.lora_module_name=layers."]),
    ],
    ids=[
        "opt-zero0",
        "opt-zero2-lora",
        "opt-zero3-lora-only-gradckpt",
        "llama-zero0-bf16",
        "llama-zero2-offload-gradckpt",
        "llama-zero3",
    ],
)
def test_sft_learns_saves_and_reloads(tmp_path, assets, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, overrides = variant
    cfg = config(tmp_path, assets, f"sft.model_name_or_path={assets[arch]}", "sft.num_train_epochs=2", *overrides)
    cpu_adam = Path(extensions_dir()) / "cpu_adam"  # what offload's optimizer builds on its first use here
    built_before = cpu_adam.is_dir() and any(cpu_adam.glob("*.so"))
    out, log = run_stage(cfg, "sft")
    said = "building DeepSpeed's CPU Adam op" in log
    assert said == ("sft.offload=true" in overrides and not built_before), log[-3000:]
    evals = [m["eval/perplexity"] for m in metrics(out) if "eval/perplexity" in m]
    # Before, and after each epoch. Adapters alone on a random model (frozen embeddings) learn slower.
    assert len(evals) == 3 and evals[-1] < evals[0] / (2 if "sft.only_optimize_lora=true" in overrides else 4), evals
    losses = [m["train/loss"] for m in metrics(out) if "train/loss" in m]
    assert losses[-1] < losses[0]
    assert "perplexity" in log
    # Library warnings once per rank at most (ZeRO 3 used to repeat the same FutureWarnings every step).
    warned = Counter(line for line in log.splitlines() if "Warning:" in line)
    assert not warned or max(warned.values()) <= 2, warned.most_common(1)
    assert (out / FINISHED_MARKER).exists() and (out / "model.safetensors").exists()
    assert not any("lora" in key for key in load_file(out / "model.safetensors"))  # merged at the final save
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("\n\nHuman: What color is the sky?\n\nAssistant:", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_reward_model_reaches_accuracy(tmp_path, assets):
    from transformers import AutoModelForSequenceClassification

    out, log = run_stage(config(tmp_path, assets), "reward")
    final = [m for m in metrics(out) if "eval/accuracy" in m][-1]
    assert final["eval/accuracy"] >= 0.9, log[-3000:]
    assert final["eval/chosen_score"] > final["eval/rejected_score"]
    # A standard Hugging Face folder: loads with its value head, whatever the shard layout.
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.score.weight.abs().sum() > 0

    # On a cluster only the workers see the output folder: they refuse to overwrite a finished model too.
    resolved = out.parent / "configs" / "reward.yaml"
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    worker = subprocess.run(
        [sys.executable, "-m", "dschat_core.worker", "reward", "--config", str(resolved)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert worker.returncode == 2 and "holds a finished model already" in worker.stderr


def test_killed_run_resumes_to_the_same_weights(tmp_path, assets):
    # Length-grouped batches: the resumed run must draw the same micro-batches from the same position.
    overrides = ["sft.num_train_epochs=2", "sft.save_interval=6", "sft.keep_last=2", "sft.group_by_length=true"]
    straight, resumed, _ = resumed_and_straight(tmp_path, lambda root: config(root, assets, *overrides), step=12)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    steps = [m["step"] for m in metrics(resumed) if "train/loss" in m]
    assert steps == sorted(set(steps))  # no duplicated points after the resume


def test_a_compiled_model_trains_with_the_eager_losses(tmp_path, assets):
    """``sft.compile``: the same losses step by step as the eager model (fp32; inductor may reorder float sums)."""
    short = ["sft.max_steps=4", "sft.print_interval=1", "sft.eval_before_training=false"]
    eager, _ = run_stage(config(tmp_path / "eager", assets, *short), "sft")
    compiled, _ = run_stage(config(tmp_path / "compiled", assets, *short, "sft.compile=true"), "sft")

    def losses(out: Path) -> list[float]:
        return [m["train/loss"] for m in metrics(out) if "train/loss" in m]

    assert len(losses(eager)) == 4
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-4)
