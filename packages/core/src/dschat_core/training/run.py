"""The run chassis: what every training stage does around its own steps.

A :class:`Stage` supplies its data and models (``setup``), one optimizer step at a time (``train_step``), its
evaluation and its final save. :func:`run_stage` does the rest, the same for every stage: distributed setup and
seed, the finished-output guard, the tokenizer, resume from the last checkpoint, metrics and TensorBoard, the
progress bar and lines with ETA, the eval / checkpoint / stop-request schedule, ``max_steps``, the policy for
non-finite values, and the final summary.
"""

from __future__ import annotations

import json
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import RunConfig, StageSettings
from ..errors import EXIT_STOPPED, TrainingStopped, UserError
from .checkpoints import Checkpointer
from .distributed import Dist, all_reduce_sum, broadcast_text, info, init_distributed, set_seed, warn
from .metrics import Metrics
from .saving import OutputLock, check_not_finished, clean_leftovers, finished
from .stopping import acknowledge_stop, announce_training, stop_requested


class NonFinite(Exception):
    """A step cannot be used (a NaN or inf on some rank, a reward function that failed); the message says what,
    the chassis adds where, and stops the run or skips the batch (``on_nonfinite``). ``fix`` says what to change
    when the cause is known (a reward function's output), instead of the generic advice on training numerics."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.fix = fix


def check_finite(device, **tensors) -> None:
    """Raise :class:`NonFinite` on every rank when any rank holds a NaN or inf in any of ``tensors``."""
    import torch

    flags = [0.0 if bool(torch.isfinite(t).all()) else 1.0 for t in tensors.values()]
    flags = all_reduce_sum(flags, device)
    names = [name for name, flag in zip(tensors, flags, strict=True) if flag > 0]
    if names:
        raise NonFinite("non-finite " + ", ".join(names))


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


#: Keys that may change between a run and its resumption: how it is watched and kept, and how long it runs.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "num_train_epochs",
        "max_steps",
        "print_interval",
        "eval_interval",
        "eval_before_training",
        "save_interval",
        "save_each_epoch",
        "keep_last",
        "resume",
        "overwrite",
        "on_nonfinite",
        "enable_tensorboard",
        "eval_prompts",
        "eval_iters",
        "per_device_eval_batch_size",
        "eval_samples",
        "eval_max_new_tokens",
        "retries",
        "max_skipped_in_a_row",
        "max_steps_without_signal",
        "reward_function_timeout",
    }
)


def run_signature(config: RunConfig, stage: str) -> dict[str, Any]:
    """What a checkpoint is only valid for: the stage's settings (bar :data:`RESUMABLE_CHANGES`), the data, the
    seed and the world size (ZeRO partitions its states per rank)."""
    section = config.stage(stage).model_dump(mode="json")
    signature = {f"{stage}.{k}": v for k, v in section.items() if k not in RESUMABLE_CHANGES}
    data = config.data.model_dump(mode="json", exclude={"cache_dir", "num_proc", "strict"})
    signature.update({f"data.{k}": v for k, v in data.items()})
    signature.update({"seed": config.seed, "topology.world_size": config.topology.world_size})
    return signature


def signature_differences(now: dict[str, Any], before: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The settings in which a checkpoint's run differs from this one. A setting the checkpoint does not name was
    added to dschat since it was written: it differs only if this run moves it off its default (which the older
    version behaved as)."""
    return sorted(k for k, v in now.items() if before.get(k) != v and not (k not in before and defaults.get(k) == v))


