"""Metrics of a running stage: progress lines on stdout, and every point to the run's metric sinks
(:mod:`dschat_core.tracking`: ``metrics.jsonl`` always, TensorBoard, W&B, MLflow), on global rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import UserError
from .checkpoints import work_dir
from .distributed import broadcast_text, rank


class Metrics:
    def __init__(self, config: RunConfig, stage: str, output_dir: str, resume_step: int = 0) -> None:
        from ..plugins import get_metric_sinks
        from ..tracking import SinkContext, SinkError, flatten, start_sinks

        self.rank = rank()
        self.path = work_dir(output_dir) / "metrics.jsonl"
        self.sinks: list[tuple[str, Any]] = []
        self.failed: set[str] = set()
        problem = ""
        if self.rank == 0:
            tracking = config.tracking
            names = ["jsonl", *dict.fromkeys(n for n in tracking.sinks if n != "jsonl")]
            if not config.stage(stage).enable_tensorboard:
                names = [n for n in names if n != "tensorboard"]
            context = SinkContext(
                stage=stage,
                work=self.path.parent,
                run_name=f"{tracking.run_name or config.run_name}-{stage}",
                group=tracking.run_name or config.run_name,
                project=tracking.project,
                experiment=tracking.experiment or tracking.project,
                tags=list(tracking.tags),
                params=flatten(config.model_dump(mode="json", exclude={"backends"})),
                resume_step=resume_step,
            )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.sinks = start_sinks(names, get_metric_sinks(), context)
            except SinkError as exc:
                problem = str(exc)
        problem = broadcast_text(problem)  # every rank stops alike, before training
        if problem:
            raise UserError(problem)

    def log(self, step: int, values: dict[str, Any], echo: str | None = None) -> None:
        if self.rank != 0:
            return
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for name, sink in self.sinks:
            if name in self.failed:
                continue
            try:
                sink.log(step, numbers)
            except Exception as exc:  # a service gone mid-run: metrics.jsonl keeps every point
                if name == "jsonl":
                    raise
                from ..tracking import warn_once

                warn_once(name, exc)
                self.failed.add(name)
        if echo:
            print(echo, flush=True)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []  # once, whether the run ended, stopped or failed
        for name, sink in sinks:
            if name not in self.failed:
                try:
                    sink.close()
                except Exception as exc:  # closing a remote run must not fail a finished stage
                    from ..tracking import warn_once

                    warn_once(name, exc)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
