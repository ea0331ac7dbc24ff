"""The worker entry point, run as each rank would run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dschat_core.errors import EXIT_BAD_INPUT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stage_without_config_is_bad_input():
    result = subprocess.run([sys.executable, "-m", "dschat_core.worker", "sft"], capture_output=True, text=True)
    assert result.returncode == EXIT_BAD_INPUT
    assert "needs --config" in result.stderr


def test_bad_config_file_is_bad_input(tmp_path):
    path = tmp_path / "resolved.yaml"
    path.write_text("sft:\n  zero_stage: 9\n")
    result = subprocess.run(
        [sys.executable, "-m", "dschat_core.worker", "sft", "--config", str(path)], capture_output=True, text=True
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert "sft.zero_stage" in result.stderr


@pytest.mark.ranks
def test_preflight_single_rank_with_deepspeed_launcher_argument():
    """One rank, the way the deepspeed launcher starts it (--local_rank), needing no config file."""
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "dschat_core.worker", "preflight", "--local_rank=0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world_size: 1" in result.stdout
    assert "all_reduce: ok (sum 1, expected 1)" in result.stdout
    assert "rank 0: host" in result.stdout
