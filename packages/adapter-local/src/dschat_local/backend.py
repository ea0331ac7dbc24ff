"""The ``local`` backend: torchrun (or the deepspeed launcher) on this machine, in the foreground.

Each job gets a record in the state folder (``$DSCHAT_STATE_DIR/local``, default ``~/.local/state/dschat/local``)
so that ``status``, ``logs`` and ``cancel`` work from another terminal.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dschat_core.backend import (
    FINISHED_MARKER,
    Backend,
    JobRecords,
    JobState,
    JobStatus,
    LaunchPlan,
    StorageLayout,
    follow_log,
)
from dschat_core.config import STAGES, RunConfig, write_config
from dschat_core.errors import BackendError, ConfigError, JobFailed, UserError
from dschat_core.launch import check_cpu_stage

CANCEL_GRACE_SECONDS = 15.0


class LocalSettings(BaseModel):
    """The run config's ``backends.local`` section."""

    model_config = ConfigDict(extra="forbid")

    launcher: Literal["torchrun", "deepspeed"] = Field(
        "torchrun",
        description="torchrun, or DeepSpeed's own launcher (as T9K's workers run it); both run GPU and CPU ranks.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for every rank.")
    omp_num_threads: int | None = Field(
        None, ge=1, description="Threads per rank; default: CPU cores / ranks (at least 1)."
    )


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); read its state where /proc exists.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value)


