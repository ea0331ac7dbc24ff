"""Metrics of a running stage: ``metrics.jsonl`` and TensorBoard on global rank 0, progress lines on stdout."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .checkpoints import work_dir, write_atomic
from .distributed import rank


class Metrics:
    """Progress lines on rank 0, ``metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, output_dir: str, enable_tensorboard: bool, resume_step: int = 0) -> None:
        self.rank = rank()
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
            write_atomic(self.path, "".join(line + "\n" for line in kept))
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
