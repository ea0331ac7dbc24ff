"""The ``slurm`` backend: one sbatch script per stage.

The script runs one ``srun`` task per node, each starting torchrun, which starts ``procs_per_node`` workers; the
nodes meet at a c10d rendezvous on the job's first host. Stage 3 waits for stages 1 and 2 through
``--dependency=afterok``. Preemption: Slurm sends SIGUSR1 to the batch shell ``preempt_signal_seconds`` before the
time limit (or when an operator does ``scancel --signal=USR1 --batch``); the script creates the stop file named by
``$DSCHAT_STOP_FILE``, the workers checkpoint and exit with code 75, and the script requeues the job, which then
resumes from that checkpoint (``resume: auto``).

Every value from the config that reaches the script is shell-quoted; environment setup is structured (modules,
virtualenv, variables), never free shell text.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dschat_core.plugin import (
    ERROR_FILE_ENV,
    STOP_ACK_SUFFIX,
    STOP_FILE_ENV,
    Backend,
    BackendError,
    JobRecords,
    JobState,
    JobStatus,
    LaunchPlan,
    RunConfig,
    StorageLayout,
    UserError,
    check_cpu_stage,
    check_writable,
    checkpoints_dir,
    follow_log,
    looks_secret,
    rank_environment,
    torchrun_args,
)

_SBATCH_KEY = re.compile(r"^--?[A-Za-z][-A-Za-z0-9]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


class SlurmSettings(BaseModel):
    """The run config's ``backends.slurm`` section."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(None, description="`#SBATCH --partition`.")
    account: str | None = Field(None, description="`#SBATCH --account`.")
    qos: str | None = Field(None, description="`#SBATCH --qos`.")
    time: str | None = Field(None, description="Time limit, Slurm's format (`2-00:00:00`, `90`).")
    mem: str | None = Field(None, description="Memory per node (`200G`); `0` means all of it.")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs for the one task per node (all its ranks).")
    extra_directives: dict[str, str] = Field(
        default_factory=dict, description="More `#SBATCH` options, e.g. `{--exclusive: '', --constraint: a100}`."
    )
    modules: list[str] = Field(default_factory=list, description="`module load` these before starting.")
    venv: str | None = Field(None, description="A virtualenv on the nodes to activate before starting.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for every rank.")
    python: str = Field("python3", description="The Python on the nodes that has dschat-core installed.")
    master_addr: str | None = Field(
        None, description="Rendezvous host for several nodes; default: the job's first node as Slurm names it."
    )
    preempt_signal_seconds: int = Field(
        120, ge=0, description="Seconds before the time limit to checkpoint and requeue; 0 turns preemption off."
    )
    requeue: bool = Field(True, description="Let Slurm requeue the job when it is preempted.")

    @field_validator("extra_directives")
    @classmethod
    def _directive_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _SBATCH_KEY.match(key):
                raise ValueError(f"{key!r} is not an sbatch option name such as --constraint")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not an environment variable name")
            if looks_secret(key):
                raise ValueError(
                    f"{key} looks like a secret, and env is written into the job script; export it in the shell "
                    "that runs dschat-core instead (sbatch passes that environment to the job)"
                )
        return value

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: str | None) -> str | None:
        if value is not None and not _MEM.match(value):
            raise ValueError("use Slurm's memory format: a number with an optional unit K, M, G or T (`200G`; 0: all)")
        return value

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not _TIME.match(value):
            raise ValueError("use Slurm's time format: minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
        return value


#: Slurm's job states -> ours. Anything not listed is RUNNING-like until it ends.
_STATES = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.SUCCEEDED,
    "CANCELLED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "REVOKED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
}


def _q(value: object) -> str:
    return shlex.quote(str(value))


