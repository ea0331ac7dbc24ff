"""Build the four wheels, install them (not editable) into the running venv, and smoke-test what a user runs.

    python tests/packaging/wheels.py WORK_DIR      (tox -e wheels; CI runs it)

Run from a fresh venv: the CLI must work from the installed wheels alone (package data included), not from the
source tree, so every command runs in WORK_DIR, away from the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["core", "adapter-local", "adapter-slurm", "adapter-t9k"]


def run(*args: str, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    dist = work / "dist"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-w",
        str(dist),
        *[str(REPO / "packages" / p) for p in PACKAGES],
        cwd=work,
    )
    wheels = sorted(dist.glob("*.whl"))
    names = {w.name.split("-")[0]: w.name.split("-")[1] for w in wheels}
    assert set(names) == {"dschat_core", "dschat_adapter_local", "dschat_adapter_slurm", "dschat_adapter_t9k"}, names
    assert len(set(names.values())) == 1, f"the four packages must share one version: {names}"
    contents = {w.name.split("-")[0]: zipfile.ZipFile(w).namelist() for w in wheels}
    for needed in ("dschat_t9k/sample_configs/single-gpu.yaml", "dschat_t9k/sample_configs/multi-node.yaml"):
        assert needed in contents["dschat_adapter_t9k"], f"{needed} is not in the t9k wheel"
    assert "dschat_core/py.typed" in contents["dschat_core"]
    run(sys.executable, "-m", "pip", "install", *map(str, wheels), cwd=work)

    env = {**os.environ, "PYTHONPATH": "", "DSCHAT_STATE_DIR": str(work / "state")}
    env.pop("DSCHAT_PLUGINS", None)  # every installed adapter loads, as for a user
    code = "import dschat_core, dschat_t9k; print(dschat_core.__file__, dschat_t9k.__file__)"
    where = run(sys.executable, "-c", code, cwd=work, env=env)
    # tox's venv lives under the repository (.tox/), so the source tree is the packages/ folder
    assert str(REPO / "packages") not in where, f"imported from the source tree, not the wheels: {where}"
    cli = [str(Path(sys.executable).with_name("dschat-core"))]
    version = run(*cli, "--version", cwd=work, env=env)
    assert next(iter(names.values())).split("+")[0] in version, version
    listed = run(*cli, "backends", cwd=work, env=env)
    assert all(name in listed for name in ("local", "slurm", "t9k")), listed
    assert run(*cli, "config", "reference", cwd=work, env=env).startswith("# Configuration reference")
    run(*cli, "slurm", "samples", "-o", str(work / "slurm"), cwd=work, env=env)
    assert (work / "slurm" / "single-gpu" / "sft.sbatch").is_file()
    run(*cli, "t9k", "samples", "-o", str(work / "t9k"), cwd=work, env=env)
    assert (work / "t9k" / "single-gpu" / "actor.yaml").is_file() and (work / "t9k" / "download.yaml").is_file()
    preflight = run(
        *cli,
        "train",
        "-b",
        "local",
        "--stage",
        "preflight",
        "--set",
        "topology.accelerator=cpu",
        "--set",
        f"storage.root={work / 'runs'}",
        cwd=work,
        env=env,
    )
    assert "all_reduce: ok" in preflight, preflight[-2000:]
    print(json.dumps({"wheels": [w.name for w in wheels], "smoke": "ok"}, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
