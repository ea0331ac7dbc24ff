"""DPO for real (2 CPU ranks): `--set pipeline=dpo` on the CPU sample (SFT, then DPO on the stage-2 pairs), the
ground-truth judge on its greedy answers, precomputed against live reference log-probs, LoRA's adapters-off
reference, every loss, resume, and `dschat-core eval --stage dpo` against the figures training logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dschat_core.backend import FINISHED_MARKER
from dschat_core.launch import stages_of
from dschat_core.tiny_task import judge

from .runs import config, judged, kill_after_checkpoint, metrics, run_stage

pytestmark = pytest.mark.ranks


def eval_figures(out: Path, key: str) -> list[float]:
    return [m[key] for m in metrics(out) if key in m]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets, cpu_sample_run):
    """`--set pipeline=dpo` plans SFT, then DPO; stage 1 is the session's (conftest.py), DPO runs here."""
    root = tmp_path_factory.mktemp("dpo")
    cfg = config(root, assets, "pipeline=dpo", f"dpo.model_name_or_path={cpu_sample_run['sft']}")
    assert stages_of("all", cfg) == ("sft", "dpo")  # no reward model, no PPO
    dpo, _ = run_stage(cfg, "dpo")
    return {"root": root, "actor": cpu_sample_run["sft"], "dpo": dpo}


def dpo_config(tmp_path, assets, trained, *overrides):
    return config(tmp_path, assets, "pipeline=dpo", f"dpo.model_name_or_path={trained['actor']}", *overrides)


def test_dpo_after_sft_makes_the_greedy_answers_right(trained):
    out = trained["dpo"]
    assert (out / FINISHED_MARKER).exists() and (out / "tokenizer.json").exists()
    rates = judged(out, "dpo")
    assert rates[min(rates)] <= 0.2 and rates[max(rates)] >= 0.8, rates
    assert eval_figures(out, "eval/rewards/accuracies")[-1] >= 0.9
    for key in (
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/samples_per_s",
        "train/memory_gib",
    ):
        assert any(key in m for m in metrics(out)), key
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompt = "\n\nHuman: What sound does the cow make?\n\nAssistant:"
    ids = tokenizer(prompt, return_tensors="pt")
    answer = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert judge(prompt, tokenizer.decode(answer[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))

    from dschat_core.report import summary_line

    assert summary_line("dpo", out).startswith("dpo: eval accuracy 0.500 -> ")  # at step 0 every pair ties: half


def test_precomputed_reference_log_probs_give_the_live_loss_without_a_reference_engine(tmp_path, assets, trained):
    first = ["dpo.max_steps=1", "dpo.print_interval=1", "dpo.eval_samples=0"]
    live, _ = run_stage(dpo_config(tmp_path / "live", assets, trained, *first), "dpo")
    pre, log = run_stage(
        dpo_config(tmp_path / "pre", assets, trained, *first, "dpo.precompute_ref_logprobs=true"), "dpo"
    )
    assert "reference: precomputed log-probs (no reference engine in training)" in log
    assert "reference log-probs computed and cached" in log
    a, b = eval_figures(live, "train/loss"), eval_figures(pre, "train/loss")
    assert abs(a[0] - b[0]) < 1e-5, (a, b)
    assert json.loads((pre / FINISHED_MARKER).read_text())["reference"] == "precomputed"
    again, log = run_stage(
        dpo_config(tmp_path / "pre", assets, trained, *first, "dpo.precompute_ref_logprobs=true", "dpo.overwrite=true"),
        "dpo",
    )
    assert "reference log-probs from the cache" in log


def test_lora_uses_the_policy_without_its_adapters_as_the_reference(tmp_path, assets, trained):
    out, log = run_stage(
        dpo_config(
            tmp_path,
            assets,
            trained,
            "dpo.lora_dim=8",
            "dpo.only_optimize_lora=true",
            "dpo.lora_learning_rate=2.0e-2",
            "dpo.max_steps=16",
        ),
        "dpo",
    )
    assert "reference: the policy with its LoRA adapters off" in log
    assert eval_figures(out, "eval/rewards/accuracies")[-1] >= 0.8
    assert not any("lora" in key for key in load_file(out / "model.safetensors"))  # merged at the final save


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo", "orpo"])
def test_every_loss_learns_the_preferences(tmp_path, assets, trained, loss):
    extra = ["dpo.beta=2.0"] if loss == "simpo" else []
    extra += ["dpo.label_smoothing=0.1"] if loss == "robust" else []  # the losses that read it (and sigmoid)
    out, log = run_stage(
        dpo_config(tmp_path, assets, trained, f"dpo.loss={loss}", "dpo.max_steps=16", *extra),
        "dpo",
    )
    accuracy = eval_figures(out, "eval/rewards/accuracies")
    assert accuracy[-1] >= 0.85 and accuracy[-1] >= accuracy[0], accuracy
    rates = judged(out, "dpo")
    assert rates[max(rates)] >= 0.8, rates
    if loss in ("simpo", "orpo"):
        assert "reference: none (reference-free)" in log


def test_killed_dpo_resumes_to_the_same_weights(tmp_path, assets, trained):
    overrides = ["dpo.save_interval=8", "dpo.eval_interval=0", "dpo.eval_samples=0"]
    straight, _ = run_stage(dpo_config(tmp_path / "straight", assets, trained, *overrides), "dpo")
    cfg = dpo_config(tmp_path / "killed", assets, trained, *overrides)
    kill_after_checkpoint(cfg, "dpo", "dpo", step=8)
    resumed, log = run_stage(cfg, "dpo")
    assert "resumed dpo from" in log
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_eval_cli_gives_the_figures_training_logged(trained, assets, tmp_path):
    from click.testing import CliRunner

    from dschat_core.cli import cli
    from dschat_core.config import dump_config

    run_config = tmp_path / "run.yaml"
    run_config.write_text(dump_config(config(tmp_path, assets, "pipeline=dpo")))
    result = CliRunner().invoke(
        cli, ["eval", "--stage", "dpo", str(trained["dpo"]), "--baseline", str(trained["actor"]), "-c", str(run_config)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((trained["dpo"] / FINISHED_MARKER).read_text())
    accuracy = float(result.output.split("accuracy ")[1].split(",")[0])
    margin = float(result.output.split("margin ")[1].split(" ")[0])
    assert accuracy == pytest.approx(summary["eval/rewards/accuracies"], abs=1e-3)
    assert margin == pytest.approx(summary["eval/rewards/margins"], abs=1e-3)
    assert "baseline: 'I do not know.'" in result.output
