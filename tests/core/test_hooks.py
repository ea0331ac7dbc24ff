"""Every hook of the plugin contract, the built-in plugin, and the allow-list."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from dschat_core import hookspecs, plugins
from dschat_core.cli import build_cli
from dschat_core.data.formats import DatasetFormat
from dschat_core.hookspecs import hookimpl
from dschat_core.plugins import get_backends, get_dataset_formats, new_plugin_manager

from .fake_backend import FakeBackend, FakePlugin


def test_every_hook_is_documented():
    names = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert set(names) == {
        "register_backends",
        "register_dataset_formats",
        "register_reward_functions",
        "register_environments",
        "register_metric_sinks",
        "register_commands",
    }
    for name in names:
        assert len(getattr(hookspecs, name).__doc__) > 80


def test_register_backends(register):
    backend = FakeBackend()
    register(FakePlugin(backend), "fake")
    assert get_backends() == {"fake": backend}


def test_register_environments(register):
    from dschat_core.plugin import Environment, Step
    from dschat_core.plugins import get_environments

    class Echo:
        def step(self, turn: str) -> Step:
            return Step(turn, done=True)

    echo = Environment("echo", lambda row: Echo(), ("</s>",))

    class Plugin:
        @hookimpl
        def register_environments(self, register):
            register(echo)

    register(Plugin(), "echo")
    environments = get_environments()
    assert environments["echo"] is echo and "calculator" in environments  # the built-in, through the same hook


def test_core_alone_has_no_backend():
    assert get_backends(new_plugin_manager(load_installed=False)) == {}


def test_duplicate_backend_names_are_refused(register):
    register(FakePlugin(FakeBackend()), "one")
    register(FakePlugin(FakeBackend()), "two")
    with pytest.raises(ValueError, match="two plugins register a backend named 'fake'"):
        get_backends()


def test_builtin_dataset_formats_come_through_the_hook():
    formats = get_dataset_formats()
    assert "Dahoas/rm-static" in formats
    # DeepSpeed-Chat's 16, the generic local pairwise and prompt/answer schemas, GSM8K, five conversational ones
    assert len(formats) == 24
    assert sum(fmt.conversational for fmt in formats.values()) == 5


def test_register_dataset_formats(register):
    class MyData:
        @hookimpl
        def register_dataset_formats(self, register):
            register(DatasetFormat("acme/prefs", ("q", "good", "bad"), lambda row: (row["q"], row["good"], row["bad"])))

    register(MyData(), "mydata")
    fmt = get_dataset_formats()["acme/prefs"]
    assert fmt.triple({"q": "Q", "good": "A", "bad": "B"}) == ("Q", "A", "B")


def test_register_commands(register):
    class Extra:
        @hookimpl
        def register_commands(self, cli):
            @cli.command("hello-extra")
            def hello():
                """Say hello from a plugin."""
                click.echo("hello from a plugin")

    register(Extra(), "extra")
    result = CliRunner().invoke(build_cli(), ["hello-extra"])
    assert result.exit_code == 0, result.output
    assert "hello from a plugin" in result.output


def test_allow_list_limits_installed_plugins(monkeypatch):
    # The local adapter is installed in the test environment; the allow-list decides whether it loads.
    monkeypatch.setenv(plugins.ALLOW_ENV, "")
    assert "local" not in get_backends(new_plugin_manager())
    monkeypatch.setenv(plugins.ALLOW_ENV, "local")
    assert "local" in get_backends(new_plugin_manager())
    monkeypatch.delenv(plugins.ALLOW_ENV)
    assert "local" in get_backends(new_plugin_manager())


def test_a_misspelt_hook_is_refused_naming_the_plugin():
    from dschat_core.errors import UserError
    from dschat_core.plugins import check_hooks

    class Typo:
        @hookimpl
        def register_backend(self, register):  # the hook is register_backends
            raise AssertionError("never called")

    pm = new_plugin_manager(load_installed=False)
    pm.register(Typo(), name="typo")
    with pytest.raises(UserError, match="plugin 'typo'.*register_backend.*register_backends"):
        check_hooks(pm)


def test_the_public_plugin_module_exports_what_a_backend_needs():
    from dschat_core import plugin

    for name in (
        "Backend",
        "LaunchPlan",
        "JobState",
        "JobStatus",
        "JobRecords",
        "StorageLayout",
        "hookimpl",
        "follow_log",
        "torchrun_args",
        "rank_environment",
        "STOP_FILE_ENV",
        "STOP_ACK_SUFFIX",
        "write_config",
        "encode_config",
        "UserError",
        "ConfigError",
        "BackendError",
        "JobFailed",
    ):
        assert name in plugin.__all__ and getattr(plugin, name) is not None