class SlurmBackend(Backend):
    name = "slurm"
    config_model = SlurmSettings

    # -- storage and validation -----------------------------------------------------------------------------
    def storage(self, config: RunConfig) -> StorageLayout:
        # Relative roots are resolved here, on the submitting host: the nodes must see the same shared path.
        return StorageLayout(os.path.abspath(os.path.expanduser(config.storage.root or ".")))

    def validate(self, plan: LaunchPlan, upcoming: frozenset[str] = frozenset()) -> None:
        self.settings(plan.config)
        if plan.config.topology.accelerator == "cpu":
            check_cpu_stage(plan.config, plan.stage)

    # -- rendering ---------------------------------------------------------------------------------------------
    def _gpus(self, plan: LaunchPlan) -> bool:
        return plan.config.topology.accelerator != "cpu"

    def log_path(self, plan: LaunchPlan) -> str:
        # %j: Slurm's job id; a requeued job appends to the same file (--open-mode=append).
        return str(Path(self.storage(plan.config).logs(plan.config)) / f"{plan.job_name}-%j.log")

    def directives(self, plan: LaunchPlan) -> list[tuple[str, str]]:
        settings: SlurmSettings = self.settings(plan.config)
        items = [
            ("--job-name", plan.job_name),
            ("--nodes", str(plan.nodes)),
            ("--ntasks-per-node", "1"),
            ("--output", self.log_path(plan)),
            ("--open-mode", "append"),
        ]
        if self._gpus(plan):
            items.append(("--gpus-per-node", str(plan.procs_per_node)))
        optional = {
            "--partition": settings.partition,
            "--account": settings.account,
            "--qos": settings.qos,
            "--time": settings.time,
            "--mem": settings.mem,
            "--cpus-per-task": settings.cpus_per_task,
        }
        items += [(key, str(value)) for key, value in optional.items() if value is not None]
        if settings.preempt_signal_seconds and plan.trains:
            items.append(("--signal", f"B:USR1@{settings.preempt_signal_seconds}"))
        items.append(("--requeue" if settings.requeue else "--no-requeue", ""))
        items += sorted(settings.extra_directives.items())
        return items

    def environment(self, plan: LaunchPlan) -> dict[str, str]:
        settings: SlurmSettings = self.settings(plan.config)
        env = rank_environment(plan.procs_per_node, not self._gpus(plan), settings.cpus_per_task)
        env.update(settings.env)
        return env

    def error_path(self, plan: LaunchPlan) -> str:
        """Where the ranks leave their one-line error (the job id and ``.error`` follow)."""
        return str(Path(self.storage(plan.config).logs(plan.config)) / plan.job_name)

    def sbatch_args(self, after: list[str] | None) -> list[str]:
        if not after:
            return ["sbatch", "--parsable"]
        return ["sbatch", "--parsable", f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]

    def render(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        settings: SlurmSettings = self.settings(plan.config)
        lines = [
            "#!/bin/bash",
            f"# dschat {plan.stage}: {plan.nodes} node(s) x {plan.procs_per_node} rank(s)",
            f"# submitted with: {' '.join(self.sbatch_args(after))} SCRIPT",
        ]
        for key, value in self.directives(plan):
            lines.append(f"#SBATCH {key}={_q(value)}" if value else f"#SBATCH {key}")
        lines += ["", "set -uo pipefail"]
        for module in settings.modules:
            lines.append(f"module load {_q(module)}")
        if settings.venv:
            lines.append(f"source {_q(str(Path(settings.venv) / 'bin' / 'activate'))}")
        port = plan.config.topology.master_port
        if plan.nodes > 1:
            head = (
                _q(settings.master_addr)
                if settings.master_addr
                else '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
            )
            lines.append(f"head={head}")
            lines.append(f"port={port}" if port else "port=$(( 20000 + SLURM_JOB_ID % 20000 ))")
            # torchrun's c10d rendezvous on the job's first host (torchrun reads options from PET_* variables).
            lines += ['export PET_RDZV_ENDPOINT="$head:$port"', 'export PET_RDZV_ID="$SLURM_JOB_ID"']
        for key, value in sorted(self.environment(plan).items()):
            lines.append(f"export {key}={_q(value)}")
        command = shlex.join(torchrun_args(plan, settings.python))
        lines.append(f'export {ERROR_FILE_ENV}={_q(self.error_path(plan))}."$SLURM_JOB_ID".error')
        if plan.trains:
            stop_file = str(Path(self.storage(plan.config).logs(plan.config)) / f"{plan.job_name}")
            lines += [
                "",
                "# Preemption: on SIGUSR1 the workers checkpoint and exit; then the job requeues itself.",
                f'export {STOP_FILE_ENV}={_q(stop_file)}."$SLURM_JOB_ID".stop',
                f'rm -f "${STOP_FILE_ENV}" "${STOP_FILE_ENV}{STOP_ACK_SUFFIX}"',
                f"trap 'touch \"${STOP_FILE_ENV}\"' USR1",
            ]
        run = [
            f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 {command} &",
            "srun_pid=$!",
            'wait "$srun_pid"; status=$?',
            "# wait returns early when the trapped signal arrives: keep waiting for srun itself.",
            'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; status=$?; done',
        ]
        retries = plan.config.stage(plan.stage).retries if plan.trains else 0
        lines += [""] + (self.retry_loop(plan, run, retries) if retries else run)
        if plan.trains:
            acknowledged = f'"${STOP_FILE_ENV}{STOP_ACK_SUFFIX}"'
            lines += [
                "# The workers acknowledge a clean stop (exit code 75 does not survive torchrun).",
                f"if [ -e {acknowledged} ]; then",
                '    echo "dschat: checkpoint saved on request; requeueing job $SLURM_JOB_ID"',
                f'    rm -f "${STOP_FILE_ENV}" {acknowledged}',
                "    # Slurm ends this script as part of the requeue: exiting first (even when the kill reaches",
                "    # a child before this shell) would race it and could record the run as failed, not requeued.",
                '    if scontrol requeue "$SLURM_JOB_ID"; then',
                "        while :; do sleep 5; done",
                "    fi",
                "fi",
            ]
        lines.append('exit "$status"')
        return "\n".join(lines) + "\n"

    def retry_loop(self, plan: LaunchPlan, run: list[str], retries: int) -> list[str]:
        """Run again from the last checkpoint after a failure, up to ``retries`` times, but not after failing as
        the attempt before did (the same error at the same checkpoint: a deterministic bug)."""
        latest = _q(str(checkpoints_dir(plan.output_dir) / "latest"))
        errors = f'"${ERROR_FILE_ENV}".rank*'
        return [
            f"# Automatic retries ({plan.stage}.retries = {retries}), each resuming from the last checkpoint.",
            'attempt=1; previous=""',
            "while :; do",
            f"    rm -f {errors}",
            *[f"    {line}" for line in run],
            f'    stopped="${STOP_FILE_ENV}{STOP_ACK_SUFFIX}"',
            f'    if [ "$status" -eq 0 ] || [ -e "$stopped" ] || [ "$attempt" -gt {retries} ]; then',
            "        break",
            "    fi",
            f'    failure="$(cat {errors} 2>/dev/null | head -c 4000)|$(cat {latest} 2>/dev/null)"',
            '    if [ "$failure" = "$previous" ]; then',
            '        echo "dschat: attempt $attempt failed as the one before, at the same step: not retrying"',
            "        break",
            "    fi",
            f'    echo "dschat: attempt $attempt of {retries + 1} failed (exit code $status); retrying from the last '
            'checkpoint"',
            '    previous="$failure"; attempt=$((attempt + 1))',
            "done",
        ]

    # -- job records -------------------------------------------------------------------------------------------
    records = JobRecords("slurm")

    def _record(self, job_id: str) -> dict[str, Any]:
        if not job_id.isdigit():
            raise UserError(f"'{job_id}' is not a Slurm job id; fix: use the number printed by `dschat-core train`")
        return self.records.read(job_id)

    # -- scheduling ----------------------------------------------------------------------------------------
    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if shutil.which(args[0]) is None:
            raise BackendError(
                f"{args[0]} not found: run dschat-core on a Slurm login node (or put Slurm's "
                "commands on PATH and set SLURM_CONF)"
            )
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise BackendError(f"{shlex.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def submit(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        check_writable(self.storage(plan.config).root, "storage.root")  # the shared folder, as this host sees it
        plan.write_config()
        logs = Path(self.storage(plan.config).logs(plan.config))
        logs.mkdir(parents=True, exist_ok=True)
        script = logs.parent / "scripts" / f"{plan.job_name}.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(self.render(plan, after))
        result = self._run([*self.sbatch_args(after), str(script)])
        job_id = result.stdout.strip().split(";")[0]
        record = {
            "job_id": job_id,
            "stage": plan.stage,
            "script": str(script),
            "log": self.log_path(plan).replace("%j", job_id),
            "output_dir": plan.output_dir,
            "storage_root": self.storage(plan.config).root,
            "error_file": f"{self.error_path(plan)}.{job_id}.error",
            "after": after or [],
            "submitted": time.time(),
        }
        self.records.write(job_id, record)
        return job_id

    def _slurm_state(self, job_id: str) -> tuple[str, str]:
        """(Slurm state, reason or exit code): squeue or scontrol while Slurm remembers the job, then sacct
        (accounting), then sacct -c (the job-completion log, where accounting is off). The accounting records are
        per run: a requeued job's last record is an earlier run's, so they are read only for jobs Slurm forgot."""
        queue = self._run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r"], check=False)
        if queue.returncode == 0 and queue.stdout.strip():
            state, _, reason = queue.stdout.strip().splitlines()[0].partition("|")
            return state, "" if reason in ("None", "(null)") else reason
        shown = self._run(["scontrol", "-o", "show", "job", job_id], check=False)
        found = re.search(r"\bJobState=(\S+).*?\bReason=(\S+)", shown.stdout) if shown.returncode == 0 else None
        if found:
            return found.group(1), "" if found.group(2) in ("None", "(null)") else found.group(2)
        for args in (
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"],
            ["sacct", "-c", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"],
        ):
            acct = self._run(args, check=False)
            rows = [r for r in acct.stdout.strip().splitlines() if r.strip()] if acct.returncode == 0 else []
            if rows:
                state, _, exit_code = rows[-1].partition("|")
                return state.split()[0], f"exit code {exit_code}" if exit_code not in ("", "0:0") else ""
        return "", ""

    def status(self, job_id: str) -> JobStatus:
        record = self._record(job_id)
        slurm_state, reason = self._slurm_state(job_id)
        details: dict[str, Any] = {k: record[k] for k in ("stage", "log", "output_dir") if k in record}
        if not slurm_state:
            return JobStatus(job_id, JobState.UNKNOWN, "Slurm no longer knows this job", details)
        state = _STATES.get(slurm_state, JobState.RUNNING)
        details["slurm_state"] = slurm_state
        if state in (JobState.PENDING, JobState.CANCELLED) and reason == "DependencyNeverSatisfied":
            return JobStatus(
                job_id,
                JobState.FAILED,
                f"a job it depends on ({', '.join(record.get('after', [])) or '?'}) did not succeed",
                details,
            )
        if state in (JobState.FAILED, JobState.CANCELLED):
            words = slurm_state if state is JobState.FAILED else "CANCELLED"
            reason = f"{words}{': ' + reason if reason else ''}" + (f"; log: {record['log']}" if record else "")
        return JobStatus(job_id, state, reason, details).with_error_of_ranks(
            record.get("error_file"), record.get("log")
        )

    def cancel(self, job_id: str) -> None:
        status = self.status(job_id)
        if status.state is JobState.UNKNOWN and not self._record(job_id):
            raise UserError(f"no Slurm job {job_id} is known here or to Slurm; nothing to cancel")
        if status.finished:
            raise UserError(f"{job_id} has already finished ({status.state.value}); nothing to cancel")
        self._run(["scancel", job_id])

    # -- logs --------------------------------------------------------------------------------------------------
    def _log_file(self, job_id: str) -> Path:
        record = self._record(job_id)
        if record.get("log"):
            return Path(record["log"])
        shown = self._run(["scontrol", "show", "job", job_id], check=False).stdout
        match = re.search(r"StdOut=(\S+)", shown)
        if not match:
            raise UserError(f"no log known for Slurm job {job_id}; fix: use a job submitted by dschat-core here")
        return Path(match.group(1))

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        return follow_log(self._log_file(job_id), lambda: self.status(job_id).finished, follow, poll_seconds=1.0)
