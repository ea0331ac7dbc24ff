"""The shipped CPU sample is exactly what the project's own commands produce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dschat_core.config import load_config
from dschat_core.models import init_tiny
from dschat_core.tiny_task import judge, write_sample
from dschat_core.tiny_tools import init_model as init_tools_model
from dschat_core.tiny_tools import write_sample as write_tools_sample

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-tools-opt"])
def test_tiny_models_are_current(tmp_path, name):
    """`model init-tiny` (`--tools` for the tools task's model) writes the shipped folders: weights, tokenizer
    (the tools one with the calculator's markup as single tokens) and chat template."""
    fresh = init_tools_model(tmp_path / name) if "tools" in name else init_tiny("opt", tmp_path / name)
    shipped = SAMPLES / "models" / name
    assert json.loads((fresh / "config.json").read_text()) == json.loads((shipped / "config.json").read_text())
    for file in ("tokenizer.json", "chat_template.jinja"):
        assert (fresh / file).read_text() == (shipped / file).read_text(), file
    a, b = load_file(fresh / "model.safetensors"), load_file(shipped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_data_is_current(tmp_path):
    write_sample(tmp_path)
    write_tools_sample(tmp_path)
    for path in (SAMPLES / "data").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / path.relative_to(SAMPLES / "data")).read_bytes(), path


def test_tiny_data_has_a_learnable_signal_and_headroom():
    rows = [json.loads(line) for line in (SAMPLES / "data" / "tiny-prefs" / "train.jsonl").read_text().splitlines()]
    assert all(judge(r["prompt"], r["chosen"]) and not judge(r["prompt"], r["rejected"]) for r in rows)
    demos = [json.loads(line) for line in (SAMPLES / "data" / "tiny-sft" / "train.jsonl").read_text().splitlines()]
    good = sum(judge(r["prompt"], r["chosen"]) for r in demos) / len(demos)
    assert 0.3 < good < 0.5  # SFT alone cannot reach the ceiling
    # The rest is one curt reply: the SFT model's greedy answer, which sampling escapes.
    assert {r["chosen"] for r in demos if not judge(r["prompt"], r["chosen"])} == {" I do not know."}
    texts = [json.loads(line) for line in (SAMPLES / "data" / "tiny-text" / "train.jsonl").read_text().splitlines()]
    sentences = [s.strip() for t in texts for s in t["text"].split(".") if s.strip()]
    for sentence in sentences:  # the PTX text states only true facts
        _, subject, verb, _ = sentence.split()
        question = f"What color is the {subject}?" if verb == "is" else f"What sound does the {subject} make?"
        assert judge(f"\n\nHuman: {question}", sentence), sentence


def test_sample_configs_validate():
    for path in SAMPLES.glob("*.yaml"):
        load_config(path)


def _gpu_samples(pipeline: str) -> list[Path]:
    return sorted(p for p in (SAMPLES / "gpu").glob("*.yaml") if load_config(p).pipeline == pipeline)


@pytest.mark.parametrize("path", _gpu_samples("rlhf"), ids=lambda p: p.stem)
def test_gpu_samples_validate_and_plan(path, register):
    """The seed's sizes and topologies: valid configs that plan for a cluster (the GPUs are not here)."""
    from dschat_core.launch import plan
    from dschat_slurm import plugin as slurm_plugin

    register(slurm_plugin, "slurm")
    config = load_config(path, ["storage.root=/shared/dschat"])
    assert config.topology.accelerator == "cuda"
    backend = slurm_plugin.SlurmBackend()
    for stage in ("sft", "reward", "ppo"):
        p = plan(config, backend, stage, chained=True)
        script = backend.render(p)
        assert f"--gpus-per-node={config.topology.gpus_per_node}" in script
        assert f"--nodes={config.topology.nodes}" in script


@pytest.mark.parametrize("path", _gpu_samples("rl") + _gpu_samples("dpo"), ids=lambda p: p.stem)
def test_gpu_samples_of_the_other_pipelines_plan_on_slurm_and_t9k(path, register):
    """GRPO on GSM8K (and any DPO sample): its whole pipeline plans on Slurm and on T9K (the GPUs are not here)."""
    from dschat_core.config import PIPELINES
    from dschat_core.launch import plan
    from dschat_slurm import plugin as slurm_plugin
    from dschat_t9k import plugin as t9k_plugin

    register(slurm_plugin, "slurm")
    register(t9k_plugin, "t9k")
    slurm = slurm_plugin.SlurmBackend()
    t9k = t9k_plugin.T9kBackend()
    config = load_config(path, ["storage.root=/shared/dschat"])
    t9k_config = load_config(path, ["backends.t9k.image=dschat:test"])
    for stage in PIPELINES[config.pipeline]:
        script = slurm.render(plan(config, slurm, stage, chained=True))
        assert f"--gpus-per-node={config.topology.gpus_per_node}" in script and f"worker {stage}" in script
        manifest = t9k.manifest(plan(t9k_config, t9k, stage, chained=True))
        assert manifest["spec"]["config"]["slotsPerWorker"] == config.topology.gpus_per_node
    if config.pipeline == "rl":
        assert config.ppo.reward_functions and not config.ppo.needs_critic