class LocalBackend(Backend):
    name = "local"
    config_model = LocalSettings

    # -- storage and validation -----------------------------------------------------------------------------
    def storage(self, config: RunConfig) -> StorageLayout:
        return StorageLayout(os.path.abspath(os.path.expanduser(config.storage.root or ".")))

    def accelerator(self, config: RunConfig) -> str:
        wanted = config.topology.accelerator
        if wanted != "auto":
            return wanted
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def validate(self, config: RunConfig, stage: str, upcoming: frozenset[str] = frozenset()) -> None:
        self.settings(config)
        topo = config.topology
        if topo.nodes != 1:
            raise ConfigError(
                "topology.nodes",
                topo.nodes,
                "the local backend runs on this machine only",
                "set topology.nodes=1, or use --backend slurm or t9k for several nodes",
            )
        accel = self.accelerator(config)
        if accel == "cuda":
            import torch

            count = torch.cuda.device_count()
            if topo.gpus_per_node > count:
                raise ConfigError(
                    "topology.gpus_per_node",
                    topo.gpus_per_node,
                    f"this machine has {count} visible GPU(s)",
                    f"set topology.gpus_per_node to at most {count}",
                )
        else:
            check_cpu_stage(config, stage)
        if stage in STAGES:
            self._check_inputs(config, stage, upcoming)
            self._check_not_finished(config, stage)

    def _check_inputs(self, config: RunConfig, stage: str, upcoming: frozenset[str]) -> None:
        keys = {
            "sft": ["model_name_or_path"],
            "reward": ["model_name_or_path"],
            "ppo": ["actor_model_name_or_path", "critic_model_name_or_path"],
        }[stage]
        for key in keys:
            value = getattr(config.stage(stage), key)
            if value and value not in upcoming and _looks_like_path(value):
                path = Path(os.path.expanduser(value))
                if not path.is_dir():
                    raise ConfigError(
                        f"{stage}.{key}",
                        value,
                        "no such model folder on this machine",
                        "check the path, or run the stage that produces it first",
                    )
        for path in config.data.data_path + config.data.sft_only_data_path:
            if _looks_like_path(path) and not Path(os.path.expanduser(path)).exists():
                raise ConfigError(
                    "data.data_path",
                    path,
                    "no such file or folder on this machine",
                    "check the path, or use `dschat-core data download` to fetch it",
                )

    def _check_not_finished(self, config: RunConfig, stage: str) -> None:
        section = config.stage(stage)
        out = Path(section.output_dir or "")
        if (out / FINISHED_MARKER).exists() and not section.overwrite:
            raise ConfigError(
                f"{stage}.output_dir",
                str(out),
                "holds a finished model already",
                f"choose another output_dir or run_name, or --set {stage}.overwrite=true",
            )

    # -- rendering ---------------------------------------------------------------------------------------------
    def environment(self, plan: LaunchPlan) -> dict[str, str]:
        settings: LocalSettings = self.settings(plan.config)
        env = {"PYTHONUNBUFFERED": "1"}
        if self.accelerator(plan.config) == "cpu":
            # Ranks fighting over the same cores run several times slower: split them.
            threads = settings.omp_num_threads or max(1, (os.cpu_count() or 1) // plan.procs_per_node)
            env["OMP_NUM_THREADS"] = str(threads)
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(settings.env)
        return env

    def command(self, plan: LaunchPlan) -> list[str]:
        settings: LocalSettings = self.settings(plan.config)
        port = plan.config.topology.master_port
        worker = plan.worker_args()  # ["-m", module, stage, ...]
        if settings.launcher == "deepspeed":
            return [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                f"--num_gpus={plan.procs_per_node}",
                f"--master_port={port or _free_port()}",
                "--module",
                *worker[1:],
            ]
        rendezvous = [f"--master_port={port}"] if port else ["--standalone"]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *rendezvous,
            "--nnodes=1",
            f"--nproc_per_node={plan.procs_per_node}",
            *worker,
        ]

    def render(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.environment(plan).items()))
        lines = [f"# starts once {' and '.join(after)} succeeded"] if after else []
        if plan.stage in STAGES:
            lines.append(f"# resolved config written to {plan.config_path} at submit")
        lines.append(f"{env} {shlex.join(self.command(plan))}")
        return "\n".join(lines) + "\n"

    # -- job records -------------------------------------------------------------------------------------------
    records = JobRecords("local")

    @staticmethod
    def _check_id(job_id: str) -> str:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise UserError(f"'{job_id}' is not a local job id; fix: use an id printed by `dschat-core train`")
        return job_id

    def _read(self, job_id: str) -> dict[str, Any]:
        record = self.records.read(self._check_id(job_id))
        if not record:
            raise UserError(
                f"no local job '{job_id}' (records are in {self.records.folder}); fix: check the id with `ls` there"
            )
        return record

    def _write(self, record: dict[str, Any]) -> None:
        self.records.write(self._check_id(record["job_id"]), record)

    def _update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        record = self._read(job_id)
        record.update(changes)
        self._write(record)
        return record

    # -- scheduling ----------------------------------------------------------------------------------------
    def submit(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        for dep in after or []:
            dep_status = self.status(dep)
            if not dep_status.succeeded:
                raise JobFailed(f"not starting {plan.stage}: it needs {dep_status.describe()} to succeed")
        if plan.stage in STAGES:
            write_config(plan.config, plan.config_path)
        job_id = f"{plan.job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        log_path = Path(self.storage(plan.config).logs(plan.config)) / f"{job_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command(plan)
        env = {**os.environ, **self.environment(plan)}
        record = {
            "job_id": job_id,
            "stage": plan.stage,
            "state": JobState.PENDING.value,
            "command": command,
            "log": str(log_path),
            "output_dir": plan.output_dir,
            "launcher_pid": os.getpid(),
            "pid": None,
            "returncode": None,
            "cancel_requested": False,
            "started": time.time(),
            "ended": None,
        }
        self._write(record)
        try:
            # A session of its own, so that cancel (and Ctrl-C here) can stop every rank at once.
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                text=True,
                errors="replace",
                bufsize=1,
            )
        except OSError as exc:
            self._update(job_id, state=JobState.FAILED.value, ended=time.time(), reason=str(exc))
            raise BackendError(f"could not start {command[0]}: {exc}") from None
        self._update(job_id, state=JobState.RUNNING.value, pid=proc.pid)
        interrupted = False
        # SIGTERM to this command stops the job like Ctrl-C (handlers can only be set in the main thread).
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
        try:
            with open(log_path, "a", encoding="utf-8") as log:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    sys.stdout.write(line)
                    sys.stdout.flush()
            proc.wait()
        except KeyboardInterrupt:
            interrupted = True
            _stop_group(proc.pid)
            proc.wait()
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
        cancelled = interrupted or self._read(job_id).get("cancel_requested")
        state = (
            JobState.SUCCEEDED
            if proc.returncode == 0 and not cancelled
            else (JobState.CANCELLED if cancelled else JobState.FAILED)
        )
        self._update(job_id, state=state.value, returncode=proc.returncode, ended=time.time())
        if interrupted:
            raise JobFailed(f"{job_id}: CANCELLED (interrupted); log: {log_path}")
        return job_id

    def status(self, job_id: str) -> JobStatus:
        record = self._read(job_id)
        state = JobState(record["state"])
        reason = ""
        if state is JobState.FAILED:
            reason = f"exit code {record.get('returncode')}; log: {record['log']}"
            if record.get("reason"):
                reason = record["reason"]
        elif (
            state in (JobState.RUNNING, JobState.PENDING)
            and not _alive(record.get("launcher_pid"))
            and not _alive(record.get("pid"))
        ):
            state, reason = JobState.UNKNOWN, "the launching process is gone without recording an outcome"
        details = {"stage": record["stage"], "log": record["log"], "output": record["output_dir"]}
        if record.get("ended"):
            details["duration_s"] = round(record["ended"] - record["started"], 1)
        return JobStatus(job_id, state, reason, details)

    def cancel(self, job_id: str) -> None:
        record = self._update(job_id, cancel_requested=True)
        if JobState(record["state"]).finished:
            raise UserError(f"{job_id} has already finished ({record['state']}); nothing to cancel")
        if _alive(record.get("pid")):
            _stop_group(record["pid"])
        deadline = time.monotonic() + CANCEL_GRACE_SECONDS
        while (
            time.monotonic() < deadline
            and _alive(record.get("launcher_pid"))
            and not JobState(self._read(job_id)["state"]).finished
        ):
            time.sleep(0.2)
        if not JobState(self._read(job_id)["state"]).finished:
            # The launching command is gone (or stuck): record the outcome ourselves.
            self._update(job_id, state=JobState.CANCELLED.value, ended=time.time())

    # -- logs --------------------------------------------------------------------------------------------------
    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        path = Path(self._read(job_id)["log"])
        return follow_log(path, lambda: self.status(job_id).finished, follow, poll_seconds=0.2)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_group(pid: int) -> None:
    """SIGTERM the launcher (torchrun forwards it to its ranks), then SIGKILL whatever of its process tree is
    left after a grace period. The tree is walked, not just the process group: torchrun starts each rank in a
    session of its own."""
    import psutil

    try:
        leader = psutil.Process(pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=CANCEL_GRACE_SECONDS)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
