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


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
