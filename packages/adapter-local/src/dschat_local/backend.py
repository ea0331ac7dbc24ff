"""The ``local`` backend: torchrun (or the deepspeed launcher) on this machine, under a supervisor process.

Each job gets a record in the state folder (``$DSCHAT_STATE_DIR/local``, default ``~/.local/state/dschat/local``)
so that ``status``, ``logs`` and ``cancel`` work from another terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dschat_core.plugin import (
    ENV_NAME,
    ERROR_FILE_ENV,
    FINISHED_MARKER,
    STOP_FILE_ENV,
    Backend,
    BackendError,
    ConfigError,
    FinishedOutput,
    JobFailed,
    JobRecords,
    JobState,
    JobStatus,
    LaunchPlan,
    RunConfig,
    StoppedOnRequest,
    StorageLayout,
    UserError,
    check_cpu_stage,
    check_writable,
    checkpoints_dir,
    cpu_share,
    disk_full_at,
    follow_log,
    looks_secret,
    rank_environment,
    torchrun_args,
)

from .supervisor import KILL_GRACE_SECONDS, stop_tree
from .supervisor import alive as _alive


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
    stop_grace_seconds: int = Field(
        300, ge=0, description="A stopped training stage's time to checkpoint and exit before it is killed."
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not an environment variable name (letters, digits, '_')")
            if looks_secret(key):
                raise ValueError(
                    f"{key} looks like a secret, and env is printed by --dry-run and config show; export it in the "
                    "shell that runs dschat-core instead (the ranks inherit that environment)"
                )
        return value


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
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
    runs_here = True

    # -- storage and validation -----------------------------------------------------------------------------
    def storage(self, config: RunConfig) -> StorageLayout:
        return StorageLayout(os.path.abspath(os.path.expanduser(config.storage.root or ".")))

    def accelerator(self, config: RunConfig) -> str:
        wanted = config.topology.accelerator
        if wanted != "auto":
            return wanted
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def validate(self, plan: LaunchPlan, upcoming: frozenset[str] = frozenset()) -> None:
        config, stage = plan.config, plan.stage
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
            if count == 0:
                raise ConfigError(
                    "topology.accelerator",
                    topo.accelerator,
                    "this machine has no visible GPU",
                    "set topology.accelerator=cpu for CPU ranks, or run where the GPUs are",
                )
            if topo.gpus_per_node > count:
                raise ConfigError(
                    "topology.gpus_per_node",
                    topo.gpus_per_node,
                    f"this machine has {count} visible GPU(s)",
                    f"set topology.gpus_per_node to at most {count}",
                )
        else:
            check_cpu_stage(config, stage)
            cores = os.cpu_count() or 1
            if topo.gpus_per_node > cores:
                print(
                    f"warning: topology.gpus_per_node = {topo.gpus_per_node} CPU ranks on {cores} cores: each rank "
                    f"gets a fraction of a core and the run is slower than with fewer; fix: at most "
                    f"topology.gpus_per_node={cores}",
                    file=sys.stderr,
                )
        check_writable(self.storage(config).root, "storage.root")
        if topo.master_port and not _port_free(topo.master_port):
            raise ConfigError(
                "topology.master_port",
                topo.master_port,
                "is in use on this machine",
                "choose a free port, or leave it unset to get one",
            )
        if plan.trains:
            self._check_inputs(config, stage, upcoming)
            self._check_not_finished(config, stage)
            self._check_no_other_writer(plan)

    def _check_inputs(self, config: RunConfig, stage: str, upcoming: frozenset[str]) -> None:
        for key, value in config.model_inputs(stage).items():
            local = value and value not in upcoming and _looks_like_path(value)
            if local and not Path(os.path.expanduser(str(value))).is_dir():
                raise ConfigError(
                    key,
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

    def _check_no_other_writer(self, plan: LaunchPlan) -> None:
        """One writer per output: a job of this machine that waits or runs into the same folder is refused here,
        before anything starts (the workers' lock refuses writers from anywhere else)."""
        for path in self.records.folder.glob("*.json"):
            other = self.records.read(path.stem)
            active = other.get("state") in (JobState.PENDING.value, JobState.RUNNING.value)
            if active and other.get("output_dir") == plan.output_dir and _alive(other.get("supervisor_pid")):
                raise UserError(
                    f"{plan.stage}.output_dir = {plan.output_dir!r} is being written by local job {other['job_id']} "
                    f"({other['state']}); fix: wait for it (`dschat-core status {other['job_id']}`), cancel it, or "
                    "choose another output_dir or run_name"
                )

    def _check_not_finished(self, config: RunConfig, stage: str) -> None:
        section = config.stage(stage)
        out = Path(section.output_dir or "")
        if (out / FINISHED_MARKER).exists() and not section.overwrite:
            raise FinishedOutput(stage, str(out))

    # -- rendering ---------------------------------------------------------------------------------------------
    def environment(self, plan: LaunchPlan) -> dict[str, str]:
        settings: LocalSettings = self.settings(plan.config)
        cores = (settings.omp_num_threads or cpu_share(plan.procs_per_node)) * plan.procs_per_node
        env = rank_environment(plan.procs_per_node, self.accelerator(plan.config) == "cpu", cores)
        env.update(settings.env)
        return env

    def command(self, plan: LaunchPlan) -> list[str]:
        settings: LocalSettings = self.settings(plan.config)
        if settings.launcher == "deepspeed":
            port = plan.config.topology.master_port or _free_port()
            return [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                f"--num_gpus={plan.procs_per_node}",
                f"--master_port={port}",
                "--module",
                *plan.worker_args()[1:],
            ]
        return torchrun_args(plan)

    def render(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.environment(plan).items()))
        lines = [f"# starts once {' and '.join(after)} succeeded"] if after else []
        if plan.trains:
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
        """Start the job under its supervisor; with ``plan.detach`` return at once, else follow its log here
        until it ends (Ctrl-C or SIGTERM: a graceful stop; a second Ctrl-C: kill)."""
        after = after or []
        if not plan.detach:
            for dep in after:  # a foreground chain runs in order: its dependencies have ended
                dep_status = self.status(dep)
                if not dep_status.succeeded:
                    raise JobFailed(f"not starting {plan.stage}: it needs {dep_status.describe()} to succeed")
        plan.write_config()
        settings: LocalSettings = self.settings(plan.config)
        storage = self.storage(plan.config)
        job_id = f"{plan.job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        log_path = Path(storage.logs(plan.config)) / f"{job_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stop_file = str(log_path.with_suffix(".stop")) if plan.trains else None
        error_file = str(log_path.with_suffix(".error"))
        env = {**os.environ, **self.environment(plan), "DSCHAT_JOB_ID": job_id, ERROR_FILE_ENV: error_file}
        if stop_file:
            env[STOP_FILE_ENV] = stop_file
        record = {
            "job_id": job_id,
            "stage": plan.stage,
            "state": JobState.PENDING.value,
            "command": self.command(plan),
            "log": str(log_path),
            "output_dir": plan.output_dir,
            "run_dir": storage.run_dir(plan.config),
            "storage_root": storage.root,
            "after": after,
            "stop_file": stop_file,
            "error_file": error_file,
            "retries": plan.config.stage(plan.stage).retries if plan.trains else 0,
            "checkpoints": str(checkpoints_dir(plan.output_dir)) if plan.trains else "",
            "stop_grace_seconds": settings.stop_grace_seconds,
            "submitted": time.time(),
            "supervisor_pid": None,
            "pid": None,
            "returncode": None,
            "cancel_requested": False,
            "started": None,
            "ended": None,
        }
        self._write(record)
        with open(log_path, "ab") as log:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "dschat_local.supervisor", job_id],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._update(job_id, supervisor_pid=supervisor.pid)
        if not plan.detach:
            print(
                f"dschat: {plan.stage}: job {job_id} (log {log_path}; from another terminal: dschat-core "
                f"status|logs|cancel {job_id})",
                file=sys.stderr,
                flush=True,
            )
            self._follow_in_foreground(job_id, supervisor)
        return job_id

    def _follow_in_foreground(self, job_id: str, supervisor: subprocess.Popen) -> None:
        """Print the job's log until it ends. Ctrl-C, SIGTERM and SIGHUP (a closed terminal or SSH session) ask
        the job to checkpoint and stop, and so does losing the output (the reader of `train … | tee log` dies with
        Ctrl-C too): the job never runs on unwatched. A second Ctrl-C kills it."""
        interrupted, printing = False, True

        def request_stop() -> None:
            _tell(
                "dschat: stopping: a training stage checkpoints at its next step (Ctrl-C again to kill)",
            )
            with contextlib.suppress(UserError, BackendError):  # a full disk: the supervisor is told all the same
                self._update(job_id, cancel_requested=True)
            supervisor.send_signal(signal.SIGTERM)

        # SIGTERM and SIGHUP stop the job like Ctrl-C (handlers can only be set in the main thread).
        in_main = threading.current_thread() is threading.main_thread()
        handlers = {signal.SIGTERM: _raise_interrupt, signal.SIGHUP: _raise_hang_up}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()} if in_main else {}

        def kill_now() -> None:
            stop_tree(supervisor.pid, grace=0)
            if _alive(self._read(job_id).get("pid")):
                stop_tree(self._read(job_id)["pid"], grace=0)
            self._update(job_id, state=JobState.CANCELLED.value, ended=time.time(), reason="killed (interrupted twice)")

        try:
            lines = self.logs(job_id, follow=True)
            quiet = LauncherNoise()
            while True:
                # Two levels: a closed terminal fails a write (OSError) and sends SIGHUP at once, so the HangUp can
                # land inside the OSError's handling; the outer level takes it there too.
                try:
                    try:
                        for line in lines:
                            if printing and quiet.shows(line):
                                sys.stdout.write(line)
                                sys.stdout.flush()
                        break
                    except OSError:  # the output is gone (a dead pipe reader, a hung-up terminal): stop, quietly
                        printing = False
                        _discard_output(stderr=False)
                        if not interrupted:
                            interrupted = True
                            request_stop()
                except KeyboardInterrupt as exc:
                    if isinstance(exc, HangUp):  # the terminal is gone: nothing can be shown any more
                        printing = False
                        _discard_output()
                        if interrupted:
                            continue
                    if interrupted:  # the second one: now
                        kill_now()
                        break
                    interrupted = True
                    request_stop()
            while True:
                try:
                    supervisor.wait()
                    break
                except HangUp:  # while the job stops: it stops all the same, unseen
                    _discard_output()
                except KeyboardInterrupt:
                    if interrupted:  # a second Ctrl-C while the job stops: now
                        kill_now()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if interrupted:
            status = self.status(job_id)
            error = StoppedOnRequest if "checkpoint saved" in status.reason else JobFailed
            raise error(f"{status.describe()}; log: {self._read(job_id)['log']}")

    def status(self, job_id: str) -> JobStatus:
        record = self._read(job_id)
        state = JobState(record["state"])
        reason = record.get("reason") or ""
        if state is JobState.FAILED and not reason:
            reason = f"exit code {record.get('returncode')}; log: {record['log']}"
        elif (
            state in (JobState.RUNNING, JobState.PENDING)
            and not _alive(record.get("supervisor_pid"))
            and not _alive(record.get("pid"))
        ):
            # Over, and not a success: nothing runs that could still finish it (a waiting command stops here).
            full = disk_full_at(str(Path(record["log"]).parent), str(self.records.folder))
            if full:
                state, reason = (
                    JobState.FAILED,
                    f"{full}: the job and its supervisor could not write (checkpoint, log, job record); the last "
                    f"complete checkpoint is kept; fix: free space there, then run the same command to resume",
                )
            else:
                state, reason = (
                    JobState.UNKNOWN,
                    "its supervisor is gone without recording an outcome (killed with its machine or by hand); "
                    f"the log tells how far it got: {record['log']}",
                )
        details = {"stage": record["stage"], "log": record["log"], "output": record["output_dir"]}
        if record.get("after"):
            details["after"] = ", ".join(record["after"])
        if record.get("attempts"):
            details["attempts"] = (
                "; ".join(f"#{a['attempt']} exit {a['returncode']}: {a['reason']}" for a in record["attempts"])
                + f"; now #{record.get('attempt')}"
            )
        if record.get("ended") and record.get("started"):
            details["duration_s"] = round(record["ended"] - record["started"], 1)
        return JobStatus(job_id, state, reason, details).with_error_of_ranks(record.get("error_file"), record["log"])

    def cancel(self, job_id: str) -> None:
        record = self._update(job_id, cancel_requested=True)
        if JobState(record["state"]).finished:
            raise UserError(f"{job_id} has already finished ({record['state']}); nothing to cancel")
        if _alive(record.get("supervisor_pid")):
            os.kill(record["supervisor_pid"], signal.SIGTERM)
            deadline = time.monotonic() + record.get("stop_grace_seconds", 0) + KILL_GRACE_SECONDS + 10
            while time.monotonic() < deadline and not JobState(self._read(job_id)["state"]).finished:
                time.sleep(0.2)
        elif _alive(record.get("pid")):
            stop_tree(record["pid"])
        if not JobState(self._read(job_id)["state"]).finished:
            # The supervisor is gone (or stuck): record the outcome ourselves.
            if _alive(self._read(job_id).get("pid")):
                stop_tree(self._read(job_id)["pid"])
            self._update(job_id, state=JobState.CANCELLED.value, ended=time.time())

    # -- logs --------------------------------------------------------------------------------------------------
    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        path = Path(self._read(job_id)["log"])

        def ended() -> bool:  # UNKNOWN here: supervisor and ranks are gone, nothing will be written any more
            state = self.status(job_id).state
            return state.finished or state is JobState.UNKNOWN

        return follow_log(path, ended, follow, poll_seconds=0.2)


