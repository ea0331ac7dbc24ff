"""The local backend: rendering, validation, and real runs of the worker under torchrun."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dschat_core.backend import FINISHED_MARKER, JobState
from dschat_core.cli import cli
from dschat_core.config import load_config
from dschat_core.errors import ConfigError, JobFailed
from dschat_core.launch import plan
from dschat_core.testing import BackendContract
from dschat_local import plugin as local_plugin
from dschat_local.backend import LocalBackend, _alive

from ..core.fake_backend import FakeBackend, FakePlugin


@pytest.fixture
def local(register):
    register(local_plugin, "local")
    return LocalBackend()


def cfg(tmp_path, *overrides):
    return load_config(None, [f"storage.root={tmp_path}", "topology.accelerator=cpu", *overrides])


def test_render_is_a_torchrun_command(local, tmp_path):
    text = local.render(plan(cfg(tmp_path, "topology.gpus_per_node=2"), local, "preflight"))
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2 -m dschat_core.worker preflight" in text
    assert "OMP_NUM_THREADS=" in text and "CUDA_VISIBLE_DEVICES=''" in text


def test_render_quotes_and_uses_resolved_paths(local, tmp_path):
    config = cfg(
        tmp_path,
        "sft.model_name_or_path=facebook/opt-125m",
        "sft.dtype=fp32",
        "topology.master_port=29999",
        "backends.local.env={A: 'x y'}",
    )
    p = plan(config, local, "sft")
    text = local.render(p)
    assert f"--config {tmp_path}/runs/dschat/configs/sft.yaml" in text
    assert "--master_port=29999" in text and "A='x y'" in text
    assert p.output_dir == f"{tmp_path}/runs/dschat/actor"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["topology.nodes=2"], "topology.nodes"),
        (["sft.dtype=fp16"], "sft.dtype"),
        (["sft.dtype=fp32", "sft.model_name_or_path=./no/such/model"], "sft.model_name_or_path"),
        (["sft.dtype=fp32", "data.data_path=/no/such/data"], "data.data_path"),
        (["backends.local.launcher=deepsped"], "backends.local.launcher"),
        (["backends.local.launchr=torchrun"], "backends.local.launchr"),
    ],
)
def test_validation(local, tmp_path, overrides, key):
    with pytest.raises(ConfigError) as info:
        plan(cfg(tmp_path, "sft.model_name_or_path=facebook/opt-125m", *overrides), local, "sft")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("key", "needs"), [("enable_hybrid_engine", []), ("enable_mixed_precision_lora", ["ppo.actor_lora_dim=8"])]
)
def test_gpu_only_ppo_features_are_refused_on_the_cpu(local, tmp_path, key, needs):
    config = cfg(
        tmp_path,
        "sft.model_name_or_path=facebook/opt-125m",
        "reward.model_name_or_path=facebook/opt-125m",
        "ppo.dtype=fp32",
        f"ppo.{key}=true",
        "ppo.actor_zero_stage=3",
        *needs,
    )
    with pytest.raises(ConfigError) as info:
        plan(config, local, "ppo", chained=True)
    assert info.value.key == f"ppo.{key}" and "GPU" in str(info.value)


def test_ppo_alone_needs_existing_stage_outputs_but_a_chain_does_not(local, tmp_path):
    config = cfg(
        tmp_path,
        "sft.model_name_or_path=facebook/opt-125m",
        "reward.model_name_or_path=facebook/opt-125m",
        "ppo.dtype=fp32",
    )
    with pytest.raises(ConfigError, match="ppo.actor_model_name_or_path"):
        plan(config, local, "ppo")
    assert plan(config, local, "ppo", chained=True).stage == "ppo"


def test_refuses_to_overwrite_a_finished_model(local, tmp_path):
    config = cfg(tmp_path, "sft.model_name_or_path=facebook/opt-125m", "sft.dtype=fp32")
    out = Path(plan(config, local, "sft").output_dir)
    out.mkdir(parents=True)
    (out / FINISHED_MARKER).write_text("{}")
    with pytest.raises(ConfigError, match="holds a finished model"):
        plan(config, local, "sft")
    overwrite = cfg(tmp_path, "sft.model_name_or_path=facebook/opt-125m", "sft.dtype=fp32", "sft.overwrite=true")
    assert plan(overwrite, local, "sft")


class SleepingBackend(LocalBackend):
    """Runs a process tree that sleeps, in place of torchrun, to exercise cancel for real."""

    def command(self, plan):
        code = (
            "import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print('child', child.pid, flush=True); time.sleep(120)"
        )
        return [sys.executable, "-c", code]


def test_cancel_stops_the_whole_process_group(tmp_path, register):
    backend = SleepingBackend()
    p = plan(cfg(tmp_path), backend, "preflight")
    outcome = {}

    def run():
        try:
            outcome["job"] = backend.submit(p)
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    state_dir = Path(os.environ["DSCHAT_STATE_DIR"]) / "local"
    deadline = time.monotonic() + 30
    job_id = None
    while time.monotonic() < deadline and job_id is None:
        records = list(state_dir.glob("*.json"))
        if records and backend.status(records[0].stem).state is JobState.RUNNING:
            job_id = records[0].stem
        time.sleep(0.1)
    assert job_id, "job never started"
    log = Path(backend._read(job_id)["log"])
    while "child" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the job's output never reached its log"
        time.sleep(0.1)
    child_pid = int(log.read_text().split()[1])
    leader_pid = backend._read(job_id)["pid"]
    backend.cancel(job_id)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome.get("job") == job_id, outcome
    assert backend.status(job_id).state is JobState.CANCELLED
    assert not _alive(leader_pid) and not _alive(child_pid)
    # `dschat-core status` without an id lists the recent jobs (issue 19: the id used to need a look in the state)
    # ... of this storage root (the config's, default the current folder), or of every root with --all
    register(local_plugin, "local")
    listed = CliRunner().invoke(cli, ["status", "--set", f"storage.root={tmp_path}"])
    assert listed.exit_code == 0 and f"local\t{job_id}: {JobState.CANCELLED.value}" in listed.output, listed.output
    elsewhere = CliRunner().invoke(cli, ["status", "--set", f"storage.root={tmp_path / 'other'}"])
    assert elsewhere.exit_code == 0 and job_id not in elsewhere.output
    assert "1 job(s) of other storage roots than" in elsewhere.output and "status --all" in elsewhere.output
    every = CliRunner().invoke(cli, ["status", "--all", "--set", f"storage.root={tmp_path / 'other'}"])
    assert f"local\t{job_id}: {JobState.CANCELLED.value}" in every.output, every.output
    # the backend of a job is found from its record: no --backend needed with several installed
    register(FakePlugin(FakeBackend()), "fake")
    found = CliRunner().invoke(cli, ["status", job_id])
    assert found.exit_code == 1 and JobState.CANCELLED.value in found.output, found.output


@pytest.mark.ranks
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_preflight_two_ranks_for_real(local, tmp_path, capfd, monkeypatch, launcher):
    """Two CPU ranks meet and all-reduce, under either launcher; they neither build DeepSpeed's shared-memory op
    (it serves only its inference all-reduce; 30-80 s on an environment's first run) nor map its /dev/shm buffers
    (two of 69 MB per run, left behind by a killed run)."""
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    from dschat_core.worker import SHM_OP_NAME

    assert ShareMemCommBuilder.NAME == SHM_OP_NAME
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ops"))
    before = set(Path("/dev/shm").glob("deepspeed_*"))
    config = cfg(tmp_path, "topology.gpus_per_node=2", f"backends.local.launcher={launcher}")
    job_id = local.submit(plan(config, local, "preflight"))
    status = local.status(job_id)
    out = capfd.readouterr().out
    assert status.state is JobState.SUCCEEDED, out[-3000:]
    assert "world_size: 2" in out
    assert "all_reduce: ok (sum 3, expected 3)" in out
    assert "rank 1: host" in out
    logged = "".join(local.logs(job_id))
    assert "world_size: 2" in logged
    assert Path(status.details["log"]).parent == tmp_path / "runs" / "dschat" / "logs"
    assert not (tmp_path / "ops").exists() and "building DeepSpeed" not in out
    assert set(Path("/dev/shm").glob("deepspeed_*")) <= before


def test_chain_refuses_to_start_after_a_failed_dependency(local, tmp_path):
    class Failing(LocalBackend):
        def command(self, plan):
            return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]

    backend = Failing()
    job = backend.submit(plan(cfg(tmp_path), backend, "preflight"))
    status = backend.status(job)
    assert status.state is JobState.FAILED and "exit code 3" in status.reason
    with pytest.raises(JobFailed, match="needs .* to succeed"):
        backend.submit(plan(cfg(tmp_path), backend, "preflight"), after=[job])


def test_backend_doc_lists_every_setting():
    from dschat_core.reference import section_table
    from dschat_local.backend import LocalSettings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "backends" / "local.md").read_text()
    for line in section_table(LocalSettings, "backends.local")[2:]:
        assert line in doc


@pytest.mark.ranks
class TestLocalContract(BackendContract):
    """The backend contract kit, on this machine."""

    @pytest.fixture
    def backend(self, local):
        return local


TORCHRUN_REPORT = """E1203 17:31:43.238000 7167 torch/distributed/elastic/multiprocessing/api.py:1002] \
failed (exitcode: 75) local_rank: 0 (pid: 7172) of binary: /venv/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
dschat_core.worker FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : {one} (pid: 7173)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 75 (pid: 7172)
============================================================
"""


@pytest.mark.parametrize(("rank_1_exit", "cut"), [(75, True), (-15, True), (1, False)])
def test_torchruns_report_of_ranks_stopped_on_request_is_cut_from_the_log(tmp_path, rank_1_exit, cut):
    from dschat_local.supervisor import shorten_stopped_report

    log = tmp_path / "job.log"
    before = "[sft] stop requested: checkpoint saved at step 12; run again to resume\n"
    log.write_text(before + TORCHRUN_REPORT.format(one=rank_1_exit))
    assert shorten_stopped_report(log) is cut
    assert (log.read_text() == before) is cut  # a rank that failed otherwise keeps the whole report


def test_the_console_leaves_out_deepspeeds_op_loaded_lines():
    from dschat_local.backend import LauncherNoise

    quiet = LauncherNoise()
    assert not quiet.shows("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n")
    assert quiet.shows("[sft] epoch 1/2 step 3/32 loss 2.1\n")


def test_a_hang_up_landing_while_a_failed_write_is_handled_still_stops_the_job(local, tmp_path, monkeypatch):
    """A terminal that closes fails the next write (OSError) and sends SIGHUP at once: the HangUp may land while
    the failed write is being handled. The job is still asked to stop, and `train` ends with its outcome instead
    of an escaped interrupt (exit 1, the job left running unwatched)."""
    import errno

    import dschat_local.backend as local_backend

    class Talkative(LocalBackend):
        def command(self, plan):
            return [sys.executable, "-c", "import time\nfor i in range(600): print(i, flush=True); time.sleep(0.1)"]

    class DeadTerminal:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            pass

    discarded = []

    def discard(stderr=True):  # where the SIGHUP lands: the first step of handling the failed write
        discarded.append(stderr)
        if len(discarded) == 1:
            raise local_backend.HangUp

    monkeypatch.setattr(local_backend, "_discard_output", discard)
    monkeypatch.setattr(sys, "stdout", DeadTerminal())
    backend = Talkative()
    try:
        with pytest.raises(JobFailed, match="CANCELLED"):
            backend.submit(plan(cfg(tmp_path), backend, "preflight"))
    except KeyboardInterrupt:
        pytest.fail("the hang-up escaped")
    (job,) = backend.records.recent(1)
    assert backend.records.read(job)["cancel_requested"] and discarded == [False, True]


@pytest.mark.ranks
def test_cancel_of_a_job_still_starting_ends_at_once(local, tmp_path):
    """Before its training loop a job has nothing to checkpoint: cancel does not wait stop_grace_seconds (300 s)
    for a step that is not coming, it ends the ranks now."""
    assets = Path(__file__).resolve().parents[2] / "samples"
    config = load_config(
        assets / "tiny-cpu.yaml", [f"storage.root={tmp_path}", "sft.max_steps=50", "sft.eval_before_training=false"]
    )
    p = plan(config, local, "sft")
    p.detach = True
    job = local.submit(p)
    deadline = time.monotonic() + 60
    while local.status(job).state is not JobState.RUNNING:
        assert time.monotonic() < deadline, local.status(job).describe()
        time.sleep(0.05)
    started = time.monotonic()
    local.cancel(job)
    took = time.monotonic() - started
    status = local.status(job)
    assert status.state is JobState.CANCELLED, status.describe()
    assert took < 60, took  # the grace for a training stage to checkpoint is 300 s
    assert not (Path(p.output_dir).parent / "work" / "actor" / "checkpoints" / "latest").exists()
