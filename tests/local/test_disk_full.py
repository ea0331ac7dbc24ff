"""A disk that fills up under a running job (storage root and job records on one small filesystem, as on a
workstation): the foreground `train` ends within seconds with one line naming the place, exits non-zero, and the
last good checkpoint stays. It used to wait until killed (9.5 minutes seen), then print an OSError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dschat_core.training.checkpoints import Checkpointer, unusable

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ranks


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs of its own (root may mount one; CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_up_ends_the_run_in_seconds_with_one_line(small_disk):
    env = {**os.environ, "DSCHAT_PLUGINS": "local", "DSCHAT_STATE_DIR": str(small_disk / "state")}
    root = small_disk / "root"
    argv = [sys.executable, "-m", "dschat_core.cli", "train", "-b", "local", "--stage", "sft"]
    argv += ["-c", str(REPO / "samples" / "tiny-cpu.yaml"), "--set", f"storage.root={root}"]
    argv += ["--set", "sft.save_interval=5", "--set", "sft.max_steps=400", "--set", "sft.eval_before_training=false"]
    train = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = root / "runs" / "tiny-cpu" / "work" / "actor" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "latest").exists():
        assert time.monotonic() < deadline and train.poll() is None, train.stdout.read() if train.poll() else ""
        time.sleep(0.1)
    with open(small_disk / "filler", "wb") as filler:  # fill what is left
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                filler.write(chunk)
                filler.flush()
        except OSError:
            pass
    filled = time.monotonic()
    output, _ = train.communicate(timeout=300)
    took = time.monotonic() - filled
    assert train.returncode not in (0, None), output[-3000:]
    last = output.strip().splitlines()[-1]
    assert "disk full at" in last and "Traceback" not in output, output[-3000:]
    assert took < 120, took  # "within seconds": it used to wait until killed
    kept, _ = Checkpointer(str(root / "runs" / "tiny-cpu" / "actor"), keep_last=2).choose()
    assert kept is not None and unusable(kept) == ""  # the last good checkpoint is there, whole
