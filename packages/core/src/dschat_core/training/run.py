"""The run chassis: what every training stage does around its own steps.

A :class:`Stage` supplies its data and models (``setup``), one optimizer step at a time (``train_step``), its
evaluation and its final save. :func:`run_stage` does the rest, the same for every stage: distributed setup and
seed, the finished-output guard, the tokenizer, resume from the last checkpoint, metrics and TensorBoard, the
progress bar and lines with ETA, the eval / checkpoint / stop-request schedule, ``max_steps``, the policy for
non-finite values, and the final summary.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from ..config import RunConfig, StageSettings
from ..errors import EXIT_STOPPED, TrainingStopped, UserError
from .checkpoints import Checkpointer
from .distributed import Dist, all_reduce_sum, info, init_distributed, set_seed, warn
from .metrics import Metrics
from .saving import check_not_finished, clean_leftovers
from .stopping import acknowledge_stop, stop_requested


class NonFinite(Exception):
    """A quantity that must be finite is not (on some rank); the message names it."""


def check_finite(device, **tensors) -> None:
    """Raise :class:`NonFinite` on every rank when any rank holds a NaN or inf in any of ``tensors``."""
    import torch

    flags = [0.0 if bool(torch.isfinite(t).all()) else 1.0 for t in tensors.values()]
    flags = all_reduce_sum(flags, device)
    names = [name for name, flag in zip(tensors, flags, strict=True) if flag > 0]
    if names:
        raise NonFinite(", ".join(names))


def memory_gib(dist: Dist) -> float:
    """Peak accelerator memory on GPUs; resident memory of this rank's process on the CPU."""
    if dist.accelerator == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(dist.device) / 1024**3
    import psutil

    return psutil.Process().memory_info().rss / 1024**3


@dataclass
class StepResult:
    """What one optimizer step produced: values to log (means over the step) and, for throughput, the samples
    and tokens it trained on over all ranks."""

    values: dict[str, float]
    samples: int = 0
    tokens: int = 0


class Stage(ABC):
    """What differs between stages. ``position`` counts the data batches consumed in the current epoch; the
    chassis saves it and hands it back on resume."""

    name: str = ""
    #: Evaluate at the end of each epoch (stages 1 and 2, as DeepSpeed-Chat) besides every ``eval_interval``.
    eval_every_epoch: bool = False

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.section: StageSettings = config.stage(self.name)
        self.position = 0

    # -- what a stage must supply ----------------------------------------------------------------------------
    @abstractmethod
    def tokenizer_path(self) -> str:
        """The model folder whose tokenizer the stage uses."""

    @abstractmethod
    def setup(self, dist: Dist, tokenizer) -> None:
        """Load the data and build the engines."""

    @abstractmethod
    def steps_per_epoch(self) -> int: ...

    @abstractmethod
    def engines(self) -> dict[str, Any]:
        """The engines a checkpoint holds, by name."""

    @abstractmethod
    def begin_epoch(self, epoch: int, position: int) -> None:
        """Start iterating epoch ``epoch`` of the data, skipping the first ``position`` batches."""

    @abstractmethod
    def train_step(self) -> StepResult | None:
        """One optimizer step (raise :class:`NonFinite` before updating on a bad value); None when the epoch's data
        is used up."""

    @abstractmethod
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out figures, without the ``eval/`` prefix."""

    @abstractmethod
    def save_final(self, summary: dict[str, Any]) -> None:
        """Write the final model(s) and mark the output finished."""

    @abstractmethod
    def describe(self) -> str:
        """One line: what is being trained, on what, how."""

    # -- optional -------------------------------------------------------------------------------------------------
    def progress(self, values: dict[str, Any]) -> str:
        """The stage's part of a progress line."""
        return " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items() if isinstance(v, float))

    def state(self) -> dict[str, Any]:
        """Extra run state to checkpoint (JSON)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional, nothing by default
        """Restore what :meth:`state` returned."""

    def rank_state(self) -> dict[str, Any]:
        """This rank's tensors to checkpoint (e.g. its ZeRO-3 partition of an EMA model)."""
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional, nothing by default
        """Restore what :meth:`rank_state` returned."""

    def drop_partial(self) -> None:  # noqa: B027 - optional, nothing by default
        """Forget a step's half-collected work after a skipped non-finite value."""


