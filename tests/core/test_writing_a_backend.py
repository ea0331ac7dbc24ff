"""docs/backends/writing.md builds a complete backend: copied from the page into a package, installed with pip,
listed by `dschat-core backends`, and run through the contract kit by the page's own test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "backends" / "writing.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    package = tmp_path_factory.mktemp("dschat-adapter-nohup")
    (package / "dschat_nohup.py").write_text(blocks("python")[0])
    (package / "pyproject.toml").write_text(blocks("toml")[0])
    site = tmp_path_factory.mktemp("site")
    # No build isolation: nothing is downloaded at test time (setuptools comes from the test venv).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site


def user_env(site: Path, tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(site), "DSCHAT_STATE_DIR": str(tmp_path / "state")}
    env.pop("DSCHAT_PLUGINS", None)  # installed plugins load, as for a user
    return env


def test_the_minimal_backend_is_short_and_installs_as_a_plugin(installed, tmp_path):
    assert len(blocks("python")[0].splitlines()) <= 100  # ruff-formatted
    listed = subprocess.run(
        [sys.executable, "-m", "dschat_core.cli", "backends"],
        capture_output=True,
        text=True,
        env=user_env(installed, tmp_path),
        cwd=tmp_path,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert "nohup\tdschat-adapter-nohup 0.1.0" in listed.stdout
    dry = subprocess.run(
        [
            sys.executable,
            "-m",
            "dschat_core.cli",
            "train",
            "-b",
            "nohup",
            "--stage",
            "preflight",
            "--set",
            "topology.accelerator=cpu",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        env=user_env(installed, tmp_path),
        cwd=tmp_path,
        timeout=120,
    )
    assert dry.returncode == 0 and "torch.distributed.run --standalone" in dry.stdout, dry.stdout + dry.stderr


@pytest.mark.ranks
def test_the_pages_own_test_passes_the_contract_kit(installed, tmp_path):
    test_file = tmp_path / "test_nohup.py"
    test_file.write_text(blocks("python")[-1])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        capture_output=True,
        text=True,
        env=user_env(installed, tmp_path),
        cwd=tmp_path,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "5 passed" in done.stdout
