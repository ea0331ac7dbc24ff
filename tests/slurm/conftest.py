"""A real Slurm cluster (Debian's packages, two slurmd on this host) for the adapter's tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dschat_slurm import plugin as slurm_plugin

CLUSTER = Path(__file__).parent / "cluster"


@pytest.fixture(scope="session")
def slurm_cluster():
    # munged wants every folder above its socket searchable by all: not pytest's 0700 temp folders.
    root = Path(os.environ.get("SLURMX_ROOT") or tempfile.mkdtemp(prefix="dschat-slurm-"))
    root.chmod(0o755)
    env = {**os.environ, "SLURMX_ROOT": str(root), "SLURMX_NODES": "2", "SLURMX_MIN_JOB_AGE": "120"}
    started = subprocess.run(["bash", str(CLUSTER / "up.sh")], env=env, capture_output=True, text=True, timeout=600)
    if started.returncode != 0:  # stop what did start (munged, say) before failing
        subprocess.run(["bash", str(CLUSTER / "down.sh")], env=env, capture_output=True, timeout=120)
    assert started.returncode == 0, f"could not start Slurm:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
    yield root
    subprocess.run(["bash", str(CLUSTER / "down.sh")], env=env, capture_output=True, timeout=120)
    if "SLURMX_ROOT" not in os.environ:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm(slurm_cluster, register, monkeypatch):
    """The slurm backend, registered, with the test cluster's client config."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster / "etc" / "slurm.conf"))
    register(slurm_plugin, "slurm")
    return slurm_plugin.SlurmBackend()
