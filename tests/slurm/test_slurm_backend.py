"""The slurm backend against a real Slurm: rendering, submission, multi-node rendezvous, status, logs, cancel,
dependency chains, preemption with requeue, and no shell injection from config values."""

from __future__ import annotations

import importlib
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dschat_core.backend import JobState
from dschat_core.cli import cli
from dschat_core.config import load_config
from dschat_core.errors import ConfigError
from dschat_core.launch import plan, submit_stages
from dschat_core.testing import BackendContract

from ..stages.runs import kill_after_checkpoint_on_disk
from ..webhook import Receiver, install_webhook_sink

pytestmark = pytest.mark.ranks
REPO = Path(__file__).resolve().parents[2]
PYTHON = f"backends.slurm.python={sys.executable}"


def base(tmp_path, *overrides):
    return [
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        PYTHON,
        "--set",
        "topology.accelerator=cpu",
        *[arg for o in overrides for arg in ("--set", o)],
    ]


def sample(tmp_path, *overrides):
    return load_config(
        REPO / "samples" / "tiny-cpu.yaml",
        [
            f"storage.root={tmp_path}",
            PYTHON,
            f"data.cache_dir={tmp_path / 'cache'}",
            f"sft.model_name_or_path={REPO / 'samples/models/tiny-opt'}",
            f"reward.model_name_or_path={REPO / 'samples/models/tiny-opt'}",
            f"data.data_path=[{REPO / 'samples/data/tiny-prefs'}]",
            f"data.sft_only_data_path=[{REPO / 'samples/data/tiny-sft'}]",
            *overrides,
        ],
    )


def wait_for(backend, job_id, states, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = backend.status(job_id)
        if status.state in states:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached {states}: {backend.status(job_id).describe()}")


def test_preflight_on_two_ranks_through_the_cli(slurm, tmp_path):
    result = CliRunner().invoke(
        cli, ["train", "--backend", "slurm", "--stage", "preflight", *base(tmp_path, "topology.gpus_per_node=2")]
    )
    assert result.exit_code == 0, result.output
    log = next((tmp_path / "runs" / "dschat" / "logs").glob("dschat-preflight-*.log")).read_text()
    assert "world_size: 2" in log and "all_reduce: ok" in log


def test_two_nodes_meet_at_the_rendezvous(slurm, tmp_path):
    config = load_config(
        None,
        [
            f"storage.root={tmp_path}",
            PYTHON,
            "topology.accelerator=cpu",
            "topology.nodes=2",
            "topology.gpus_per_node=1",
            "backends.slurm.master_addr=127.0.0.1",
        ],
    )
    p = plan(config, slurm, "preflight")
    assert "--rdzv_backend=c10d" in slurm.render(p)
    job = slurm.submit(p)
    status = slurm.wait(job, poll_seconds=0.5, timeout=300)
    log = "".join(slurm.logs(job))
    assert status.succeeded, log[-3000:]
    assert "world_size: 2" in log and log.count("local_rank 0") == 2  # one rank on each node


def test_dry_run_of_all_stages_shows_the_afterok_chain(slurm, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--backend",
            "slurm",
            "--stage",
            "all",
            "-c",
            str(REPO / "samples" / "tiny-cpu.yaml"),
            *base(tmp_path),
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    scripts = result.output.split("# --- stage ")[1:]
    assert [s.split(":")[0] for s in scripts] == ["sft", "reward", "ppo"]
    assert "--dependency=afterok:<sft job>:<reward job>" in scripts[2]
    assert "afterok" not in scripts[0] + scripts[1]
    for script in scripts:
        body = "#!" + script.split("#!", 1)[1]
        assert subprocess.run(["bash", "-n"], input=body, text=True).returncode == 0


def test_config_values_cannot_inject_commands(slurm, tmp_path):
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker}) `touch {marker}` ; touch {marker}"
    config = load_config(
        None,
        [
            f"storage.root={tmp_path}",
            PYTHON,
            "topology.accelerator=cpu",
            f"backends.slurm.env={{EVIL: '{evil}'}}",
            f"backends.slurm.extra_directives={{--comment: '{evil}'}}",
            "backends.slurm.modules=[]",
        ],
    )
    p = plan(config, slurm, "preflight")
    script = slurm.render(p)
    assert shlex.quote(evil) in script and f"export EVIL={shlex.quote(evil)}" in script
    job = slurm.submit(p)
    status = slurm.wait(job, poll_seconds=0.5, timeout=300)
    assert status.succeeded, "".join(slurm.logs(job))[-2000:]
    assert not marker.exists()
    with pytest.raises(ConfigError, match="environment variable name"):
        plan(load_config(None, [PYTHON, "backends.slurm.env={'A;touch x': '1'}"]), slurm, "preflight")
    with pytest.raises(ConfigError, match="sbatch option"):
        plan(load_config(None, [PYTHON, "backends.slurm.extra_directives={'--x $(id)': '1'}"]), slurm, "preflight")


def test_cancel_a_running_job(slurm, tmp_path):
    p = plan(sample(tmp_path, "sft.num_train_epochs=200"), slurm, "sft")
    job = slurm.submit(p)
    wait_for(slurm, job, {JobState.RUNNING})
    slurm.cancel(job)
    status = wait_for(slurm, job, {JobState.CANCELLED, JobState.FAILED})
    assert status.state is JobState.CANCELLED and "CANCELLED" in status.reason
    result = CliRunner().invoke(cli, ["cancel", "--backend", "slurm", job])
    assert result.exit_code != 0 and "already finished" in result.output


