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
  (SIGTERM to the ranks does the same).
- **Errors for people**: raise :class:`UserError` / :class:`ConfigError` for bad input (exit code 2),
  :class:`BackendError` when the platform refuses, :class:`JobFailed` when a job or a dependency failed.

``dschat_core.testing.BackendContract`` is a pytest class a backend's tests subclass to check all of this.
"""

from __future__ import annotations

from .backend import (
    FINISHED_MARKER,
    WORKER_MODULE,
    Backend,
    JobRecords,
    JobState,
    JobStatus,
    LaunchPlan,
    StorageLayout,
    follow_log,
    rank_environment,
    state_dir,
    torchrun_args,
)
from .config import RunConfig, decode_config, encode_config, write_config
from .errors import EXIT_BAD_INPUT, EXIT_STOPPED, MISSING, BackendError, ConfigError, JobFailed, UserError
from .hookspecs import hookimpl
from .launch import check_cpu_stage
from .training.distributed import cpu_share
from .training.stopping import STOP_ACK_SUFFIX, STOP_FILE_ENV

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_STOPPED",
    "FINISHED_MARKER",
    "MISSING",
    "STOP_ACK_SUFFIX",
    "STOP_FILE_ENV",
    "WORKER_MODULE",
    "Backend",
    "BackendError",
    "ConfigError",
    "JobFailed",
    "JobRecords",
    "JobState",
    "JobStatus",
    "LaunchPlan",
    "RunConfig",
    "StorageLayout",
    "UserError",
    "check_cpu_stage",
    "cpu_share",
    "decode_config",
    "encode_config",
    "follow_log",
    "hookimpl",
    "rank_environment",
    "state_dir",
    "torchrun_args",
    "write_config",
]