class LauncherNoise:
    """What the console leaves out of a followed job log (the log keeps every line): the ranks' own error lines
    and torchrun's report of a failed worker (a Python traceback of the launcher, then a framed summary), since the
    command ends with the ranks' one-line error instead."""

    _ELASTIC = re.compile(r"^[WEI]\d{4} [\d:.]+ +\d+ .*torch/distributed/elastic/")
    #: DeepSpeed says this each time a rank loads an op it built long ago: nothing happened worth a line.
    _OP_LOADED = re.compile(r"^DeepSpeed deepspeed\.ops\.\S+ built successfully$")

    def __init__(self) -> None:
        self.in_report = False
        self.frames = 0

    def shows(self, line: str) -> bool:
        if self.in_report:
            if line.startswith("====="):
                self.frames += 1
                self.in_report = self.frames < 2
            return False
        if self._ELASTIC.match(line):
            self.in_report = "failed (exitcode" in line
            self.frames = 0
            return False
        return not (re.match(r"^(\[rank \d+\] )?error: ", line) or self._OP_LOADED.match(line.rstrip("\n")))


class HangUp(KeyboardInterrupt):
    """SIGHUP: the terminal (or SSH session) is gone."""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _raise_hang_up(signum: int, frame: object) -> None:
    raise HangUp


def _discard_output(stderr: bool = True) -> None:
    """Stdout (and stderr) go nowhere from now on, what is left in their buffers too: a write to a dead terminal
    or pipe would fail again at exit and turn the job's exit code into 1 or 120."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr) if stderr else (sys.stdout,):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _tell(message: str) -> None:
    """A line to the person at the terminal, if the terminal is still there."""
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)
