"""GPU smoke tests (`pytest -m gpu`): what the CPU suite cannot reach — fp16 with loss scaling, bf16, DeepSpeed's
CPU-offloaded Adam next to a GPU, the Hybrid Engine's generation, ZeRO-3 generation with synced ranks. Each runs
the tiny sample through the local backend on this machine's GPUs and skips without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from dschat_core.backend import FINISHED_MARKER

from ..stages.runs import config, metrics, run_stage

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.ranks,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def on_gpus(tmp_path, assets, gpus: int, *overrides: str):
    return config(tmp_path, assets, "topology.accelerator=cuda", f"topology.gpus_per_node={gpus}", *overrides)


def finite_losses(out, key: str = "train/loss") -> list[float]:
    losses = [m[key] for m in metrics(out) if key in m]
    assert losses and all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sft_in_half_precision_learns(tmp_path, assets, dtype):
    out, log = run_stage(on_gpus(tmp_path, assets, 1, f"sft.dtype={dtype}", "sft.max_steps=40"), "sft")
    losses = finite_losses(out)
    assert losses[-1] < losses[0] and (out / FINISHED_MARKER).exists()


def test_cpu_offloaded_adam_beside_the_gpu(tmp_path, assets):
    out, _ = run_stage(
        on_gpus(tmp_path, assets, 1, "sft.zero_stage=2", "sft.offload=true", "sft.dtype=bf16", "sft.max_steps=20"),
        "sft",
    )
    finite_losses(out)


@pytest.fixture
def stage_1_and_2(tmp_path, assets):
    actor, _ = run_stage(on_gpus(tmp_path, assets, 1, "sft.max_steps=40"), "sft")
    reward, _ = run_stage(on_gpus(tmp_path, assets, 1, "reward.max_steps=40"), "reward")
    return actor, reward


def ppo_on_gpus(tmp_path, assets, gpus: int, stage_1_and_2, *overrides: str):
    actor, reward = stage_1_and_2
    cfg = on_gpus(
        tmp_path,
        assets,
        gpus,
        f"ppo.actor_model_name_or_path={actor}",
        f"ppo.critic_model_name_or_path={reward}",
        "ppo.max_steps=8",
        *overrides,
    )
    out, _ = run_stage(cfg, "ppo")
    finite_losses(out, "train/actor_loss")


def test_hybrid_engine_generation(tmp_path, assets, stage_1_and_2):
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:  # refused before launch: tests/stages/test_rl_engines.py
        pytest.skip("DeepSpeed's Hybrid Engine kernels are written for transformers 4")
    ppo_on_gpus(tmp_path, assets, 1, stage_1_and_2, "ppo.enable_hybrid_engine=true")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_zero3_generation_keeps_ranks_in_step(tmp_path, assets, stage_1_and_2):
    ppo_on_gpus(tmp_path, assets, 2, stage_1_and_2, "ppo.actor_zero_stage=3")
