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
def disk_errors(what: str, kept: str, where: str | Path = ""):
    """A full disk, a quota or a read-only folder while writing ``what`` (under ``where``): one line saying so (and
    what is still there), not a traceback. torch.save reports a full disk as a RuntimeError of its zip writer
    ("iostream error", "unexpected pos"): the free space of ``where`` tells it apart from a bug."""
    from ..backend import disk_full_at
    from ..errors import TrainingStopped

    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = disk_full_at(str(where)) if where else ""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            problem = full or exc.strerror
        elif full:
            problem = full
        else:
            raise
        raise TrainingStopped(
            f"could not write {what}: {problem}; {kept}; fix: free space or point "
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

    def steps(self) -> list[Path]:
        """The complete checkpoints here (``state.json`` is written last), newest first."""
        found = [p for p in self.root.glob("step-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)

    def choose(self) -> tuple[Path | None, list[str]]:
        """The checkpoint to resume from: the one ``latest`` names, else the newest other one that is usable; and
        a note for each one passed over (a pointer to nothing, a truncated file), so that nothing is silent."""
        notes: list[str] = []
        named = None
        pointer = self.root / "latest"
        if pointer.exists():
            tag = pointer.read_text().strip()
            named = self.root / tag
            if not (tag.startswith("step-") and "/" not in tag and named.is_dir()):
                notes.append(f"{pointer} names {tag[:80]!r}, which is no checkpoint there")
                named = None
        for path in ([named] if named else []) + [p for p in self.steps() if p != named]:
            problem = unusable(path)
            if not problem:
                return path, notes
            notes.append(f"checkpoint {path} cannot be used: {problem}")
        return None, notes

    def latest(self) -> Path | None:
        return self.choose()[0]

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
        with disk_errors(f"the checkpoint {tmp}", "the previous checkpoint is intact", self.root):
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
            with disk_errors(f"the checkpoint {final}", "the previous checkpoint is intact", self.root):
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

    def load(self, engines: dict[str, Any], path: Path | None = None) -> dict[str, Any] | None:
        """Restore every engine and this rank's RNG from ``path`` (default: the one :meth:`choose` picks); returns
        the saved state (with this rank's ``rank_state`` under ``"rank_state"``), or None when there is none."""
        import torch

        path = path or self.latest()
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


def unusable(path: Path) -> str:
    """Why a checkpoint folder cannot be resumed from ('' if it can): no or a damaged ``state.json``, or a torch
    file cut short (a torch file is a zip archive whose directory sits at its end: opening it reads only that, so
    a truncated shard is found without reading the weights)."""
    import zipfile

    try:
        json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json (not written to the end)"
    except (OSError, ValueError) as exc:
        return f"state.json is damaged ({exc})"
    for file in sorted(path.rglob("*.pt")):
        try:
            zipfile.ZipFile(file).close()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{file.relative_to(path)} is damaged or cut short ({exc})"
    return ""
