"""What a launch backend is: the object an adapter registers through ``register_backends``.

The core builds a :class:`LaunchPlan` per stage (what to run, on how many nodes and processes, with which
resolved config); the backend turns it into a platform job (a torchrun command, an sbatch script, a
DeepSpeedJob), submits it, and reports on it. Backends know nothing of training internals: every rank runs
``python -m dschat_core.worker STAGE --config FILE``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import shutil
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ValidationError

from .config import RunConfig, config_error_from, encode_config, write_config
from .errors import BackendError, read_job_error

WORKER_MODULE = "dschat_core.worker"

STAGE_OUTPUT_NAMES = {"sft": "actor", "reward": "reward", "ppo": "ppo", "dpo": "dpo"}

#: Written last into a stage's output folder: its presence means the stage finished there.
FINISHED_MARKER = "dschat-finished.json"


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobStatus:
    """A job's state as the platform reports it; ``reason`` says why it failed, in the platform's words."""

    job_id: str
    state: JobState
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 1
    """What a command waiting for a failed job exits with: 2 when its ranks found bad input, else 1."""

    def with_error_of_ranks(self, error_file: str | None, log: str | None = None) -> JobStatus:
        """A failed job's reason as its ranks said it (``DSCHAT_ERROR_FILE``), where they left it."""
        found = read_job_error(error_file) if self.state is JobState.FAILED else None
        if found:
            self.reason = found["message"] + (f"; log: {log}" if log else "")
            self.exit_code = int(found.get("exit_code", 1))
        return self

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def succeeded(self) -> bool:
        return self.state is JobState.SUCCEEDED

    def describe(self) -> str:
        text = f"{self.job_id}: {self.state.value}"
        return f"{text} ({self.reason})" if self.reason else text


@dataclass
class LaunchPlan:
    """One stage, ready to be rendered and submitted by a backend."""

    stage: str
    job_name: str
    config: RunConfig
    nodes: int
    procs_per_node: int
    output_dir: str
    config_path: str
    """Where the resolved config is (or will be) written, as seen by the workers."""
    detach: bool = False
    """Submit and return (``train --detach``): a backend whose jobs otherwise run in the foreground (local) starts
    them in the background, waiting there for the jobs in ``after``."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def trains(self) -> bool:
        """A training stage: it reads the resolved config, writes an output folder and checkpoints, and honours
        the stop protocol. ``preflight`` does none of these."""
        return self.stage != "preflight"

    def worker_args(self, inline_config: bool = False) -> list[str]:
        """Arguments after ``python``: the same on every platform. A training stage reads its config from
        ``config_path`` (the backend writes it there with :meth:`write_config` before the job starts) or, with
        ``inline_config``, from the command line itself (platforms where nothing can be written first)."""
        args = ["-m", WORKER_MODULE, self.stage]
        if self.trains:
            args += ["--config-data", encode_config(self.config)] if inline_config else ["--config", self.config_path]
        return args

    def write_config(self) -> None:
        """Write the resolved config where the workers read it (nothing for preflight)."""
        if self.trains:
            write_config(self.config, self.config_path)


def torchrun_args(plan: LaunchPlan, python: str = sys.executable) -> list[str]:
    """torchrun for ``plan``, ending in the worker's arguments. One node: a standalone rendezvous (or
    ``topology.master_port``). Several: a c10d rendezvous whose endpoint and id the platform supplies in
    ``PET_RDZV_ENDPOINT`` and ``PET_RDZV_ID`` (torchrun reads every option from a ``PET_`` variable)."""
    args = [python, "-m", "torch.distributed.run"]
    port = plan.config.topology.master_port
    if plan.nodes == 1:
        args += [f"--master_port={port}"] if port else ["--standalone"]
    else:
        args += ["--rdzv_backend=c10d"]
    return [*args, f"--nnodes={plan.nodes}", f"--nproc_per_node={plan.procs_per_node}", *plan.worker_args()]


#: An environment variable's name, as every shell takes it.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_SECRET_WORDS = {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS"}


def looks_secret(name: str) -> bool:
    """An environment variable that holds a credential by its name (``WANDB_API_KEY``, ``HF_TOKEN``): it must
    come from the platform's secret store, never from a value rendered into a job."""
    return any(word in _SECRET_WORDS for word in name.upper().split("_"))


def check_writable(path: str, key: str) -> None:
    """Refuse a folder the run could not write: a file in its place, or no permission where it would be made."""
    from .errors import ConfigError

    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(key, path, "is a file, not a folder", f"point {key} at a folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            key,
            path,
            f"cannot be written ({existing} is not writable by this user)",
            f"point {key} where you may write",
        )


