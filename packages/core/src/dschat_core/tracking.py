"""Where a stage's metrics go: metric sinks, registered through the ``register_metric_sinks`` hook.

Built in, and registered the same way: ``jsonl`` (``metrics.jsonl``, always on: reports and resumes read it),
``tensorboard``, ``wandb`` and ``mlflow`` (``pip install "dschat-core[wandb]"`` / ``[mlflow]``). The run config's
``tracking:`` section picks them; only global rank 0 writes. A sink that cannot start stops the run before
training, in one line; one that fails later warns once and training goes on. A resumed run continues the same
tracked run (its id is kept with the checkpoints), and no step is logged twice.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class SinkRun(Protocol):
    """A sink, started for one stage's run."""

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


@dataclass
class SinkContext:
    """What a sink starts from."""

    stage: str
    work: Path  # the stage's work folder (where metrics.jsonl and tensorboard/ live)
    run_name: str  # names the tracked run: <run_name>-<stage>
    group: str  # the run, all stages
    project: str
    experiment: str
    tags: list[str]
    params: dict[str, Any]  # the resolved config, flattened
    resume_step: int  # the checkpoint's step (0: a new run)
    saved: dict[str, Any] = field(default_factory=dict)  # what this sink kept for resuming (its run id)

    def remember(self, sink: str, **values: Any) -> None:
        """Keep ``values`` for the next attempt of the same run (``work/tracking.json``)."""
        path = self.work / "tracking.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        state[sink] = {**state.get(sink, {}), **values}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)


@dataclass(frozen=True)
class MetricSink:
    name: str
    start: Callable[[SinkContext], SinkRun]
    description: str
    requires: str = ""
    """The import the sink needs, and the extra that installs it (``package:extra``)."""


class SinkError(Exception):
    """A sink that cannot start: the message says which and the fix."""


# -- the built-ins --------------------------------------------------------------------------------------------
class JsonlRun:
    def __init__(self, context: SinkContext) -> None:
        self.path = context.work / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop points past the checkpoint we resume from
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= context.resume_step
            ]
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        import time

        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")

    def close(self) -> None:
        pass


class TensorBoardRun:
    def __init__(self, context: SinkContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run hides what the killed one logged past its checkpoint.
        purge = context.resume_step + 1 if context.resume_step else None
        self.writer = SummaryWriter(str(context.work / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _External:
    """What W&B and MLflow share: a run id kept for resuming, and no step logged twice (a resumed run restarts
    at its checkpoint; what the killed attempt logged after it stays, and the same steps are not sent again)."""

    name = ""

    def __init__(self, context: SinkContext) -> None:
        self.context = context
        self.last_step = int(context.saved.get("last_step", 0)) if context.resume_step else 0

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if step <= self.last_step:
            return
        # Kept before sending: a kill in between loses this point at worst, and never sends it twice.
        self.context.remember(self.name, last_step=step)
        self.last_step = step
        self.send(step, values)

    def send(self, step: int, values: Mapping[str, float]) -> None:
        raise NotImplementedError


class WandbRun(_External):
    name = "wandb"

    def __init__(self, context: SinkContext) -> None:
        super().__init__(context)
        import wandb

        run_id = context.saved.get("run_id") if context.resume_step else None
        self.run = wandb.init(
            project=context.project,
            name=context.run_name,
            group=context.group,
            job_type=context.stage,
            tags=context.tags,
            config=context.params,
            dir=str(context.work),
            id=run_id,
            resume="allow" if run_id else None,
            reinit=True,
        )
        context.remember(self.name, run_id=self.run.id)

    def send(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


#: Connect/read timeout and retries for MLflow's HTTP client: an unreachable server fails the start in seconds.
MLFLOW_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


class MlflowRun(_External):
    name = "mlflow"

    def __init__(self, context: SinkContext) -> None:
        super().__init__(context)
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith("file:") or (uri and "://" not in uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for a file store by name
        # MLflow's own defaults (120 s per request, 7 retries with doubling waits) keep a run silent for minutes
        # when the server is out of reach; these are bounded, and a user's own settings win.
        for name, value in MLFLOW_BOUNDS.items():
            os.environ.setdefault(name, value)
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(context.experiment)
        run_id = context.saved.get("run_id") if context.resume_step else None
        self.run = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else context.run_name,
            tags={"dschat.run": context.group, "dschat.stage": context.stage, **{tag: "true" for tag in context.tags}},
        )
        if not run_id:
            params = {k: str(v)[:500] for k, v in context.params.items()}
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                mlflow.log_params(dict(list(params.items())[start : start + 100]))
        context.remember(self.name, run_id=self.run.info.run_id)

    def send(self, step: int, values: Mapping[str, float]) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


BUILTIN_SINKS = (
    MetricSink("jsonl", JsonlRun, "metrics.jsonl beside the model (always on)"),
    MetricSink(
        "tensorboard", TensorBoardRun, "TensorBoard event files in the stage's tensorboard/ folder", "tensorboard"
    ),
    MetricSink("wandb", WandbRun, "Weights & Biases (WANDB_MODE=offline works without network)", "wandb:wandb"),
    MetricSink(
        "mlflow", MlflowRun, "MLflow (MLFLOW_TRACKING_URI; file:./mlruns works without network)", "mlflow:mlflow"
    ),
)


def missing_package(sink: MetricSink) -> str:
    """'' when the sink's package imports here, else the one-line fix."""
    if not sink.requires:
        return ""
    package, _, extra = sink.requires.partition(":")
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        return ""
    fix = f'pip install "dschat-core[{extra}]"' if extra else f"pip install {package}"
    return (
        f"tracking sink {sink.name!r} needs the {package} package; fix: {fix}, or leave {sink.name} out of "
        "tracking.sinks"
    )


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def start_sinks(names: list[str], registry: Mapping[str, MetricSink], context: SinkContext) -> list[tuple[str, Any]]:
    """Every named sink, started; :class:`SinkError` names the first that cannot start and the fix."""
    started = []
    for name in names:
        sink = registry[name]
        problem = missing_package(sink)
        if problem:
            raise SinkError(problem)
        saved_all = (
            json.loads((context.work / "tracking.json").read_text())
            if (context.work / "tracking.json").exists()
            else {}
        )
        context.saved = saved_all.get(name, {})
        try:
            started.append((name, sink.start(context)))
        except Exception as exc:  # a sink's service or settings: the sink's own words, on one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SinkError(
                f"tracking sink {name!r} could not start: {type(exc).__name__}: {first}; fix: its "
                "settings (tracking:, and its own environment variables), or leave it out of "
                "tracking.sinks"
            ) from None
    return started


def warn_once(name: str, exc: BaseException) -> None:
    print(
        f"warning: tracking sink {name!r} failed ({type(exc).__name__}: {exc}); training goes on without it "
        "(metrics.jsonl has every point)",
        file=sys.stderr,
        flush=True,
    )
