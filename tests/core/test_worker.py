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


def test_a_rank_loads_deepspeed_without_mlflow_and_exits_as_python_would(tmp_path):
    """DeepSpeed's autotuner would import mlflow (1.2-1.5 s of each rank's start); the mlflow sink still can. The
    short exit waits for threads, runs atexit handlers and keeps the exit code and the output."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, sys, threading, time\n"
        "from dschat_core.worker import exit_without_teardown, import_deepspeed\n"
        "import_deepspeed()\n"
        "print('deepspeed loaded', 'deepspeed' in sys.modules, 'mlflow' in sys.modules)\n"
        "import mlflow\n"
        "print('mlflow importable', mlflow.__name__)\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()\n"
        "atexit.register(lambda: print('atexit ran', flush=False))\n"
        "sys.stdout.write('unflushed')\n"
        "exit_without_teardown(3)\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # as prepare_environment() sets it: no warning that it guessed
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "deepspeed loaded True False",
        "mlflow importable mlflow",
        "unflushedthread done",
        "atexit ran",
    ]
