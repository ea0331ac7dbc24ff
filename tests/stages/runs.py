"""Running stages for real in tests: 2 CPU ranks under torchrun through the local backend."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from dschat_core.backend import FINISHED_MARKER, JobState, LaunchPlan, state_dir
from dschat_core.config import RunConfig, load_config
from dschat_core.launch import final_status, plan, submit_stages
from dschat_core.tiny_task import judge
from dschat_local.backend import LocalBackend

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, assets: dict[str, Path], *overrides: str) -> RunConfig:
    """The shipped CPU sample, on the test's own copies of the tiny model and data."""
    return load_config(
        REPO / "samples" / "tiny-cpu.yaml",
        [
            f"storage.root={tmp_path}",
            f"data.data_path=[{assets['data'] / 'tiny-prefs'}]",
            f"data.sft_only_data_path=[{assets['data'] / 'tiny-sft'}]",
            f"sft.model_name_or_path={assets['opt']}",
            f"reward.model_name_or_path={assets['opt']}",
            *overrides,
        ],
    )


def grpo_config(root: Path, assets: dict[str, Path], *overrides: str) -> RunConfig:
    """The shipped GRPO sample (SFT, then GRPO on the tiny question-answer task), on the test's own copies."""
    return load_config(
        REPO / "samples" / "tiny-cpu-grpo.yaml",
        [
            f"storage.root={root}",
            f"data.data_path=[{assets['data'] / 'tiny-qa'}]",
            f"data.sft_only_data_path=[{assets['data'] / 'tiny-sft'}]",
            f"sft.model_name_or_path={assets['opt']}",
            *overrides,
        ],
    )


def chat_config(root: Path, assets: dict[str, Path], sample: str, *overrides: str) -> RunConfig:
    """A shipped conversational sample (tiny-cpu-chat.yaml, tiny-cpu-chat-grpo.yaml) on the test's own copies of
    the tiny model (with its chat template) and the tiny task as conversations."""
    data = assets["data"]
    path = "tiny-chat-qa" if "grpo" in sample else "tiny-chat-prefs"
    return load_config(
        REPO / "samples" / sample,
        [
            f"storage.root={root}",
            f"data.data_path=[{data / path}]",
            f"data.sft_only_data_path=[{data / 'tiny-chat-sft'}]",
            f"sft.model_name_or_path={assets['opt']}",
            *([] if "grpo" in sample else [f"reward.model_name_or_path={assets['opt']}"]),
            *overrides,
        ],
    )


def tools_assets(root: Path) -> dict[str, Path]:
    """The tiny tools task's model (its tokenizer with the calculator's markup; heads 32 wide, as vLLM's CPU
    kernels need) and data, as `model init-tiny --tools` and `data make-tiny` write the shipped ones."""
    from dschat_core.tiny_tools import init_model, write_sample

    return {"model": init_model(root / "tiny-tools-opt"), "data": write_sample(root / "data")}


def tools_config(root: Path, assets: dict[str, Path], *overrides: str) -> RunConfig:
    """The shipped tools sample (SFT, then GRPO with the calculator environment), on the test's own copies."""
    return load_config(
        REPO / "samples" / "tiny-cpu-tools.yaml",
        [
            f"storage.root={root}",
            f"data.data_path=[{assets['data'] / 'tiny-tools-qa'}]",
            f"data.sft_only_data_path=[{assets['data'] / 'tiny-tools-sft'}]",
            f"sft.model_name_or_path={assets['model']}",
            *overrides,
        ],
    )


def run_stage(cfg: RunConfig, stage: str) -> tuple[Path, str]:
    backend = LocalBackend()
    p = plan(cfg, backend, stage)
    status = backend.status(backend.submit(p))
    log = "".join(backend.logs(status.job_id))
    assert status.state is JobState.SUCCEEDED, log[-4000:]
    return Path(p.output_dir), log


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def wait_for_checkpoint(
    output_dir: str | Path, work_name: str, step: int, alive: Callable[[], bool] = lambda: True
) -> None:
    """Until a checkpoint at ``step`` or later is on disk (while ``alive()`` holds; 300 s at most)."""
    latest = Path(output_dir).parent / "work" / work_name / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and int(latest.read_text().split("-")[1]) >= step):
        assert time.monotonic() < deadline and alive(), "no checkpoint was written"
        time.sleep(0.05)