@dataclass
class _Window:
    """Steps since the last progress line: means of their values, throughput over the wall time."""

    start: float = field(default_factory=time.monotonic)
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.samples += result.samples
        self.tokens += result.tokens
        for key, value in result.values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def values(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        values = {key: total / max(1, self.steps) for key, total in self.sums.items()}
        if self.samples:
            values["train/samples_per_s"] = self.samples / elapsed
            values["train/tokens_per_s"] = self.tokens / elapsed
        return values


def planned_steps(section: StageSettings, steps_per_epoch: int) -> int:
    """Steps the run will take: every epoch, or ``max_steps`` when that comes first."""
    total = steps_per_epoch * section.num_train_epochs
    return min(total, section.max_steps) if section.max_steps else total


def run_stage(stage: Stage) -> int:
    """Run ``stage`` to a finished output (0), or until a stop request (checkpoint saved, 75)."""
    from ..launch import check_cpu_stage
    from ..models import load_tokenizer

    config, section, name = stage.config, stage.section, stage.name
    dist = init_distributed()
    set_seed(config.seed)
    if dist.accelerator == "cpu":  # what only the worker sees: the accelerator it actually got
        check_cpu_stage(config, name)
    if not section.output_dir:
        raise UserError(f"{name}: output_dir must be resolved before the worker runs")
    output_dir = section.output_dir
    check_not_finished(name, output_dir, section.overwrite)
    clean_leftovers(output_dir)
    tokenizer = load_tokenizer(stage.tokenizer_path(), config.trust_remote_code)
    stage.setup(dist, tokenizer)

    checkpointer = Checkpointer(output_dir, section.keep_last)
    state: dict[str, Any] = {
        "epoch": 0,
        "position": 0,
        "global_step": 0,
        "skipped": 0,
        "last_eval_step": None,
        "last_eval": {},
        "eval_before": {},
        "stage": {},
    }
    if section.resume == "auto":
        restored = checkpointer.load(stage.engines())
        if restored:
            stage.load_rank_state(restored.pop("rank_state", {}))
            state.update(restored)
            stage.load_state(state["stage"])
            info(
                f"resumed {name} from {checkpointer.latest()} (epoch {state['epoch'] + 1}, step {state['global_step']})"
            )
    metrics = Metrics(output_dir, section.enable_tensorboard, resume_step=state["global_step"])
    total = planned_steps(section, stage.steps_per_epoch())
    info(stage.describe())

    def evaluate(label: str) -> dict[str, float]:
        step = state["global_step"]
        result = {f"eval/{k}": v for k, v in stage.evaluate(step).items()}
        shown = ", ".join(f"{k[5:]} {v:.4g}" for k, v in result.items())
        metrics.log(step, result, echo=f"[{name}] eval {label}: {shown}")
        state.update(last_eval=result, last_eval_step=step)
        return result

    def save() -> None:
        checkpointer.save(stage.engines(), {**state, "stage": stage.state()}, rank_state=stage.rank_state())

    if state["global_step"] == 0 and section.eval_before_training and state["last_eval_step"] is None:
        state["eval_before"] = evaluate("before training")
    # A bar where a person watches a terminal; progress lines (with ETA) everywhere else.
    bar = tqdm(
        total=total,
        initial=state["global_step"],
        desc=name,
        unit="step",
        disable=dist.rank != 0 or not sys.stderr.isatty(),
    )
    window, run_start, start_step = _Window(), time.monotonic(), state["global_step"]
    for epoch in range(state["epoch"], section.num_train_epochs):
        if state["global_step"] >= total:
            break
        stage.begin_epoch(epoch, state["position"] if epoch == state["epoch"] else 0)
        while state["global_step"] < total:
            step = state["global_step"] + 1
            try:
                result = stage.train_step()
            except NonFinite as exc:
                where = f"step {step} (epoch {epoch + 1}, batch {stage.position})"
                if section.on_nonfinite == "stop":
                    raise TrainingStopped(
                        f"non-finite {exc} at {where}; fix: lower the learning rate, use bf16 or fp32 instead of "
                        f"fp16, or set {name}.on_nonfinite=skip to drop such batches"
                    ) from None
                warn(f"skipped the batch at {where}: non-finite {exc}")
                stage.drop_partial()
                state.update(position=stage.position, skipped=state["skipped"] + 1)
                continue
            if result is None:
                break
            state.update(epoch=epoch, position=stage.position, global_step=step)
            bar.update(1)
            window.add(result)
            if step % section.print_interval == 0 or step == total:
                values = {**window.values(), "train/memory_gib": memory_gib(dist), "epoch": epoch + 1}
                eta = (time.monotonic() - run_start) / max(1, step - start_step) * (total - step)
                metrics.log(
                    step,
                    values,
                    echo=(
                        f"[{name}] epoch {epoch + 1}/{section.num_train_epochs} step {step}/{total} "
                        f"{stage.progress(values)} eta {eta:.0f}s"
                    ),
                )
                window = _Window()
            if section.eval_interval and step % section.eval_interval == 0:
                evaluate(f"step {step}")
            if section.save_interval and step % section.save_interval == 0:
                save()
            if stop_requested(dist.device):
                save()
                acknowledge_stop(name, step)
                return EXIT_STOPPED
        else:  # max_steps reached inside the epoch
            break
        state.update(epoch=epoch + 1, position=0)
        if stage.eval_every_epoch:
            evaluate(f"epoch {epoch + 1}/{section.num_train_epochs}")
        if section.save_each_epoch:
            save()
    bar.close()
    if state["last_eval_step"] != state["global_step"]:
        evaluate("end")
    metrics.close()
    summary = {
        "stage": name,
        "global_step": state["global_step"],
        "skipped_steps": state["skipped"],
        **state["last_eval"],
        **{f"{k}_before": v for k, v in state["eval_before"].items()},
    }
    stage.save_final(summary)
    return 0
