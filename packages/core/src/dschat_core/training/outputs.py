"""Checkpoints, metrics and final models: written atomically, resumable, never overwriting a finished run.

Layout for a stage whose final model goes to ``<run>/actor``:
    <run>/actor/                    final Hugging Face folder (+ metrics.jsonl, tensorboard/, dschat-finished.json)
    <run>/work/actor/checkpoints/   step-N/ (one DeepSpeed checkpoint per engine + rng + state.json), latest
    <run>/work/actor/metrics.jsonl  live metrics, copied into the final folder at the end
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import FINISHED_MARKER
from ..errors import UserError


def work_dir(output_dir: str) -> Path:
    out = Path(output_dir)
    return out.parent / "work" / out.name


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """DeepSpeed checkpoints of every engine plus data position and RNG states; keeps the last ``keep_last``."""

    def __init__(self, output_dir: str, keep_last: int) -> None:
        self.root = work_dir(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    def save(self, engines: dict[str, Any], state: dict[str, Any], rank_state: dict[str, Any] | None = None) -> Path:
        """``rank_state``: this rank's extra tensors (e.g. its partition of the EMA actor), saved per rank."""
        import torch

        tag = f"step-{state['global_step']}"
        tmp = self.root / f".{tag}.tmp"
        rank = _rank()
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
        torch.save(
            {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "extra": rank_state or {},
            },
            tmp / f"rng-rank{rank}.pt",
        )
        _barrier()
        final = self.root / tag
        if rank == 0:
            _write_atomic(tmp / "state.json", json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", tag)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        steps = sorted((p for p in self.root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in steps[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

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
        rng_file = path / f"rng-rank{_rank()}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            state["rank_state"] = rng.get("extra", {})
        return state


class Metrics:
    """Progress lines on rank 0, ``metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, output_dir: str, enable_tensorboard: bool, resume_step: int = 0) -> None:
        self.rank = _rank()
        self.path = work_dir(output_dir) / "metrics.jsonl"
        self.tb_dir = work_dir(output_dir) / "tensorboard"
        self.writer = None
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop points past the checkpoint we resume from
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            _write_atomic(self.path, "".join(line + "\n" for line in kept))
        if enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tb_dir))

    def log(self, step: int, values: dict[str, Any], echo: str | None = None) -> None:
        if self.rank != 0:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(key, value, step)
        if echo:
            print(echo, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


#: A platform asks a running stage to checkpoint and exit (preemption) by creating the file this names.
STOP_FILE_ENV = "DSCHAT_STOP_FILE"


def stop_requested(device) -> bool:
    """Whether the platform asked to stop; every rank gets the same answer (one all-reduce, only when the
    platform set the variable: it is the same on every rank)."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return False
    from .batching import all_reduce_sum

    return all_reduce_sum([1.0 if os.path.exists(path) else 0.0], device)[0] > 0


def acknowledge_stop(stage: str, step: int) -> None:
    """After the checkpoint: tell the platform the stop was clean (``<stop file>.saved``; launchers such as
    torchrun do not pass the worker's exit code on)."""
    info(f"[{stage}] stop requested: checkpoint saved at step {step}; run again to resume")
    path = os.environ.get(STOP_FILE_ENV)
    if path and _rank() == 0:
        _write_atomic(Path(f"{path}.saved"), json.dumps({"stage": stage, "step": step}))
    _barrier()  # no rank exits before the acknowledgement exists: the launcher stops the rest when one exits


def info(text: str) -> None:
    if _rank() == 0:
        print(text, flush=True)


def warn(text: str) -> None:
    if _rank() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def gathered_state_dict(module, zero_stage: int) -> dict[str, Any] | None:
    """The full state dict on rank 0 (gathering ZeRO-3 partitions), None elsewhere."""
    import deepspeed

    rank = _rank()
    if zero_stage == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
        return state
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None


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


def check_not_finished(stage: str, output_dir: str, overwrite: bool) -> None:
    """Refuse to train over a finished model. Checked in the worker too: on a cluster only the workers can see
    the output folder."""
    if (Path(output_dir) / FINISHED_MARKER).exists() and not overwrite:
        raise UserError(
            f"{stage}.output_dir = {output_dir!r} holds a finished model already; "
            f"fix: choose another output_dir or run_name, or set {stage}.overwrite=true"
        )


def _copy_logs(work: Path, dest: Path) -> None:
    if (work / "metrics.jsonl").exists():
        shutil.copy2(work / "metrics.jsonl", dest / "metrics.jsonl")
    if (work / "tensorboard").exists():
        shutil.copytree(work / "tensorboard", dest / "tensorboard", dirs_exist_ok=True)


def mark_finished(output_dir: str, summary: dict[str, Any], work: Path) -> None:
    """For a stage whose output holds several model folders (stage 3): logs beside them, the marker last."""
    if _rank() == 0:
        out = Path(output_dir)
        _copy_logs(work, out)
        _write_atomic(out / FINISHED_MARKER, json.dumps({**summary, "finished": time.time()}, indent=2))
    _barrier()


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
    last. Metrics and TensorBoard logs are copied in beside the weights unless ``with_logs`` is off."""
    state = gathered_state_dict(module, zero_stage)
    if _rank() == 0:
        assert state is not None
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        if lora_scaling is not None:
            state = merge_lora(state, lora_scaling)
        out = Path(output_dir)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        base.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if with_logs:
            _copy_logs(work_dir(output_dir), tmp)
        (tmp / FINISHED_MARKER).write_text(json.dumps({**summary, "finished": time.time()}, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{int(time.time())}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    _barrier()