def kill_after_checkpoint(cfg: RunConfig, stage: str, work_name: str, step: int) -> LaunchPlan:
    """Start ``stage`` and SIGKILL the launcher and every rank (no chance to clean up) once a checkpoint at
    ``step`` or later is on disk."""
    backend = LocalBackend()
    p = plan(cfg, backend, stage)
    thread = threading.Thread(target=lambda: backend.submit(p))
    thread.start()
    wait_for_checkpoint(p.output_dir, work_name, step, thread.is_alive)
    records = [json.loads(r.read_text()) for r in state_dir("local").glob("*.json")]
    running = [r for r in records if r["state"] == "RUNNING"]
    assert len(running) == 1
    launcher = psutil.Process(running[0]["pid"])
    for proc in [launcher, *launcher.children(recursive=True)]:
        proc.send_signal(signal.SIGKILL)
    thread.join(timeout=60)
    return p


def kill_after_checkpoint_on_disk(
    output_dir: str | Path, work_name: str, step: int, marker: str, launcher: bool = False
) -> None:
    """SIGKILL one training rank (a worker process whose command line holds ``marker``), or with ``launcher`` the
    torchrun that started the ranks, once a checkpoint at ``step`` or later is on disk: what an OOM killer or a
    failing node does to one process."""
    wait_for_checkpoint(output_dir, work_name, step)
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        is_launcher = "torchrun" in cmdline or "torch.distributed.run" in cmdline
        if "dschat_core.worker" in cmdline and marker in cmdline and is_launcher == launcher:
            proc.send_signal(signal.SIGKILL)
            return
    raise AssertionError("no such process found")


def run_all(cfg: RunConfig) -> dict[str, Path]:
    """`--stage all` of ``cfg``: every stage of its pipeline chained, waited for; each stage's output folder."""
    backend = LocalBackend()
    submitted = submit_stages(cfg, backend, "all")
    final_status(backend, submitted, poll_seconds=0.1)
    layout = backend.storage(cfg)
    return {s.stage: Path(layout.stage_output(cfg, s.stage)) for s in submitted}


def judged(out: Path, stage: str) -> dict[int, float]:
    """The tiny task's judge on the greedy answers ``stage`` saved at each evaluation (``out``: its output
    folder), by step. It reads a prompt's last question, so multi-turn prompts are judged alike."""
    rates = {}
    for path in (out.parent / "work" / stage / "samples").glob("step-*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rates[int(path.stem.split("-")[1])] = sum(judge(r["prompt"], r["answer"]) for r in rows) / len(rows)
    return dict(sorted(rates.items()))


def resumed_and_straight(root: Path, cfg_of: Callable[[Path], RunConfig], step: int) -> tuple[Path, Path, str]:
    """Stage 1 of ``cfg_of(folder)`` run straight through, and again SIGKILLed once a checkpoint at ``step`` is on
    disk, then resumed: (the straight output, the resumed output, the resumed run's log)."""
    straight, _ = run_stage(cfg_of(root / "straight"), "sft")
    cfg = cfg_of(root / "killed")
    p = kill_after_checkpoint(cfg, "sft", "actor", step=step)
    assert not (Path(p.output_dir) / FINISHED_MARKER).exists()
    resumed, log = run_stage(cfg, "sft")
    assert "resumed sft from" in log
    return straight, resumed, log


def docs_plugin(page: str, module: str, name: str, root: Path, command: str, monkeypatch, register) -> dict:
    """The plugin package a docs page spells out (its first python and toml blocks), installed under ``root``:
    registered here and, through PYTHONPATH and DSCHAT_PLUGINS, for the ranks; returns the rows of `dschat-core
    COMMAND` (tab-separated, by name) as a fresh process lists them with the plugin installed."""
    import importlib

    text = (REPO / "docs" / page).read_text()
    package, site = root / module.replace("_", "-"), root / "site"
    package.mkdir()
    (package / f"{module}.py").write_text(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[0])
    (package / "pyproject.toml").write_text(re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)[0])
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), str(package)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "DSCHAT_PLUGINS": name}
    listed = subprocess.run(
        [sys.executable, "-m", "dschat_core.cli", command], env=env, capture_output=True, text=True, timeout=120
    )
    monkeypatch.setenv("PYTHONPATH", str(site))  # the ranks load it as an installed plugin
    monkeypatch.setenv("DSCHAT_PLUGINS", name)
    monkeypatch.syspath_prepend(str(site))  # and this process checks the config against it
    register(importlib.import_module(module), name)
    return {line.split("\t")[0]: line.split("\t") for line in listed.stdout.splitlines()}
