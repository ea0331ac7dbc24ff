"""Final models: Hugging Face folders written atomically, LoRA merged, never from non-finite weights, and never
over a finished run unless told.

A stage's final folder (``<run>/actor``) holds the weights, the tokenizer, ``metrics.jsonl``, ``tensorboard/``
and, written last, ``dschat-finished.json``: its presence is what "finished" means.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..backend import FINISHED_MARKER
from ..errors import TrainingStopped, UserError
from .checkpoints import work_dir, write_atomic
from .distributed import any_rank, barrier, rank


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
