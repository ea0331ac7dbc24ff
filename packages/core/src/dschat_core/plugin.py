"""Everything a backend (or any other plugin) needs from the core, in one public module.

A backend package imports from here only; docs/backends/writing.md builds a complete one. What the core expects
of a backend, beyond the :class:`Backend` methods:

- **The config reaches the workers.** Call ``plan.write_config()`` before starting a training stage's job and run
  ``plan.worker_args()`` on every rank (it reads ``--config FILE``), or run ``plan.worker_args(inline_config=True)``
  where nothing can be written first (the config travels in the command line).
- **Training stages are** ``plan.trains``; ``preflight`` reads no config and writes no output.
- **Ranks**: ``torchrun_args(plan)`` is the launch command (a c10d rendezvous across nodes, its endpoint in
  ``PET_RDZV_ENDPOINT``); ``rank_environment(...)`` the environment of every rank (``cpu_share`` splits this
  machine's cores between ranks).
- **Stopping**: set ``STOP_FILE_ENV`` to a path for every rank and create that file to ask a running stage to
  checkpoint and exit; the workers then write ``<path>`` + ``STOP_ACK_SUFFIX`` and exit with ``EXIT_STOPPED``
  (SIGTERM to the ranks does the same). The workers write ``<path>`` + ``TRAINING_SUFFIX`` when their training
  loop starts: before that there is nothing to checkpoint, and the job may be ended at once.
- **The ranks' error**: set ``ERROR_FILE_ENV`` to a path for every rank; a rank that fails leaves its one-line
  error there, and ``JobStatus.with_error_of_ranks(path)`` makes it the job's reason (and exit code 2 for bad
  input), instead of the launcher's traceback.
- **Secrets** come from the platform's secret store: refuse ``env`` entries that ``looks_secret`` (a job's
  rendered text is read by many).
- **Errors for people**: raise :class:`UserError` / :class:`ConfigError` for bad input (exit code 2),
  :class:`BackendError` when the platform refuses, :class:`JobFailed` when a job or a dependency failed.

Other plugins import from here too: ``RewardFunction`` (docs/rewards.md) and ``MetricSink`` (docs/tracking.md).

``dschat_core.testing.BackendContract`` is a pytest class a backend's tests subclass to check all of this.
"""

from __future__ import annotations

from .backend import (
    ENV_NAME,
    FINISHED_MARKER,
    WORKER_MODULE,
    Backend,
    JobRecords,
    JobState,
    JobStatus,
    LaunchPlan,
    StorageLayout,
    check_writable,
    disk_full_at,
    follow_log,
    looks_secret,
    rank_environment,
    state_dir,
    torchrun_args,
)
from .config import RunConfig, decode_config, encode_config, write_config
from .environments import Environment, Episode, Step
from .errors import (
    ERROR_FILE_ENV,
    EXIT_BAD_INPUT,
    EXIT_STOPPED,
    MISSING,
    BackendError,
    ConfigError,
    FinishedOutput,
    JobFailed,
    StoppedOnRequest,
    UserError,
)
from .hookspecs import hookimpl
from .launch import check_cpu_stage
from .rewards import RewardFunction
from .tracking import MetricSink, SinkContext
from .training.checkpoints import checkpoints_dir
from .training.distributed import cpu_share
from .training.stopping import STOP_ACK_SUFFIX, STOP_FILE_ENV, TRAINING_SUFFIX

__all__ = [
    "ERROR_FILE_ENV",
    "ENV_NAME",
    "EXIT_BAD_INPUT",
    "EXIT_STOPPED",
    "FINISHED_MARKER",
    "MISSING",
    "STOP_ACK_SUFFIX",
    "STOP_FILE_ENV",
    "TRAINING_SUFFIX",
    "WORKER_MODULE",
    "Backend",
    "BackendError",
    "ConfigError",
    "Environment",
    "Episode",
    "FinishedOutput",
    "JobFailed",
    "JobRecords",
    "JobState",
    "JobStatus",
    "LaunchPlan",
    "MetricSink",
    "RewardFunction",
    "RunConfig",
    "SinkContext",
    "Step",
    "StoppedOnRequest",
    "StorageLayout",
    "UserError",
    "check_cpu_stage",
    "check_writable",
    "checkpoints_dir",
    "cpu_share",
    "decode_config",
    "disk_full_at",
    "encode_config",
    "follow_log",
    "hookimpl",
    "looks_secret",
    "rank_environment",
    "state_dir",
    "torchrun_args",
    "write_config",
]
