"""The run chassis for real (2 CPU ranks): starting over, refusing another run's checkpoint, one writer per output,
a graceful stop on SIGTERM that resumes to the same weights, non-finite losses, max_steps."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dschat_core.backend import FINISHED_MARKER, JobState
from dschat_core.config import dump_config
from dschat_core.errors import UserError
from dschat_core.launch import plan
from dschat_local.backend import LocalBackend

from .runs import config, kill_after_checkpoint, kill_after_checkpoint_on_disk, metrics, run_stage

pytestmark = pytest.mark.ranks
SHORT = ["sft.max_steps=8", "sft.print_interval=1"]


def summary(folder: Path) -> dict:
    return json.loads((folder / FINISHED_MARKER).read_text())


def test_max_steps_ends_a_finished_run_and_overwrite_trains_it_again_instead_of_resuming(tmp_path, assets):
    out, log = run_stage(config(tmp_path, assets, *SHORT), "sft")
    assert summary(out)["global_step"] == 8 and summary(out)["eval/perplexity"] < 1e6
    assert [m["step"] for m in metrics(out) if "train/loss" in m] == list(range(1, 9))
    assert "eval/perplexity_before" in summary(out)
    first = load_file(out / "model.safetensors")
    again, log = run_stage(config(tmp_path, assets, *SHORT, "sft.overwrite=true"), "sft")
    assert "starting over" in log and "resumed" not in log
    assert summary(again)["global_step"] == 8 and summary(again)["eval/perplexity"] < 1e6
    assert [m["step"] for m in metrics(again) if "train/loss" in m] == list(range(1, 9))
    second = load_file(again / "model.safetensors")  # the same seed and data: the same model, trained again
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_difference(tmp_path, assets):
    cfg = config(tmp_path, assets, "sft.num_train_epochs=2", "sft.save_interval=4")
    kill_after_checkpoint(cfg, "sft", "actor", step=4)
    backend = LocalBackend()
    changed = config(tmp_path, assets, "sft.num_train_epochs=2", "sft.save_interval=4", "sft.zero_stage=2")
    status = backend.status(backend.submit(plan(changed, backend, "sft")))
    log = "".join(backend.logs(status.job_id))
    assert status.state is JobState.FAILED
    assert "belongs to another run (sft.zero_stage = 0 there, 2 now)" in log and "sft.resume=never" in log
    fresh, log = run_stage(
        config(
            tmp_path, assets, "sft.num_train_epochs=2", "sft.save_interval=4", "sft.zero_stage=2", "sft.resume=never"
        ),
        "sft",
    )
    assert "starting over" in log and (fresh / FINISHED_MARKER).exists()


def test_the_lock_refuses_a_live_writer_and_takes_over_a_dead_one(tmp_path):
    from dschat_core.training.saving import OutputLock

    out = tmp_path / "actor"
    lock = OutputLock("sft", str(out), "cpu")
    lock.path.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"job": "other-job", "host": os.uname().nodename, "pid": sleeper.pid, "started": time.time()}
        lock.path.write_text(json.dumps(holder))
        with pytest.raises(UserError, match=rf"being written by another run \(job other-job.*pid {sleeper.pid}"):
            lock.__enter__()
    finally:
        sleeper.kill()
        sleeper.wait()
    with lock:  # its holder is gone: stale, taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()


def test_sigterm_to_train_checkpoints_and_the_rerun_resumes_to_the_same_weights(tmp_path, assets):
    overrides = ["sft.max_steps=40", "sft.print_interval=1"]
    straight, _ = run_stage(config(tmp_path / "straight", assets, *overrides), "sft")

    cfg = config(tmp_path / "stopped", assets, *overrides)
    run_config = tmp_path / "run.yaml"
    run_config.write_text(dump_config(cfg))
    env = {**os.environ, "DSCHAT_PLUGINS": "local"}
    train = subprocess.Popen(
        [sys.executable, "-m", "dschat_core.cli", "train", "-b", "local", "--stage", "sft", "-c", str(run_config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    live = tmp_path / "stopped" / "runs" / "tiny-cpu" / "work" / "actor" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (live.exists() and sum('"train/loss"' in line for line in live.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and train.poll() is None, train.stdout.read() if train.poll() else ""
        time.sleep(0.1)
    train.send_signal(signal.SIGTERM)
    output, _ = train.communicate(timeout=300)
    assert train.returncode == 75, output[-3000:]
    assert "checkpoint saved" in output and "run the same command again to resume" in output
    out = Path(plan(cfg, LocalBackend(), "sft").output_dir)
    assert not (out / FINISHED_MARKER).exists()
    resumed, log = run_stage(cfg, "sft")
    assert "resumed sft from" in log
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def _train_until_it_logs_losses(tmp_path: Path, cfg, start) -> subprocess.Popen:
    """Start `train` on ``cfg`` through ``start(argv, env)`` and wait until it has logged three losses."""
    run_config = tmp_path / "run.yaml"
    run_config.write_text(dump_config(cfg))
    argv = [sys.executable, "-m", "dschat_core.cli", "train", "-b", "local", "--stage", "sft", "-c", str(run_config)]
    proc = start(argv, {**os.environ, "DSCHAT_PLUGINS": "local"})
    live = Path(plan(cfg, LocalBackend(), "sft").output_dir).parent / "work" / "actor" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (live.exists() and sum('"train/loss"' in line for line in live.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.1)
    return proc


def _stopped_not_finished(cfg) -> None:
    """The job checkpointed and stopped on request: recorded as cancelled, nothing marked finished, and no rank
    of it still running."""
    backend = LocalBackend()
    (job,) = backend.records.recent(1)
    status = backend.wait(job, poll_seconds=0.2, timeout=60)
    assert status.state is JobState.CANCELLED and "checkpoint saved" in status.reason, status.describe()
    assert not (Path(plan(cfg, backend, "sft").output_dir) / FINISHED_MARKER).exists()
    log = "".join(backend.logs(job))  # one line for the stop, not torchrun's report of exit code 75 as a failure
    assert "stopped on request: the ranks checkpointed and exited" in log, log[-3000:]
    assert "ChildFailedError" not in log, log[-3000:]


def test_ctrl_c_on_a_piped_train_stops_the_job_as_on_a_terminal(tmp_path, assets):
    """`train … | tee log`, Ctrl-C: the terminal sends SIGINT to the whole pipeline, so the reader dies too and
    `train` loses its output. The job must still checkpoint and stop, and `train` exit 75."""
    cfg = config(tmp_path, assets, "sft.max_steps=200", "sft.print_interval=1")
    rc_file, err_file = tmp_path / "rc", tmp_path / "stderr"

    def start(argv, env):
        line = f"{shlex.join(argv)} 2>{err_file} | cat >/dev/null; echo ${{PIPESTATUS[0]}} >{rc_file}"
        return subprocess.Popen(["bash", "-c", line], env=env, start_new_session=True)

    pipeline = _train_until_it_logs_losses(tmp_path, cfg, start)
    os.killpg(pipeline.pid, signal.SIGINT)  # what Ctrl-C does: the foreground process group
    pipeline.wait(timeout=300)
    said = err_file.read_text()
    assert rc_file.read_text().strip() == "75", said[-3000:]
    assert "dschat: stopping" in said and "checkpoint saved" in said and "Traceback" not in said
    _stopped_not_finished(cfg)


def test_a_hung_up_terminal_stops_the_job(tmp_path, assets):
    """The terminal (a pty) closes under a foreground `train`, as when an SSH session drops: SIGHUP, and every
    later write fails. The job checkpoints and stops instead of running on unwatched."""
    import pty
    import select
    import threading

    cfg = config(tmp_path, assets, "sft.max_steps=200", "sft.print_interval=1")
    master, terminal = pty.openpty()
    reading = threading.Event()
    reading.set()

    def drain() -> None:  # a terminal shows what it is sent
        while reading.is_set():
            if select.select([master], [], [], 0.1)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def start(argv, env):
        return subprocess.Popen(argv, env=env, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)

    train = _train_until_it_logs_losses(tmp_path, cfg, start)
    reading.clear()
    reader.join()
    os.close(master)  # the terminal goes away: writes to it fail from now on
    os.close(terminal)
    os.killpg(train.pid, signal.SIGHUP)
    assert train.wait(timeout=300) == 75
    _stopped_not_finished(cfg)


def test_a_non_finite_loss_stops_the_run_and_nothing_is_marked_finished(tmp_path, assets):
    backend = LocalBackend()
    cfg = config(tmp_path, assets, *SHORT, "sft.learning_rate=1.0e+30", "sft.num_warmup_steps=0")
    status = backend.status(backend.submit(plan(cfg, backend, "sft")))
    log = "".join(backend.logs(status.job_id))
    assert status.state is JobState.FAILED
    assert "non-finite loss at step" in log and "sft.on_nonfinite=skip" in log
    assert not (Path(plan(cfg, backend, "sft").output_dir) / FINISHED_MARKER).exists()


@pytest.mark.parametrize("killed", ["rank", "launcher"])
def test_with_retries_a_kill_9_mid_run_ends_in_a_finished_model_and_leaves_no_rank_behind(tmp_path, assets, killed):
    """One rank SIGKILLed (the OOM killer), or torchrun itself: then its ranks, orphaned, must not train on beside
    the retry (two writers, one output). The retry resumes from the last checkpoint and finishes. While the job
    runs, a second run into the same output is refused."""
    backend = LocalBackend()
    cfg = config(tmp_path, assets, "sft.max_steps=30", "sft.save_interval=5", "sft.retries=1")
    p = plan(cfg, backend, "sft")
    p.detach = True
    job = backend.submit(p)
    deadline = time.monotonic() + 120
    while backend.status(job).state is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(UserError, match=f"being written by local job {job}"):
        plan(cfg, backend, "sft")
    kill_after_checkpoint_on_disk(p.output_dir, "actor", 5, str(tmp_path), launcher=killed == "launcher")
    status = backend.wait(job, poll_seconds=0.2, timeout=600)
    log = "".join(backend.logs(job))
    assert status.state is JobState.SUCCEEDED, log[-4000:]
    assert "attempt 1 of 2 failed" in log and "retrying from the last checkpoint" in log
    assert "resumed sft from" in log
    assert log.count("saved the final model") == 1  # by the retry alone
    assert summary(Path(p.output_dir))["global_step"] == 30


def test_a_truncated_checkpoint_shard_is_named_and_the_run_resumes_from_the_one_before(tmp_path, assets):
    cfg = config(tmp_path, assets, "sft.max_steps=16", "sft.save_interval=4", "sft.print_interval=1")
    p = kill_after_checkpoint(cfg, "sft", "actor", step=8)
    root = Path(p.output_dir).parent / "work" / "actor" / "checkpoints"
    newest = root / root.joinpath("latest").read_text().strip()
    shard = next(newest.rglob("mp_rank_00_model_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a disk that filled mid-write
    older = sorted((p for p in root.glob("step-*") if p != newest), key=lambda p: int(p.name.split("-")[1]))
    out, log = run_stage(cfg, "sft")
    assert f"cannot be used: {shard.relative_to(newest)} is damaged or cut short" in log, log[-3000:]
    assert f"resumed sft from {older[-1]}" in log
    assert summary(out)["global_step"] == 16