class _Run:
    """One run of a stage on the chassis: its state, and the schedule around the stage's steps."""

    def __init__(self, stage: Stage, dist: Dist) -> None:
        self.stage, self.dist = stage, dist
        self.name, self.section = stage.name, stage.section
        assert self.section.output_dir
        self.checkpointer = Checkpointer(self.section.output_dir, self.section.keep_last)
        self.checkpoint: Path | None = None  # the one resumed from, chosen by decide()
        self.skipped_in_a_row = 0
        self.total, self.start_step, self.start_time = 0, 0, time.monotonic()
        self.window = _Window()
        self.state: dict[str, Any] = {
            "epoch": 0,
            "position": 0,
            "global_step": 0,
            "skipped": 0,
            "last_eval_step": None,
            "last_eval": {},
            "eval_before": {},
            "stage": {},
            "signature": run_signature(stage.config, self.name),
        }

    # -- start -----------------------------------------------------------------------------------------------
    def decide(self) -> dict[str, Any] | None:
        """Before any model is built: the checkpoint state to resume from (None: from step 0); start over where
        told to (``overwrite`` on a finished output, ``resume: never``); refuse a checkpoint of a different run,
        naming the difference."""
        section = self.section
        # Rank 0 looks and tells the others: a rank that looked after rank 0 started deleting would decide apart.
        found: dict[str, Any] = {"path": None, "notes": [], "state": None}
        if self.dist.rank == 0:
            path, notes = self.checkpointer.choose()
            state = json.loads((path / "state.json").read_text()) if path else None
            found = {"path": str(path) if path else None, "notes": notes, "state": state}
        found = json.loads(broadcast_text(json.dumps(found)))
        saved, notes = found["state"], found["notes"]
        self.checkpoint = Path(found["path"]) if found["path"] else None
        fresh = section.resume == "never" or (section.overwrite and finished(section.output_dir))
        if fresh:
            why = "resume: never" if section.resume == "never" else "overwrite: true on a finished output"
            info(
                f"[{self.name}] {why}: starting over from step 0"
                f"{'; its checkpoints are deleted' if saved else ''} (the output is replaced when this run ends)"
            )
            if saved is not None:
                self.checkpointer.clear()
            return None
        for note in notes:
            warn(f"{self.name}: {note}")
        if saved is None:
            if self.checkpointer.steps():
                raise UserError(
                    f"{self.name}: no usable checkpoint in {self.checkpointer.root} ({notes[-1]}); fix: set "
                    f"{self.name}.resume=never to start over (its checkpoints are deleted), or restore the files"
                )
            if notes:
                info(f"[{self.name}] no checkpoint to resume from: starting from step 1")
            return None
        if notes:
            info(f"[{self.name}] resuming from {self.checkpoint}, the newest usable checkpoint")
        defaults = run_signature(type(self.stage.config)(), self.name)
        differs = signature_differences(self.state["signature"], saved.get("signature", {}), defaults)
        if differs:
            old = saved.get("signature", {})
            shown = ", ".join(f"{k} = {old.get(k)!r} there, {self.state['signature'][k]!r} now" for k in differs[:4])
            raise UserError(
                f"{self.name}: the checkpoint in {self.checkpoint} belongs to another run ({shown}); fix: "
                f"set {self.name}.resume=never to start over, restore those settings to resume, or choose another "
                "output_dir or run_name"
            )
        return saved

    def start_metrics(self, saved: dict[str, Any] | None) -> None:
        """The metric sinks, started before the models are built: one that cannot start stops the run at once."""
        step = int(saved.get("global_step", 0)) if saved else 0
        self.metrics = Metrics(self.stage.config, self.name, str(self.section.output_dir), resume_step=step)

    def resume(self, saved: dict[str, Any] | None) -> None:
        """Load the engines and run state of the checkpoint :meth:`decide` chose (the stage is set up)."""
        if saved is None:
            return
        restored = self.checkpointer.load(self.stage.engines(), self.checkpoint)
        assert restored is not None
        self.stage.load_rank_state(restored.pop("rank_state", {}))
        self.state.update(restored)
        self.stage.load_state(self.state["stage"])
        info(
            f"resumed {self.name} from {self.checkpoint} (epoch {self.state['epoch'] + 1}, "
            f"step {self.state['global_step']})"
        )

    # -- what happens around steps -------------------------------------------------------------------------
    def evaluate(self, label: str) -> dict[str, float]:
        step = self.state["global_step"]
        try:
            result = {f"eval/{k}": v for k, v in self.stage.evaluate(step).items()}
        except NonFinite as exc:  # held-out data has nothing to skip: the run cannot be judged
            raise TrainingStopped(
                f"{exc} in the evaluation {label} (step {step}); fix: the reward function, or the held-out data"
            ) from None
        shown = ", ".join(f"{k[5:]} {v:.4g}" for k, v in result.items())
        self.metrics.log(step, result, echo=f"[{self.name}] eval {label}: {shown}")
        self.state.update(last_eval=result, last_eval_step=step)
        return result

    def save(self) -> None:
        state = {**self.state, "stage": self.stage.state()}
        self.checkpointer.save(self.stage.engines(), state, rank_state=self.stage.rank_state())

    def skip(self, exc: NonFinite, where: str) -> None:
        if self.section.on_nonfinite == "stop":
            fix = exc.fix or "lower the learning rate, use bf16 or fp32 instead of fp16"
            raise TrainingStopped(
                f"{exc} at {where}; fix: {fix}, or set {self.name}.on_nonfinite=skip to drop such batches"
            ) from None
        warn(f"skipped the batch at {where}: {exc}")
        self.stage.drop_partial()
        self.state.update(position=self.stage.position, skipped=self.state["skipped"] + 1)
        self.skipped_in_a_row += 1
        limit = self.section.max_skipped_in_a_row
        if self.skipped_in_a_row >= limit:
            raise TrainingStopped(
                f"{self.name}: the last {limit} batches in a row were skipped (the last at {where}: {exc}); the run "
                f"is learning nothing; fix: {exc.fix or 'lower the learning rate, use bf16 or fp32 instead of fp16'}"
                f", or raise {self.name}.max_skipped_in_a_row"
            )

    def progress(self, epoch: int, step: int) -> None:
        values = {**self.window.values(), "train/memory_gib": memory_gib(self.dist), "epoch": epoch + 1}
        done = max(1, step - self.start_step)
        eta = (time.monotonic() - self.start_time) / done * (self.total - step)
        self.metrics.log(
            step,
            values,
            echo=(
                f"[{self.name}] epoch {epoch + 1}/{self.section.num_train_epochs} step {step}/{self.total} "
                f"{self.stage.progress(values)} eta {eta:.0f}s"
            ),
        )
        self.window = _Window()

    def after_step(self, epoch: int, result: StepResult) -> bool:
        """Log, evaluate and checkpoint on schedule; True when asked to stop (a checkpoint is saved then)."""
        section, step = self.section, self.state["global_step"]
        self.bar.update(1)
        self.window.add(result)
        if step % section.print_interval == 0 or step == self.total:
            self.progress(epoch, step)
        if section.eval_interval and step % section.eval_interval == 0:
            self.evaluate(f"step {step}")
        if section.save_interval and step % section.save_interval == 0:
            self.save()
        if stop_requested(self.dist.device):
            self.save()
            acknowledge_stop(self.name, step)
            return True
        return False

    def epoch(self, epoch: int) -> str:
        """Steps until the epoch's data is used up ("done"), ``max_steps`` is reached ("limit") or a stop is asked
        ("stopped")."""
        state = self.state
        self.stage.begin_epoch(epoch, state["position"] if epoch == state["epoch"] else 0)
        while state["global_step"] < self.total:
            try:
                result = self.stage.train_step()
            except NonFinite as exc:
                self.skip(exc, f"step {state['global_step'] + 1} (epoch {epoch + 1}, batch {self.stage.position})")
                continue
            if result is None:
                return "done"
            self.skipped_in_a_row = 0
            state.update(epoch=epoch, position=self.stage.position, global_step=state["global_step"] + 1)
            if self.after_step(epoch, result):
                return "stopped"
        return "limit"

    # -- the whole run ---------------------------------------------------------------------------------------
    def run(self) -> int:
        section, state = self.section, self.state
        self.total = planned_steps(section, self.stage.steps_per_epoch())
        info(self.stage.describe())
        if state["global_step"] == 0 and section.eval_before_training and state["last_eval_step"] is None:
            state["eval_before"] = self.evaluate("before training")
        # A bar where a person watches a terminal; progress lines (with ETA) everywhere else.
        self.bar = tqdm(
            total=self.total,
            initial=state["global_step"],
            desc=self.name,
            unit="step",
            disable=self.dist.rank != 0 or not sys.stderr.isatty(),
        )
        self.window, self.start_time, self.start_step = _Window(), time.monotonic(), state["global_step"]
        announce_training()
        for epoch in range(state["epoch"], section.num_train_epochs):
            if state["global_step"] >= self.total:
                break
            ended = self.epoch(epoch)
            if ended == "stopped":
                return EXIT_STOPPED
            if ended == "limit":
                break
            state.update(epoch=epoch + 1, position=0)
            if self.stage.eval_every_epoch:
                self.evaluate(f"epoch {epoch + 1}/{section.num_train_epochs}")
            if section.save_each_epoch:
                self.save()
        self.bar.close()
        if state["last_eval_step"] != state["global_step"]:
            self.evaluate("end")
        self.stage.save_final(
            {
                "stage": self.name,
                "global_step": state["global_step"],
                "skipped_steps": state["skipped"],
                **state["last_eval"],
                **{f"{k}_before": v for k, v in state["eval_before"].items()},
            }
        )
        return 0


def run_stage(stage: Stage) -> int:
    """Run ``stage`` to a finished output (0), or until a stop request (checkpoint saved, 75)."""
    from ..launch import check_cpu_stage, cpu_bf16_warning, cpu_flags
    from ..models import load_tokenizer

    config, section, name = stage.config, stage.section, stage.name
    dist = init_distributed()
    set_seed(config.seed)
    if dist.accelerator == "cpu":  # what only the worker sees: the accelerator it actually got
        check_cpu_stage(config, name)
        warning = cpu_bf16_warning(config, name, cpu_flags())
        if warning and dist.rank == 0:
            print(warning, file=sys.stderr, flush=True)
    if not section.output_dir:
        raise UserError(f"{name}: output_dir must be resolved before the worker runs")
    check_not_finished(name, section.output_dir, section.overwrite)
    with OutputLock(name, section.output_dir, dist.device):
        clean_leftovers(section.output_dir)
        run = _Run(stage, dist)
        saved = run.decide()
        run.start_metrics(saved)
        try:
            stage.setup(dist, load_tokenizer(stage.tokenizer_path(), config.trust_remote_code))
            run.resume(saved)
            return run.run()
        finally:
            run.metrics.close()
