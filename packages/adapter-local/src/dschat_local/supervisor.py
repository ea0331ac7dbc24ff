"""The process that runs one local job: ``python -m dschat_local.supervisor JOB_ID``.

Started by ``submit`` in a session of its own, so the job outlives the command that submitted it (``--detach``)
and a terminal's Ctrl-C reaches only what the submitting command decides. It waits for the jobs the record
names in ``after`` (and for earlier jobs of the same run: one run's stages go one at a time), starts the launcher
with its output in the job's log, and records the outcome. SIGTERM (``cancel``, or Ctrl-C in the submitting
command) stops the job gracefully: a training stage gets the stop request (``DSCHAT_STOP_FILE``) and
``stop_grace_seconds`` to checkpoint and exit, then every process of the job gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dschat_core.errors import read_job_error
from dschat_core.plugin import EXIT_STOPPED, STOP_ACK_SUFFIX, TRAINING_SUFFIX, BackendError, JobRecords, JobState

POLL_SECONDS = 0.2
KILL_GRACE_SECONDS = 15.0
#: A job stopped before its training loop began gets this long after SIGTERM, then SIGKILL.
STARTING_GRACE_SECONDS = 3.0
records = JobRecords("local")


def alive(pid: int | None) -> bool:
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


def stop_tree(pid: int, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the process and everything it started, then SIGKILL what is left after ``grace`` seconds. The tree
    is walked, not just the process group: torchrun starts each rank in a session of its own."""
    import psutil

    try:
        leader = psutil.Process(pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, left = psutil.wait_procs(tree, timeout=grace)
    kill_now(left)


def kill_now(procs: list, timeout: float = 5) -> None:
    """SIGKILL each of ``procs`` (psutil processes) that is still there, and reap them."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=timeout)


class Descendants:
    """The processes an attempt started, remembered while it runs: when the launcher dies (SIGKILL, OOM killer) its
    ranks live on in sessions of their own, orphaned, and would train beside the retry into the same output."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, Any] = {}  # pid -> psutil.Process

    def look(self) -> None:
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)

    def kill_survivors(self) -> None:
        kill_now([p for p in self.seen.values() if p.is_running()], timeout=10)  # is_running checks identity


def update(job_id: str, **changes: Any) -> dict[str, Any]:
    record = records.read(job_id)
    record.update(changes)
    records.write(job_id, record)
    return record


