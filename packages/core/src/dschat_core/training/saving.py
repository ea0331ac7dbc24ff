"""Final models: Hugging Face folders written atomically, LoRA merged, never from non-finite weights, and never
over a finished run unless told.

A stage's final folder (``<run>/actor``) holds the weights, the tokenizer, ``metrics.jsonl``, ``tensorboard/``
and, written last, ``dschat-finished.json``: its presence is what "finished" means.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..backend import FINISHED_MARKER
from ..errors import TrainingStopped, UserError
from .checkpoints import disk_errors, work_dir, write_atomic
from .distributed import any_rank, barrier, broadcast_text, rank


def gathered_state_dict(module, zero_stage: int) -> dict[str, Any] | None:
    """The full state dict on rank 0 (gathering ZeRO-3 partitions), None elsewhere."""
    import deepspeed

    def copy() -> dict[str, Any] | None:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank() == 0 else None

    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return copy()
    return copy()


def merge_lora(state: dict[str, Any], scaling: float) -> dict[str, Any]:
    """Fold peft LoRA weights into their base weights (W += s·B·A) and return plain Hugging Face keys."""
    merged: dict[str, Any] = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.rpartition(".base_layer.")
            if leaf == "weight" and f"{prefix}.lora_A.default.weight" in state:
                a = state[f"{prefix}.lora_A.default.weight"].float()
                b = state[f"{prefix}.lora_B.default.weight"].float()
                value = (value.float() + scaling * (b @ a)).to(value.dtype)
            key = f"{prefix}.{leaf}"
        if key.startswith("base_model.model."):
            key = key[len("base_model.model.") :]
        merged[key] = value
    return merged


def nonfinite_weights(state: dict[str, Any]) -> list[str]:
    import torch

    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_not_finished(stage: str, output_dir: str, overwrite: bool) -> None:
    """Refuse to train over a finished model. Checked in the worker too: on a cluster only the workers can see
    the output folder."""
    if (Path(output_dir) / FINISHED_MARKER).exists() and not overwrite:
        raise UserError(
            f"{stage}.output_dir = {output_dir!r} holds a finished model already; "
            f"fix: choose another output_dir or run_name, or set {stage}.overwrite=true"
        )


def clean_leftovers(output_dir: str) -> None:
    """Folders a killed final save left beside the output (``.<name>.<pid>.tmp``, ``.<name>.old-<time>``)."""
    out = Path(output_dir)
    if rank() == 0 and out.parent.exists():
        for leftover in [*out.parent.glob(f".{out.name}.*.tmp"), *out.parent.glob(f".{out.name}.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)


def _copy_logs(work: Path, dest: Path) -> None:
    if (work / "metrics.jsonl").exists():
        shutil.copy2(work / "metrics.jsonl", dest / "metrics.jsonl")
    if (work / "tensorboard").exists():
        shutil.copytree(work / "tensorboard", dest / "tensorboard", dirs_exist_ok=True)


def _marker(summary: dict[str, Any]) -> str:
    return json.dumps({**summary, "finished": time.time()}, indent=2)


def mark_finished(output_dir: str, summary: dict[str, Any]) -> None:
    """For a stage whose output holds several model folders (stage 3): logs beside them, the marker last."""
    if rank() == 0:
        out = Path(output_dir)
        _copy_logs(work_dir(output_dir), out)
        write_atomic(out / FINISHED_MARKER, _marker(summary))
    barrier()


def save_final(
    module,
    tokenizer,
    output_dir: str,
    zero_stage: int,
    lora_scaling: float | None,
    summary: dict[str, Any],
    with_logs: bool = True,
) -> None:
    """Write the stage's Hugging Face folder atomically (tmp folder, then rename); the finished marker goes in
    last. Metrics and TensorBoard logs are copied in beside the weights unless ``with_logs`` is off (a stage
    with several models keeps them in its output folder, which :func:`mark_finished` marks). Non-finite weights
    stop the run instead: a broken run is never called finished."""
    state = gathered_state_dict(module, zero_stage)
    bad = nonfinite_weights(state) if state is not None else []
    if any_rank(bool(bad), next(module.parameters()).device):
        raise TrainingStopped(
            f"the final weights of {output_dir} hold NaN or inf ({', '.join(bad[:3]) or 'on rank 0'}); nothing "
            "was saved and the run is not marked finished; fix: lower the learning rate, use bf16 or fp32"
        )
    if rank() == 0:
        assert state is not None
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        if lora_scaling is not None:
            state = merge_lora(state, lora_scaling)
        out = Path(output_dir)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with disk_errors(f"the model {out}", "the last checkpoint is intact", out.parent):
            if tmp.exists():
                shutil.rmtree(tmp)
            base.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if with_logs:
                _copy_logs(work_dir(output_dir), tmp)
            (tmp / FINISHED_MARKER).write_text(_marker(summary))
            if out.exists():
                old = out.with_name(f".{out.name}.old-{int(time.time())}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    barrier()


def finished(output_dir: str | None) -> bool:
    return bool(output_dir) and (Path(str(output_dir)) / FINISHED_MARKER).exists()


#: The platform's id of the running job (set by backends; Slurm's own id where there is none).
JOB_ID_ENVS = ("DSCHAT_JOB_ID", "SLURM_JOB_ID")


class OutputLock:
    """One writer per stage output, on any filesystem the ranks share: global rank 0 creates
    ``work/<name>/writer.lock`` exclusively and refreshes it every ``HEARTBEAT_SECONDS`` while the stage runs. A
    lock is stale, and taken over, when it is this job's own (a requeued or retried job), when its process is gone
    on this host, or when its heartbeat is older than ``STALE_SECONDS`` (a host that died)."""

    HEARTBEAT_SECONDS = 30.0
    STALE_SECONDS = 300.0

    def __init__(self, stage: str, output_dir: str, device) -> None:
        self.stage, self.output_dir, self.device = stage, output_dir, device
        self.path = work_dir(output_dir) / "writer.lock"
        self.me = {
            "job": next((os.environ[k] for k in JOB_ID_ENVS if os.environ.get(k)), None),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if self.me["job"] and holder.get("job") == self.me["job"]:
            return True
        if holder.get("host") == self.me["host"] and not _pid_alive(int(holder.get("pid") or 0)):
            return True
        try:
            return time.time() - self.path.stat().st_mtime > self.STALE_SECONDS
        except FileNotFoundError:
            return True

    def _acquire(self) -> str:
        """'' once held, else why not."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                if not self._stale(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    return (
                        f"{self.stage}.output_dir = {self.output_dir!r} is being written by another run (job "
                        f"{holder.get('job') or '?'}, host {holder.get('host')}, pid {holder.get('pid')}, since "
                        f"{since}); fix: wait for it or cancel it, or choose another output_dir or run_name"
                    )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(self.me))
            return ""
        return f"could not take the lock {self.path}; fix: delete it if no run writes {self.output_dir}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def __enter__(self) -> OutputLock:
        problem = self._acquire() if rank() == 0 else ""
        problem = broadcast_text(problem)
        if problem:
            raise UserError(problem)
        if rank() == 0:
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if rank() == 0:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                    self.path.unlink()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
