"""The whole public plugin contract of dschat (pluggy project ``dschat``, entry-point group ``dschat``).

A plugin is a module or object with functions marked ``@hookimpl``. Each hook hands the plugin a
``register`` callback (or the CLI group), so the contract can grow without breaking existing plugins.
The core's own behaviour is registered the same way (``dschat_core.builtins``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from .backend import Backend
    from .data.formats import DatasetFormat
    from .environments import Environment
    from .rewards import RewardFunction
    from .tracking import MetricSink

hookspec = pluggy.HookspecMarker("dschat")
hookimpl = pluggy.HookimplMarker("dschat")


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Register launch backends by calling ``register(backend)`` with :class:`dschat_core.backend.Backend`
    instances.

    A backend owns everything platform-specific: **scheduling** (``render`` what would be submitted,
    ``submit`` a launch plan, chained after other jobs through ``submit(plan, after=[...])``, ``status``,
    ``wait``, ``cancel``), **storage paths** (``storage(config)``: where models, datasets, caches,
    checkpoints and outputs live on the platform) and **log collection** (``logs(job_id, follow)``).
    Its ``config_model`` validates the run config's ``backends.<name>`` section.
    """


@hookspec
def register_dataset_formats(register: Callable[[DatasetFormat], None]) -> None:
    """Register dataset formats by calling ``register(fmt)`` with
    :class:`dschat_core.data.formats.DatasetFormat` instances.

    A format maps the rows of a dataset to (prompt, chosen, rejected) triples and says which hub names
    or local folders it reads, so a user can add a dataset without editing the core.
    """


@hookspec
def register_reward_functions(register: Callable[[RewardFunction], None]) -> None:
    """Register stage-3 reward functions by calling ``register(fn)`` with :class:`dschat_core.rewards.RewardFunction`
    instances: a name, ``fn(prompt, answer, row, **settings) -> float`` and whether it is a verifier (1.0 right,
    0.0 wrong). A run config names them under ``ppo.reward_functions`` with weights; the built-ins (exact and
    normalised match against a reference, GSM8K's final number, regex and format checks, the tiny task's judge)
    are registered the same way.
    """


@hookspec
def register_environments(register: Callable[[Environment], None]) -> None:
    """Register stage-3 environments by calling ``register(env)`` with :class:`dschat_core.environments.Environment`
    instances: a name ``ppo.environment.name`` uses, ``start(row, **settings)`` returning an episode whose
    ``step(turn_text)`` answers each model turn with an observation, whether it is done and an optional reward, and
    the stop strings that end a turn. The built-in calculator is registered the same way (docs/environments.md).
    """


@hookspec
def register_metric_sinks(register: Callable[[MetricSink], None]) -> None:
    """Register places metrics go by calling ``register(sink)`` with :class:`dschat_core.tracking.MetricSink`
    instances: a name the run config's ``tracking.sinks`` uses, and ``start(context)`` returning an object with
    ``log(step, values)`` and ``close()`` (global rank 0 only). The built-ins (jsonl, tensorboard, wandb, mlflow)
    are registered the same way.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add platform-specific subcommands to the ``dschat-core`` CLI group (e.g. ``dschat-core t9k download``)."""
