"""Resumable checkpoints: one DeepSpeed checkpoint per engine, per-rank RNG and extra state, the run's position.

Layout for a stage whose final model goes to ``<run>/actor``:
    <run>/work/actor/checkpoints/step-N/   <engine>/ per engine, rng-rank<R>.pt, state.json (written last)
    <run>/work/actor/checkpoints/latest    the tag of the newest complete checkpoint
A checkpoint is written into ``.step-N.tmp`` and renamed into place once every rank has written its part, so a
kill at any moment leaves the previous one intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .distributed import barrier, rank


def checkpoints_dir(output_dir: str) -> Path:
    """Where a stage's checkpoints go (``latest`` names the newest)."""
    return work_dir(output_dir) / "checkpoints"


def work_dir(output_dir: str) -> Path:
    """Where a stage keeps what is not its final model: checkpoints, live metrics, samples."""
    out = Path(output_dir)
    return out.parent / "work" / out.name


@contextlib.contextmanager
def disk_errors(what: str, kept: str):
    """A full disk, a quota or a read-only folder while writing ``what``: one line saying so (and what is still
    there), not a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        from ..errors import TrainingStopped

        raise TrainingStopped(
            f"could not write {what}: {exc.strerror}; {kept}; fix: free space or point "
            "storage.root where the run may write, then run again to resume"
        ) from None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """DeepSpeed checkpoints of every engine plus data position and RNG states; keeps the last ``keep_last``."""

    def __init__(self, output_dir: str, keep_last: int) -> None:
        self.root = checkpoints_dir(output_dir)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    def latest_state(self) -> dict[str, Any] | None:
        """The newest checkpoint's ``state.json`` without loading any engine."""
        path = self.latest()
        return json.loads((path / "state.json").read_text()) if path else None

    def clear(self) -> None:
        """Forget every checkpoint (a run told to start over); rank 0 deletes, every rank waits."""
        if rank() == 0 and self.root.exists():
            shutil.rmtree(self.root)
        barrier()

    def save(self, engines: dict[str, Any], state: dict[str, Any], rank_state: dict[str, Any] | None = None) -> Path:
        """``rank_state``: this rank's extra tensors (e.g. its partition of the EMA actor), saved per rank."""
        import torch

        tag = f"step-{state['global_step']}"
        tmp = self.root / f".{tag}.tmp"
        me = rank()
        with disk_errors(f"the checkpoint {tmp}", "the previous checkpoint is intact"):
            if me == 0:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            barrier()
            for name, engine in engines.items():
                engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
            torch.save({**rng, "extra": rank_state or {}}, tmp / f"rng-rank{me}.pt")
        barrier()
        final = self.root / tag
        if me == 0:
            with disk_errors(f"the checkpoint {final}", "the previous checkpoint is intact"):
                write_atomic(tmp / "state.json", json.dumps(state))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                write_atomic(self.root / "latest", tag)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        steps = sorted((p for p in self.root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in steps[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob(".step-*.tmp"):  # a save killed half-way
            shutil.rmtree(leftover, ignore_errors=True)

    def load(self, engines: dict[str, Any]) -> dict[str, Any] | None:
        """Restore every engine and this rank's RNG; returns the saved state (with this rank's ``rank_state``
        under ``"rank_state"``), or None when there is no checkpoint."""
        import torch

        path = self.latest()
        if path is None:
            return None
        for name, engine in engines.items():
            loaded, _ = engine.load_checkpoint(
                str(path), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if loaded is None:
                raise RuntimeError(f"checkpoint {path}/{name} could not be loaded")
        state = json.loads((path / "state.json").read_text())
        rng_file = path / f"rng-rank{rank()}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            state["rank_state"] = rng.get("extra", {})
        return state