#: ``auto``: each CPU rank uses its share of the cores it may run on (for platforms that know them only there).
CPU_THREADS_ENV = "DSCHAT_CPU_THREADS"


def rank_environment(procs_per_node: int, on_cpu: bool, cores: int | None = None) -> dict[str, str]:
    """The environment every rank needs: unbuffered output and, on CPU ranks, no GPU and the node's ``cores``
    split between its ranks (ranks fighting over the same cores run several times slower). Where the cores are
    known only on the node (``cores`` None), each rank splits the cores it may run on when it starts."""
    env = {"PYTHONUNBUFFERED": "1"}
    if on_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if cores:
            env["OMP_NUM_THREADS"] = str(max(1, cores // procs_per_node))
        else:
            env[CPU_THREADS_ENV] = "auto"
    return env


def state_dir(backend: str) -> Path:
    """Where a backend keeps its job records on the submitting machine: ``$DSCHAT_STATE_DIR/<backend>``, by
    default ``~/.local/state/dschat/<backend>``."""
    root = os.environ.get("DSCHAT_STATE_DIR") or Path.home() / ".local" / "state" / "dschat"
    return Path(root) / backend


class JobRecords:
    """A backend's job records on the submitting machine: one JSON file per job in :func:`state_dir`, so that
    ``status``, ``logs`` and ``cancel`` find a job by its id alone. Backends validate the id first."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    @property
    def folder(self) -> Path:
        return state_dir(self.backend)  # read when used: $DSCHAT_STATE_DIR may change after the backend is made

    def path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def read(self, job_id: str) -> dict[str, Any]:
        """The record, or {} when there is none; a damaged one (a crash mid-write by an older version, a full disk,
        a hand edit) is one line naming the file."""
        path = self.path(job_id)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise BackendError(f"the job record {path} is damaged ({exc}); fix: delete that file") from None
        if not isinstance(record, dict):
            raise BackendError(f"the job record {path} is damaged (not a JSON object); fix: delete that file")
        return record

    def recent(self, limit: int = 10, storage_root: str | None = None) -> list[str]:
        """The ids of the newest ``limit`` records, newest first; with ``storage_root``, only the jobs submitted
        with that storage root (records say so in ``storage_root``; older ones do not, and are left out)."""
        paths = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        if storage_root is not None:
            paths = [p for p in paths if self._root_of(p) == storage_root]
        return [p.stem for p in paths[:limit]]

    @staticmethod
    def _root_of(path: Path) -> str | None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None  # a damaged record shows under --all, where status names it
        return record.get("storage_root") if isinstance(record, dict) else None

    def write(self, job_id: str, record: dict[str, Any]) -> None:
        """Atomically: a reader never sees half a record. A full disk is one line (BackendError)."""
        path = self.path(job_id)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            full = disk_full_at(str(path.parent))
            raise BackendError(
                f"could not write the job record {path}: {full or exc.strerror}; fix: free space there (or set "
                "DSCHAT_STATE_DIR elsewhere)"
            ) from None


#: Below this many free bytes a filesystem counts as full (a write of a record or a checkpoint failed there).
FULL_BYTES = 1 << 20


def disk_full_at(*paths: str) -> str:
    """'disk full at PATH (N bytes free)' for the first of ``paths`` whose filesystem is (nearly) full, else ''."""
    for path in paths:
        place = Path(path)
        while not place.exists() and place != place.parent:
            place = place.parent
        try:
            free = shutil.disk_usage(place).free
        except OSError:
            continue
        if free < FULL_BYTES:
            return f"disk full at {path} ({free} bytes free)"
    return ""


def follow_log(path: Path, finished: Callable[[], bool], follow: bool, poll_seconds: float = 0.5) -> Iterator[str]:
    """Lines of a job's log file; with ``follow``, wait for the file and keep reading until ``finished()``. For
    backends whose jobs write a log file that this machine can read."""
    while follow and not path.exists() and not finished():
        time.sleep(poll_seconds)
    if not path.exists():
        raise BackendError(f"the job's log is not there: {path}")
    with open(path, encoding="utf-8", errors="replace") as log:
        while True:
            line = log.readline()
            if line:
                yield line
                continue
            if not follow or finished():
                yield from log.readlines()  # what was written between the last read and the end
                return
            time.sleep(poll_seconds)


class StorageLayout:
    """Where things live on a platform. Backends subclass to change the layout (T9K: the seed's PVC paths)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _join(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    @property
    def models(self) -> str:
        return self._join("models")

    @property
    def datasets(self) -> str:
        return self._join("datasets")

    @property
    def cache(self) -> str:
        return self._join("cache")

    def run_dir(self, config: RunConfig) -> str:
        return config.output_dir or self._join("runs", config.run_name)

    def stage_output(self, config: RunConfig, stage: str) -> str:
        """The final model folder of a stage (checkpoints go in its ``checkpoints/`` sibling)."""
        explicit = getattr(config.stage(stage), "output_dir", None) if stage in STAGE_OUTPUT_NAMES else None
        return explicit or str(PurePosixPath(self.run_dir(config), STAGE_OUTPUT_NAMES.get(stage, stage)))

    def logs(self, config: RunConfig) -> str:
        return str(PurePosixPath(self.run_dir(config), "logs"))

    def config_file(self, config: RunConfig, stage: str) -> str:
        return str(PurePosixPath(self.run_dir(config), "configs", f"{stage}.yaml"))


class Backend(ABC):
    """A platform that runs launch plans. Subclass, set ``name``, and register an instance."""

    name: str = ""
    #: pydantic model of the run config's ``backends.<name>`` section (None: the section must be empty).
    config_model: type[BaseModel] | None = None
    #: The ranks run in this Python environment (so a package missing here is missing there).
    runs_here: bool = False

    # -- configuration and storage ------------------------------------------------------------------------
    def settings(self, config: RunConfig) -> Any:
        """This backend's validated section of the run config."""
        raw = config.backends.get(self.name, {}) or {}
        if self.config_model is None:
            return raw
        try:
            return self.config_model.model_validate(raw)
        except ValidationError as exc:
            raise config_error_from(exc, self.config_model, raw, prefix=f"backends.{self.name}.") from None

    def storage(self, config: RunConfig) -> StorageLayout:
        """Storage paths on this platform; override for a platform layout."""
        return StorageLayout(config.storage.root or ".")

    def validate(self, plan: LaunchPlan, upcoming: frozenset[str] = frozenset()) -> None:
        """Refuse what this platform cannot run (raise :class:`~dschat_core.errors.UserError`); called for every
        stage before anything is submitted. ``upcoming`` holds the output folders that earlier stages of the
        same submission will create, so their absence now is no error."""
        self.settings(plan.config)

    # -- scheduling --------------------------------------------------------------------------------------------
    @abstractmethod
    def render(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        """Exactly what ``submit(plan, after)`` would submit (a command, a script, a manifest), for ``--dry-run``;
        there ``after`` holds placeholders such as ``<sft job>``."""

    @abstractmethod
    def submit(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        """Submit the plan and return its job id. ``after`` lists job ids that must succeed first: a
        platform with native dependencies uses them; otherwise the backend waits for them here and raises
        :class:`~dschat_core.errors.JobFailed` naming the one that failed. A backend whose jobs run in the
        foreground (local) returns once the job has ended."""

    @abstractmethod
    def status(self, job_id: str) -> JobStatus:
        """The job's current state."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop the job and every process it started."""

    # -- logs ------------------------------------------------------------------------------------------------
    @abstractmethod
    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """Lines of the job's training log; with ``follow``, keep yielding until the job ends."""

    def knows_job(self, job_id: str) -> bool:
        """Whether ``job_id`` was submitted through this backend from here (``status JOB`` without --backend); a
        backend that keeps :class:`JobRecords` in ``records`` gets this for free."""
        records = getattr(self, "records", None)
        safe = bool(job_id) and "/" not in job_id and not job_id.startswith(".")
        return isinstance(records, JobRecords) and safe and records.path(job_id).is_file()

    def recent_jobs(self, limit: int = 10, storage_root: str | None = None) -> list[str]:
        """Ids of this backend's latest jobs submitted from here, newest first (for ``dschat-core status`` without
        an id), only those of ``storage_root`` when given; a backend that keeps :class:`JobRecords` in ``records``
        (each record with its ``storage_root``) gets this for free."""
        records = getattr(self, "records", None)
        return records.recent(limit, storage_root) if isinstance(records, JobRecords) else []

    def wait(self, job_id: str, poll_seconds: float = 2.0, timeout: float | None = None) -> JobStatus:
        """Poll ``status`` until the job has finished (or ``timeout`` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            gone = status.state is JobState.UNKNOWN and self.runs_here  # nothing here can still finish it
            if status.finished or gone or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(poll_seconds)
