from __future__ import annotations

import json
from pathlib import Path

import pytest
from filelock import FileLock

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
def cpu_sample_run(request, tmp_path_factory, assets):
    """`--stage all` on the CPU sample (stage 1, stage 2, then PPO on their outputs), trained once per test
    session: test_ppo checks it, and its stage-1 model is where test_dpo's DPO, test_rl's GRPO and test_bf16's
    stages start (the GRPO sample's stage 1 has the same data and settings). Under pytest-xdist the workers share
    it: the first to need it trains it in the session's folder while the others wait. Read-only: tests write their
    runs elsewhere."""
    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        return _train_cpu_sample(tmp_path_factory.mktemp("cpu-sample"), assets)
    root = tmp_path_factory.getbasetemp().parent / "cpu-sample"  # this session's, above every worker's own
    done = root / "outputs.json"
    with FileLock(f"{root}.lock", timeout=1800):
        if not done.exists():
            outputs = _train_cpu_sample(root, assets)
            done.write_text(json.dumps({stage: str(path) for stage, path in outputs.items()}))
    return {stage: Path(path) for stage, path in json.loads(done.read_text()).items()}


def _train_cpu_sample(root: Path, assets: dict[str, Path]) -> dict[str, Path]:
    outputs = run_all(config(root, assets))
    assert list(outputs) == ["sft", "reward", "ppo"]
    return outputs
