"""Errors meant for people: one line, naming what is wrong and how to fix it."""

from __future__ import annotations

import click

#: Exit code for bad input (config, topology, data), as for a command-line usage error.
EXIT_BAD_INPUT = 2
#: Exit code of a worker that stopped on request (preemption) after saving a checkpoint: run it again to resume.
EXIT_STOPPED = 75


class UserError(click.ClickException):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""

    exit_code = EXIT_BAD_INPUT

    def format_message(self) -> str:
        return cut(" ".join(self.message.split("\n")), MAX_MESSAGE)


#: An error line stays readable: a value is shown up to ``MAX_VALUE`` characters, a whole line up to ``MAX_MESSAGE``.
MAX_VALUE = 200
MAX_MESSAGE = 2000


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


class ConfigError(UserError):
    """A run config that cannot be used: ``key = value: problem; fix``."""

    def __init__(self, key: str, value: object, problem: str, fix: str = "") -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        value = _masked(value)
        text = (
            f"config error: {key} = {cut(repr(value), MAX_VALUE)}: {cut(problem, MAX_VALUE * 2)}"
            if value is not _MISSING
            else (f"config error: {key}: {cut(problem, MAX_VALUE * 2)}")
        )
        if fix:
            text += f"; fix: {fix}"
        super().__init__(text)


def _masked(value: object) -> object:
    """A mapping's values under secret-looking names (``HF_TOKEN``) as ``***``: an error line is shown and logged."""
    if not isinstance(value, dict):
        return value
    from .backend import looks_secret

    return {k: "***" if isinstance(k, str) and looks_secret(k) else v for k, v in value.items()}


class FinishedOutput(ConfigError):
    """A stage's output folder holds a finished model, and the config does not say to replace it."""

    def __init__(self, stage: str, output_dir: str) -> None:
        self.stage = stage
        super().__init__(
            f"{stage}.output_dir",
            output_dir,
            "holds a finished model already",
            f"choose another output_dir or run_name, or --set {stage}.overwrite=true",
        )


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
MISSING = _MISSING


class JobFailed(click.ClickException):
    """A submitted job ended in a state other than success; exit code 1 (2 when its ranks found bad input)."""

    exit_code = 1


class JobFoundBadInput(JobFailed):
    """A job whose ranks refused their input (a config or data problem only they could see); exit code 2."""

    exit_code = EXIT_BAD_INPUT


def job_failed(message: str, exit_code: int = 1) -> JobFailed:
    """The exception a command waiting for a failed job raises: exit code 2 for bad input, else 1."""
    return JobFoundBadInput(message) if exit_code == EXIT_BAD_INPUT else JobFailed(message)


#: Where the ranks of a job leave their one-line error (``<path>.rank<R>``, JSON), for the backend to show.
ERROR_FILE_ENV = "DSCHAT_ERROR_FILE"


def write_job_error(message: str, exit_code: int, rank: int) -> None:
    import json
    import os

    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        tmp = f"{path}.rank{rank}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"message": message, "exit_code": exit_code, "rank": rank}, handle)
        os.replace(tmp, f"{path}.rank{rank}")
    except OSError:
        pass  # a read-only or full disk: the line is in the log


def read_job_error(path: str | None) -> dict | None:
    """The job's error as its ranks left it: rank 0's (a collective error reads the same everywhere; others may
    only say that rank 0 failed), else the lowest rank's; None when no rank left one."""
    import json
    from pathlib import Path

    if not path:
        return None
    base = Path(path)
    found = sorted(
        base.parent.glob(f"{base.name}.rank*"),
        key=lambda p: int(p.name.rsplit("rank", 1)[1] or 0) if p.name.rsplit("rank", 1)[1].isdigit() else 1 << 30,
    )
    for candidate in found:
        try:
            return json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
    return None


class StoppedOnRequest(JobFailed):
    """A job stopped cleanly when asked (Ctrl-C, SIGTERM, preemption), its checkpoint saved; exit code 75: run the
    same command again to resume."""

    exit_code = EXIT_STOPPED


class TrainingStopped(click.ClickException):
    """Training cannot go on (NaN or inf in a quantity that must be finite); exit code 1, the message says where."""

    exit_code = 1


class BackendError(click.ClickException):
    """The platform refused or failed an operation (API error, missing permission, command not found)."""

    exit_code = 1
