"""Shared fixtures. Tests never auto-load installed plugins: they register what they need by name."""

from __future__ import annotations

import pytest

from dschat_core import plugins


@pytest.fixture(autouse=True)
def isolated_plugins(monkeypatch, tmp_path):
    """Every test starts with a plugin manager holding only the built-ins, and its own job-state folder."""
    monkeypatch.setenv(plugins.ALLOW_ENV, "")
    monkeypatch.setenv("DSCHAT_STATE_DIR", str(tmp_path / "state"))
    pm = plugins.new_plugin_manager(load_installed=False)
    plugins.set_plugin_manager(pm)
    yield pm
    plugins.set_plugin_manager(None)


@pytest.fixture
def register(isolated_plugins):
    """register(plugin, name) adds a plugin to the test's manager."""

    def _register(plugin, name: str):
        isolated_plugins.register(plugin, name=name)
        return plugin

    return _register


#: Markers that follow from the fixtures a test uses, so that they always match what it needs.
FIXTURE_MARKERS = {"slurm_cluster": "slurm", "k8s_cluster": "k8s"}


#: Session fixtures that train: the modules using one run on the same xdist worker, so it is trained once.
SHARED_TRAINING = ("cpu_sample_run",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
    if config.pluginmanager.hasplugin("xdist"):
        group_by_module(items)


def group_by_module(items) -> None:
    """Under `pytest -n N --dist loadgroup` (tox): a module's tests stay on one worker (its module fixtures, a
    Slurm cluster or an API server, start once), and modules sharing a session fixture that trains go together."""
    shared = {}
    for item in items:
        for fixture in SHARED_TRAINING:
            if fixture in item.fixturenames:
                shared[item.module.__name__] = fixture
    for item in items:
        item.add_marker(pytest.mark.xdist_group(shared.get(item.module.__name__, item.module.__name__)))
