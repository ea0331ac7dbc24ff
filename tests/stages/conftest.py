from __future__ import annotations

import pytest

from dschat_core.models import init_tiny
from dschat_core.tiny_task import write_sample

from .runs import config, run_all


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tiny random models of real architectures and the tiny task's data, built offline."""
    root = tmp_path_factory.mktemp("assets")
    return {
        "opt": init_tiny("opt", root / "tiny-opt"),
        "llama": init_tiny("llama", root / "tiny-llama"),
        "data": write_sample(root / "data"),
    }


@pytest.fixture(scope="session")
def cpu_sample_run(tmp_path_factory, assets):
    """`--stage all` on the CPU sample (stage 1, stage 2, then PPO on their outputs), trained once per session:
    test_ppo checks it, and the stage-1 model is where test_dpo's DPO, test_rl's GRPO and test_bf16's stages start
    (the GRPO sample's stage 1 has the same data and settings). Read-only: tests write their runs elsewhere."""
    cfg = config(tmp_path_factory.mktemp("cpu-sample"), assets)
    outputs = run_all(cfg)
    assert list(outputs) == ["sft", "reward", "ppo"]
    return outputs
