"""Multi-turn stage 3 with a tool, for real (2 CPU ranks): samples/tiny-cpu-tools.yaml (SFT on demonstrations
that mostly guess, then GRPO with the calculator environment) learns to call the calculator; the environment
plugin of docs/environments.md trains; a bad environment setting exits 2 before launch."""

from __future__ import annotations

import json
import re

import pytest

from dschat_core.backend import FINISHED_MARKER
from dschat_core.errors import ConfigError
from dschat_core.launch import check_stage

from .runs import docs_plugin, metrics, run_all, run_stage, tools_assets, tools_config


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    return tools_assets(tmp_path_factory.mktemp("tools-assets"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tools):
    outputs = run_all(tools_config(tmp_path_factory.mktemp("tools"), tools))
    return {"actor": outputs["sft"], "ppo": outputs["ppo"]}


@pytest.mark.ranks
def test_grpo_with_the_calculator_learns_to_use_it(trained):
    out = trained["ppo"]
    assert (out / FINISHED_MARKER).exists()
    evals = [m for m in metrics(out) if "eval/accuracy" in m]
    acc = [m["eval/accuracy"] for m in evals]
    assert acc[0] <= 0.3 and acc[-1] >= 0.8, acc
    calls = [m["eval/episodes/tool_calls"] for m in evals]
    assert calls[-1] > calls[0] and calls[-1] >= 0.8, calls  # it learned by calling the tool, not by guessing
    steps = [m for m in metrics(out) if "episodes/tool_calls" in m]
    for key in ("episodes/turns", "episodes/tool_errors", "episodes/truncated", "episodes/failed", "truncated_frac"):
        assert all(key in m for m in steps), key
    assert max(m["episodes/turns"] for m in steps) > 1.0
    # held-out episodes are saved with their transcripts: the calculator's results between the model's turns
    samples = sorted((out.parent / "work" / "ppo" / "samples").glob("step-*.jsonl"), key=lambda p: int(p.stem[5:]))
    last = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    assert all("transcript" in r for r in last)
    assert sum("<result>" in r["transcript"] and "<result>" not in r["answer"] for r in last) >= 0.8 * len(last)


@pytest.mark.ranks
def test_eval_runs_greedy_episodes(trained, tmp_path):
    """`dschat-core eval --stage rl` plays the run's environment: the trained actor beside stage 1's, with the
    episodes' tool calls and transcripts (the calculator's results between the model's turns)."""
    from click.testing import CliRunner

    from dschat_core.cli import cli

    result = CliRunner().invoke(
        cli, ["eval", "--stage", "rl", str(trained["ppo"] / "actor"), "--baseline", str(trained["actor"]), "-n", "32"]
    )
    assert result.exit_code == 0, result.output
    found = re.search(r"baseline accuracy (\S+), model accuracy (\S+)\n", result.output)
    assert found, result.output[-2000:]
    assert float(found.group(2)) >= 0.8 > float(found.group(1)) + 0.3
    calls = re.search(r"baseline turns \S+, tool calls (\S+), .* model turns \S+, tool calls (\S+),", result.output)
    assert calls, result.output[-2000:]
    assert float(calls.group(2)) >= 0.8 > float(calls.group(1))
    assert "<result>" in result.output  # answers are shown as transcripts


def test_environment_settings_are_checked_before_launch(tmp_path, tools):
    bad = tools_config(tmp_path, tools, "ppo.environment.settings={max_expresion_chars: 5}")
    with pytest.raises(ConfigError) as caught:
        check_stage(bad, "ppo", chained=True)
    assert caught.value.key == "ppo.environment.settings.max_expresion_chars"
    unknown = tools_config(tmp_path, tools, "ppo.environment.name=chess")
    with pytest.raises(ConfigError, match="calculator"):
        check_stage(unknown, "ppo", chained=True)


@pytest.mark.ranks
def test_the_environment_plugin_of_the_docs_trains(tmp_path, tools, trained, monkeypatch, register):
    """docs/environments.md's package, installed from the page: listed with its package and settings, and trained
    with (its setting reaches the episodes: one check each, then done)."""
    rows = docs_plugin("environments.md", "dschat_checker", "checker", tmp_path, "environments", monkeypatch, register)
    assert rows["checker"][1:4] == ["dschat-checker 0.1.0", "stops: </calc>", "settings: max_checks=2"], rows
    cfg = tools_config(
        tmp_path,
        tools,
        f"ppo.actor_model_name_or_path={trained['actor']}",
        "ppo.environment={name: checker, settings: {max_checks: 1}}",
        "ppo.max_steps=2",
        "ppo.eval_interval=0",
        "ppo.eval_before_training=false",
    )
    out, _ = run_stage(cfg, "ppo")
    steps = [m for m in metrics(out) if "episodes/turns" in m]
    assert len(steps) == 2 and all(m["episodes/turns"] <= 2.0 for m in steps)  # a check ends the episode
    assert any(m["episodes/tool_calls"] > 0 for m in steps)
