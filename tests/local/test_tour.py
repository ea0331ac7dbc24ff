"""The README's Tour, as written: every command that needs no training run, cluster or network is run here
exactly as the README spells it; the others are checked to name files that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from dschat_core.cli import cli
from dschat_local import plugin as local_plugin

REPO = Path(__file__).resolve().parents[2]
#: What the Tour runs that trains, talks to the hub or needs a finished run: the long tests cover those.
NOT_RUN_HERE = {
    ("train", "--stage", "preflight"),
    ("train", "--stage", "all"),
    ("train", "--stage", "dpo"),
    ("train", "--detach"),
    ("status",),
    ("chat",),
    ("eval",),
    ("report",),
    ("model", "download"),
    ("data", "download"),
}


def tour_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Tour\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no Tour code block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def skipped(args: list[str]) -> bool:
    return any(all(word in args for word in words) and args[0] == words[0] for words in NOT_RUN_HERE)


def test_the_tour_runs_as_written(tmp_path, monkeypatch, register):
    register(local_plugin, "local")
    (tmp_path / "samples").symlink_to(REPO / "samples")
    monkeypatch.chdir(tmp_path)
    commands = tour_commands()
    assert all(c[0] == "dschat-core" for c in commands)
    ran = 0
    for command in commands:
        args = command[1:]
        for flag in ("-c", "--tokenizer"):  # what the README points at is in the repository
            if flag in args:
                assert Path(args[args.index(flag) + 1]).exists(), command
        if skipped(args):
            continue
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, f"{shlex.join(command)}\n{result.output[-2000:]}"
        ran += 1
    assert ran == 8  # backends, the dry-run, config show, rewards, sinks, init-tiny, make-tiny, inspect
    assert (tmp_path / "models" / "tiny-llama" / "config.json").exists()
    assert list((tmp_path / "data").iterdir())