class Supervisor:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.record = records.read(job_id)
        self.stop_asked = False
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop_asked = True

    def stopping(self) -> bool:
        return self.stop_asked or bool(records.read(self.job_id).get("cancel_requested"))

    def blocked_by(self) -> tuple[str, str] | None:
        """(job, state) of a dependency that did not succeed; raises nothing while they run."""
        for dep in self.record.get("after", []):
            state = JobState(records.read(dep).get("state", JobState.UNKNOWN.value))
            if state.finished and state is not JobState.SUCCEEDED:
                return dep, state.value
        return None

    def ready(self) -> bool:
        """Every dependency succeeded, and no earlier job of the same run is still waiting or running."""
        for dep in self.record.get("after", []):
            if records.read(dep).get("state") != JobState.SUCCEEDED.value:
                return False
        for path in records.folder.glob("*.json"):
            other = records.read(path.stem)
            if (
                other.get("run_dir") == self.record["run_dir"]
                and other.get("job_id") != self.job_id
                and other.get("submitted", 0) < self.record["submitted"]
                and other.get("state") in (JobState.PENDING.value, JobState.RUNNING.value)
                and alive(other.get("supervisor_pid"))
            ):
                return False
        return True

    def run(self) -> int:
        while not self.ready():
            if self.stopping():
                update(
                    self.job_id, state=JobState.CANCELLED.value, ended=time.time(), reason="cancelled before it started"
                )
                return 0
            blocked = self.blocked_by()
            if blocked:
                update(
                    self.job_id,
                    state=JobState.FAILED.value,
                    ended=time.time(),
                    reason=f"not started: it needs {blocked[0]} to succeed, which ended {blocked[1]}",
                )
                return 0
            time.sleep(POLL_SECONDS)
        attempts, previous = self.record.get("retries", 0) + 1, None
        returncode, stopped = 1, False
        for attempt in range(1, attempts + 1):
            started, stopped = self.attempt(attempt)
            if started is None:
                return 0  # could not start: recorded
            returncode = started
            if returncode == 0 or stopped or self.stopping() or attempt == attempts:
                break
            failure = self.failure()
            if failure == previous:
                self.say(f"attempt {attempt} failed as the one before, at the same step: not retrying ({failure[0]})")
                break
            previous = failure
            self.say(f"attempt {attempt} of {attempts} failed ({failure[0]}); retrying from the last checkpoint")
            update(
                self.job_id,
                attempts=[
                    *records.read(self.job_id).get("attempts", []),
                    {"attempt": attempt, "returncode": returncode, "reason": failure[0], "checkpoint": failure[1]},
                ],
            )
            for leftover in Path(self.record["error_file"]).parent.glob(Path(self.record["error_file"]).name + ".*"):
                leftover.unlink(missing_ok=True)
        self.finish(returncode, stopped=stopped)
        return 0

    def attempt(self, number: int) -> tuple[int | None, bool]:
        """Run the command once: (exit code, whether it was asked to stop); (None, False) if it could not start."""
        log_path = Path(self.record["log"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.record.get("stop_file"):  # this attempt announces its own training loop
            Path(f"{self.record['stop_file']}{TRAINING_SUFFIX}").unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            try:
                proc = subprocess.Popen(
                    self.record["command"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                update(
                    self.job_id,
                    state=JobState.FAILED.value,
                    ended=time.time(),
                    reason=f"could not start {self.record['command'][0]}: {exc}",
                )
                return None, False
            changes: dict[str, Any] = {"state": JobState.RUNNING.value, "pid": proc.pid, "attempt": number}
            if number == 1:
                changes["started"] = time.time()
            update(self.job_id, **changes)
            stop_started: float | None = None
            descendants = Descendants(proc.pid)
            while proc.poll() is None:
                descendants.look()
                if stop_started is None and self.stopping():
                    stop_started = time.monotonic()
                    self.ask_to_stop(proc)
                if stop_started is not None and time.monotonic() - stop_started > self.record["stop_grace_seconds"]:
                    stop_tree(proc.pid)
                time.sleep(POLL_SECONDS)
            descendants.kill_survivors()
        return proc.returncode, stop_started is not None

    def failure(self) -> tuple[str, str]:
        """What the attempt died of and the checkpoint it had reached: the same pair twice is a deterministic
        failure, not worth a third try."""
        found = read_job_error(self.record.get("error_file"))
        pointer = Path(self.record.get("checkpoints", "")) / "latest"
        step = pointer.read_text().strip() if pointer.is_file() else "none"
        return (found["message"] if found else "no error message (killed?)"), step

    def say(self, text: str) -> None:
        with open(self.record["log"], "a", encoding="utf-8") as log:
            log.write(f"dschat: {text}\n")

    def ask_to_stop(self, proc: subprocess.Popen) -> None:
        """A training stage checkpoints and exits on the stop request; one still starting (its training loop not
        begun: nothing to checkpoint), or anything else, is stopped at once."""
        stop_file = self.record.get("stop_file")
        if stop_file and Path(f"{stop_file}{TRAINING_SUFFIX}").exists():
            Path(stop_file).touch()
        else:
            stop_tree(proc.pid, grace=STARTING_GRACE_SECONDS)

    def finish(self, returncode: int, stopped: bool) -> None:
        ack = Path(f"{self.record.get('stop_file')}{STOP_ACK_SUFFIX}") if self.record.get("stop_file") else None
        changes: dict[str, Any] = {"returncode": returncode, "ended": time.time()}
        if stopped or self.stopping():
            changes["state"] = JobState.CANCELLED.value
            if ack is not None and ack.exists():
                changes["reason"] = (
                    f"stopped on request, checkpoint saved ({ack.read_text().strip()}); run the "
                    "same command again to resume"
                )
                if shorten_stopped_report(Path(self.record["log"])):
                    self.say("stopped on request: the ranks checkpointed and exited (torchrun's report of it cut)")
        else:
            changes["state"] = (JobState.SUCCEEDED if returncode == 0 else JobState.FAILED).value
        update(self.job_id, **changes)


_LAUNCHER_FAILED = re.compile(r"^E\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/\S+\] failed \(exitcode: ")
_RANK_EXIT = re.compile(r"^\s*exitcode\s*: (-?\d+)")


def shorten_stopped_report(log_path: Path) -> bool:
    """torchrun reports ranks that exit ``EXIT_STOPPED`` (stopped on request, checkpoint saved) as a failure: a
    traceback and a framed table at the end of the log. Where every rank in it exited so (or was sent SIGTERM by
    torchrun on its way out), cut the report (the caller writes one line instead); any other exit code leaves the
    log as it is. True if it was cut."""
    with open(log_path, "r+b") as log:
        raw = log.read().splitlines(keepends=True)
        lines = [line.decode("utf-8", errors="replace") for line in raw]
        start = next((i for i in range(len(lines) - 1, -1, -1) if _LAUNCHER_FAILED.match(lines[i])), None)
        if start is None:
            return False
        codes = [int(m.group(1)) for line in lines[start:] if (m := _RANK_EXIT.match(line))]
        # A rank still exiting when torchrun saw the first one go gets its SIGTERM (-15): a stop all the same.
        if EXIT_STOPPED not in codes or any(code not in (EXIT_STOPPED, -signal.SIGTERM) for code in codes):
            return False
        log.seek(sum(len(line) for line in raw[:start]))
        log.truncate()
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return Supervisor(args[0]).run()
    except BackendError as exc:  # its record cannot be written (a full disk): `status` tells the rest
        print(f"dschat: supervisor: {exc.format_message()}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
