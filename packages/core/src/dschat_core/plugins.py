"""The plugin manager: built-ins first, then installed adapters from the ``dschat`` entry-point group.

``DSCHAT_PLUGINS`` is an allow-list of entry-point names (comma-separated): when it is set, only those
installed plugins load (an empty value loads none), so a test or a locked-down site never picks up whatever
happens to be installed.
"""

from __future__ import annotations

import difflib
import importlib
import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import pluggy

from . import hookspecs
from .errors import UserError

if TYPE_CHECKING:
    from .backend import Backend
    from .data.formats import DatasetFormat
    from .environments import Environment
    from .rewards import RewardFunction
    from .tracking import MetricSink

PROJECT = "dschat"
ALLOW_ENV = "DSCHAT_PLUGINS"
BUILTIN_PLUGINS = ("dschat_core.builtins",)

#: Backends the project ships as separate packages, for the "install it" hint.
KNOWN_BACKEND_PACKAGES = {
    "local": "dschat-adapter-local",
    "slurm": "dschat-adapter-slurm",
    "t9k": "dschat-adapter-t9k",
}


def new_plugin_manager(load_installed: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the built-ins and, unless told otherwise, the allowed installed plugins."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_installed:
        allowed = os.environ.get(ALLOW_ENV)
        if allowed is None:
            pm.load_setuptools_entrypoints(PROJECT)
        else:
            names = {n.strip() for n in allowed.split(",") if n.strip()}
            for ep in entry_points(group=PROJECT):
                if ep.name in names and pm.get_plugin(ep.name) is None:
                    pm.register(ep.load(), name=ep.name)
    check_hooks(pm)
    return pm


def check_hooks(pm: pluggy.PluginManager) -> None:
    """A plugin function marked ``@hookimpl`` whose name is no hook (a typo) would register nothing, silently:
    refuse it, naming the plugin and the hooks there are."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        hooks = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))
        raise UserError(
            f"plugin {pm.get_name(exc.plugin)!r}: {exc}; fix: name the function after one of the hooks: {hooks}"
        ) from None


_current: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built on first use."""
    global _current
    if _current is None:
        _current = new_plugin_manager()
    return _current


def set_plugin_manager(pm: pluggy.PluginManager | None) -> None:
    """Replace the process-wide manager (tests register exactly the plugins they need); None resets it."""
    global _current
    _current = pm


def _collect(hook, kind: str) -> dict[str, object]:
    found: dict[str, object] = {}

    def register(item) -> None:
        name = getattr(item, "name", "")
        if not name:
            raise TypeError(f"a registered {kind} needs a non-empty .name: {item!r}")
        if name in found:
            raise ValueError(f"two plugins register a {kind} named {name!r}")
        found[name] = item

    hook(register=register)
    return found


def get_backends(pm: pluggy.PluginManager | None = None) -> dict[str, Backend]:
    pm = pm or get_plugin_manager()
    return _collect(pm.hook.register_backends, "backend")  # type: ignore[return-value]


def get_backend(name: str, pm: pluggy.PluginManager | None = None) -> Backend:
    backends = get_backends(pm)
    if name in backends:
        return backends[name]
    package = KNOWN_BACKEND_PACKAGES.get(name)
    if package:
        folder = package.replace("dschat-", "")
        raise UserError(
            f"backend '{name}' is not installed; fix: from a clone of the dschat repository, pip install "
            f"./packages/{folder} (published as: pip install {package})"
        )
    known = ", ".join(sorted(backends)) or "none installed"
    close = difflib.get_close_matches(name, sorted(set(backends) | set(KNOWN_BACKEND_PACKAGES)), n=1)
    fix = f"did you mean '{close[0]}'?" if close else "pass one of the installed backends"
    raise UserError(f"unknown backend '{name}' (installed: {known}); fix: {fix}")


def choose_backend(name: str | None, configured: str | None = None, job_id: str | None = None) -> Backend:
    """The backend a command runs on: the one named (``--backend``), else the run config's ``backend:``, else the
    one whose job records hold ``job_id``, else the only installed one; else one line listing the installed."""
    if name or configured:
        return get_backend(name or configured or "")
    found = get_backends()
    if job_id is not None:
        owners = [b for b in found.values() if b.knows_job(job_id)]
        if len(owners) == 1:
            return owners[0]
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        raise UserError("no backend is installed; fix: pip install ./packages/adapter-local (or -slurm, -t9k)")
    names = ", ".join(sorted(found))
    where = f"no job record names {job_id!r}" if job_id is not None else "the config sets no `backend:`"
    raise UserError(
        f"several backends are installed ({names}) and {where}; fix: pass --backend NAME (or set backend: in the "
        "run config)"
    )


def get_reward_functions(pm: pluggy.PluginManager | None = None) -> dict[str, RewardFunction]:
    pm = pm or get_plugin_manager()
    return _collect(pm.hook.register_reward_functions, "reward function")  # type: ignore[return-value]


def get_environments(pm: pluggy.PluginManager | None = None) -> dict[str, Environment]:
    pm = pm or get_plugin_manager()
    return _collect(pm.hook.register_environments, "environment")  # type: ignore[return-value]


def get_metric_sinks(pm: pluggy.PluginManager | None = None) -> dict[str, MetricSink]:
    pm = pm or get_plugin_manager()
    return _collect(pm.hook.register_metric_sinks, "metric sink")  # type: ignore[return-value]


def get_dataset_formats(pm: pluggy.PluginManager | None = None) -> dict[str, DatasetFormat]:
    pm = pm or get_plugin_manager()
    return _collect(pm.hook.register_dataset_formats, "dataset format")  # type: ignore[return-value]
