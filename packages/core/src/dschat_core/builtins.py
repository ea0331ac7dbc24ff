"""The core's own plugin: registered on every plugin manager, through the same hooks adapters use."""

from __future__ import annotations

from .data.conversations import CONVERSATIONAL_FORMATS
from .data.formats import BUILTIN_FORMATS
from .environments import BUILTIN_ENVIRONMENTS
from .hookspecs import hookimpl
from .rewards import BUILTIN_REWARD_FUNCTIONS
from .tracking import BUILTIN_SINKS


@hookimpl
def register_dataset_formats(register) -> None:
    for fmt in (*BUILTIN_FORMATS, *CONVERSATIONAL_FORMATS):
        register(fmt)


@hookimpl
def register_reward_functions(register) -> None:
    for function in BUILTIN_REWARD_FUNCTIONS:
        register(function)


@hookimpl
def register_metric_sinks(register) -> None:
    for sink in BUILTIN_SINKS:
        register(sink)


@hookimpl
def register_environments(register) -> None:
    for environment in BUILTIN_ENVIRONMENTS:
        register(environment)