def test_a_failed_first_stage_fails_the_chain_not_hangs_it(slurm, tmp_path):
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    config = sample(tmp_path, f"sft.model_name_or_path={not_a_model}", f"reward.model_name_or_path={not_a_model}")
    submitted = submit_stages(config, slurm, "all")
    jobs = {s.stage: s.job_id for s in submitted}
    assert slurm.status(jobs["ppo"]).state is JobState.PENDING  # waiting for its dependencies, not failed
    failed = wait_for(slurm, jobs["sft"], {JobState.FAILED})
    # the rank's own line, not the launcher's
    assert "Couldn't instantiate the backend tokenizer" in failed.reason and "log:" in failed.reason
    ppo = wait_for(slurm, jobs["ppo"], {JobState.FAILED, JobState.CANCELLED})
    assert ppo.state is JobState.FAILED and "depends on" in ppo.reason, ppo.describe()
    result = CliRunner().invoke(cli, ["status", "--backend", "slurm", jobs["ppo"]])
    assert "depends on" in result.output


def slurm_history(cluster: Path, job: str) -> str:
    """What slurmctld and the job-completion log say about a job: the story behind a failed assertion."""
    found = []
    for name in ("slurmctld.log", "jobcomp.txt"):
        path = cluster / "log" / name
        if path.exists():
            found += [line for line in path.read_text().splitlines() if f"JobId={job} " in line + " "]
    return "\n".join(found[-30:])


def test_preemption_checkpoints_requeues_and_resumes(slurm, slurm_cluster, tmp_path):
    config = sample(tmp_path, "sft.num_train_epochs=6", "sft.save_interval=5")
    p = plan(config, slurm, "sft")
    job = slurm.submit(p)
    wait_for(slurm, job, {JobState.RUNNING})
    latest = Path(p.output_dir).parent / "work" / "actor" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists():
        assert time.monotonic() < deadline and not slurm.status(job).finished, "no checkpoint"
        time.sleep(0.2)
    # What Slurm sends ahead of a time limit or preemption (--signal=B:USR1@N), sent now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(slurm, job, {JobState.PENDING})  # requeued
    # Slurm holds a requeued job back for a while (node clean-up); an operator may start it at once, but only once
    # the old run's batch step is gone: started sooner, its late completion (killed by the requeue) is booked
    # against the new run, which Slurm then records as failed.
    deadline = time.monotonic() + 120
    while "DUE TO JOB REQUEUE" not in "".join(slurm.logs(job)) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
    status = slurm.wait(job, poll_seconds=1.0, timeout=600)
    log = "".join(slurm.logs(job))
    assert status.succeeded, log[-4000:] + "\n" + slurm_history(slurm_cluster, job)
    assert "stop requested: checkpoint saved" in log and "requeueing job" in log
    assert "resumed sft from" in log
    assert (Path(p.output_dir) / "model.safetensors").exists()


def test_a_key_exported_where_sbatch_runs_reaches_the_sink_and_no_file_of_the_run(
    slurm, tmp_path, monkeypatch, register
):
    (tmp_path / "pkg").mkdir()
    site = install_webhook_sink(tmp_path / "pkg", tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    register(importlib.import_module("dschat_webhook"), "webhook")
    receiver = Receiver()
    key = "fake-slurm-key-9d2e"
    for name, value in {
        "PYTHONPATH": str(site),
        "DSCHAT_PLUGINS": "webhook",
        "DSCHAT_WEBHOOK_URL": receiver.url,
        "DSCHAT_WEBHOOK_TOKEN": key,
    }.items():
        monkeypatch.setenv(name, value)
    p = plan(
        sample(tmp_path, "sft.max_steps=2", "sft.print_interval=1", "tracking.sinks=[jsonl, webhook]"), slurm, "sft"
    )
    status = slurm.wait(slurm.submit(p), poll_seconds=1.0, timeout=600)
    log = "".join(slurm.logs(status.job_id))
    assert status.succeeded, log[-4000:]
    assert receiver.authorization == {f"Bearer {key}"} and sorted(
        s for s, v in receiver.points().items() if "train/loss" in v
    ) == [1, 2]
    written = [f for f in (tmp_path / "runs").rglob("*") if f.is_file()]
    assert any(f.suffix == ".sbatch" for f in written)
    assert not [f for f in written if key.encode() in f.read_bytes()]


def test_with_retries_a_rank_killed_mid_run_ends_in_a_finished_model(slurm, tmp_path):
    p = plan(sample(tmp_path, "sft.max_steps=30", "sft.save_interval=5", "sft.retries=1"), slurm, "sft")
    job = slurm.submit(p)
    kill_after_checkpoint_on_disk(p.output_dir, "actor", 5, str(tmp_path))
    status = slurm.wait(job, poll_seconds=1.0, timeout=600)
    log = "".join(slurm.logs(job))
    assert status.succeeded, log[-4000:]
    assert "dschat: attempt 1 of 2 failed" in log and "resumed sft from" in log
    assert (Path(p.output_dir) / "model.safetensors").exists()


def test_shipped_sample_scripts_are_current(tmp_path):
    from dschat_slurm.samples import write_samples

    for path in write_samples(tmp_path):
        shipped = REPO / "samples" / "slurm" / path.relative_to(tmp_path)
        assert shipped.read_text() == path.read_text(), f"regenerate: dschat-core slurm samples ({shipped})"
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_backend_doc_lists_every_setting():
    from dschat_core.reference import section_table
    from dschat_slurm.backend import SlurmSettings

    doc = (REPO / "docs" / "backends" / "slurm.md").read_text()
    for line in section_table(SlurmSettings, "backends.slurm")[2:]:
        assert line in doc


class TestSlurmContract(BackendContract):
    """The backend contract kit, on the real Slurm."""

    overrides = (PYTHON,)

    @pytest.fixture
    def backend(self, slurm):
        return slurm
