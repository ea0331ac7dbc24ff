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
        return " ".join(self.message.split("\n"))


class ConfigError(UserError):
    """A run config that cannot be used: ``key = value: problem; fix``."""

    def __init__(self, key: str, value: object, problem: str, fix: str = "") -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        text = (
            f"config error: {key} = {value!r}: {problem}"
            if value is not _MISSING
            else (f"config error: {key}: {problem}")
        )
        if fix:
            text += f"; fix: {fix}"
        super().__init__(text)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
MISSING = _MISSING


class JobFailed(click.ClickException):
    """A submitted job ended in a state other than success; exit code 1."""

    exit_code = 1


class TrainingStopped(click.ClickException):
    """Training cannot go on (NaN or inf in a quantity that must be finite); exit code 1, the message says where."""

    exit_code = 1


class BackendError(click.ClickException):
    """The platform refused or failed an operation (API error, missing permission, command not found)."""

    exit_code = 1
