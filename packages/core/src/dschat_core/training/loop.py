"""The training-loop core shared by the supervised stages: a stage supplies its model, collator, loss and
evaluation; this module does the rest (data, engine, epochs, accumulation, eval schedule, logging, checkpoints,
resume, final save)."""

from __future__ import annotations

import math
import sys
import time
from abc import ABC, abstractmethod
from typing import Any

import psutil
from tqdm import tqdm

from ..config import RunConfig, TrainStage
from ..errors import EXIT_STOPPED, UserError
from ..models import load_tokenizer
from ..plugins import get_dataset_formats
from .engine import Dist, apply_lora, init_distributed, make_engine, set_seed
from .outputs import Checkpointer, Metrics, acknowledge_stop, check_not_finished, info, save_final, stop_requested


class SupervisedStage(ABC):
    """What differs between stage 1 and stage 2."""

    name: str = ""
    always_trainable: tuple[str, ...] = ()

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.section: TrainStage = config.stage(self.name)

    @abstractmethod
    def build_model(self, tokenizer): ...

    @abstractmethod
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]: ...

    @abstractmethod
    def loss(self, engine, batch: dict[str, Any]) -> Any: ...

    @abstractmethod
    def evaluate(self, engine, loader, dist: Dist) -> dict[str, float]: ...

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return int(sum(v.numel() for k, v in batch.items() if k.endswith("input_ids")))

    def batch_samples(self, batch: dict[str, Any]) -> int:
        return int(next(iter(batch.values())).shape[0])


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def make_loader(dataset, batch_size: int, collate, dist: Dist, seed: int, shuffle: bool = True):
    """A distributed loader whose worker seed comes from its own generator: iterating it must not draw from the
    global RNG, or a resumed run would sample differently from an uninterrupted one."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )


def memory_gib(dist: Dist) -> float:
    if dist.accelerator == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(dist.device) / 1024**3
    return psutil.Process().memory_info().rss / 1024**3


def run_supervised(stage: SupervisedStage) -> int:
    import torch

    from ..data.pipeline import load_stage_data

    config, section = stage.config, stage.section
    dist = init_distributed()
    set_seed(config.seed)
    if not section.model_name_or_path or not section.output_dir:
        raise UserError(f"{stage.name}: model_name_or_path and output_dir must be resolved before the worker runs")
    check_not_finished(stage.name, section.output_dir, section.overwrite)
    tokenizer = load_tokenizer(section.model_name_or_path, config.trust_remote_code)
    data = load_stage_data(config, stage.name, tokenizer, get_dataset_formats())
    model = stage.build_model(tokenizer)
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lora_scaling = None
    if section.lora_dim > 0:
        model = apply_lora(
            model, section.lora_dim, section.lora_module_name, section.only_optimize_lora, stage.always_trainable
        )
        lora_scaling = 1.0 / section.lora_dim
        if section.gradient_checkpointing:
            model.enable_input_require_grads()

    train_loader = make_loader(data.train, section.per_device_train_batch_size, stage.collate, dist, config.seed)
    sampler = train_loader.sampler
    eval_loader = None
    if data.eval is not None and len(data.eval) > 0:
        eval_loader = make_loader(
            data.eval, section.per_device_eval_batch_size, stage.collate, dist, config.seed, shuffle=False
        )
    accum = section.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_steps = section.num_train_epochs * steps_per_epoch
    lr = section.learning_rate
    engine = make_engine(
        model,
        lr=lr,
        weight_decay=section.weight_decay,
        lora_lr=section.lora_learning_rate,
        scheduler_type=section.lr_scheduler_type,
        warmup=section.num_warmup_steps,
        total_steps=total_steps,
        micro_batch=section.per_device_train_batch_size,
        grad_accum=accum,
        zero_stage=section.zero_stage,
        dtype=section.dtype,
        offload=section.offload,
        dist=dist,
    )

    checkpointer = Checkpointer(section.output_dir, section.keep_last)
    state = {"epoch": 0, "micro_step": 0, "global_step": 0}
    if section.resume == "auto":
        restored = checkpointer.load({"model": engine})
        if restored:
            restored.pop("rank_state", None)
            state = restored
            info(
                f"resumed {stage.name} from {checkpointer.latest()} (epoch {state['epoch'] + 1}, "
                f"step {state['global_step']})"
            )
    metrics = Metrics(section.output_dir, section.enable_tensorboard, resume_step=state["global_step"])
    info(
        f"stage {stage.name}: {len(data.train)} train rows, world size {dist.world_size}, "
        f"{steps_per_epoch} steps/epoch × {section.num_train_epochs} epochs, ZeRO {section.zero_stage}, "
        f"{section.dtype}, LoRA {section.lora_dim or 'off'}"
    )

    def evaluate(label: str) -> dict[str, float]:
        if eval_loader is None:
            return {}
        engine.eval()
        with torch.no_grad():
            result = stage.evaluate(engine, eval_loader, dist)
        engine.train()
        metrics.log(
            state["global_step"],
            {f"eval/{k}": v for k, v in result.items()},
            echo=f"[{stage.name}] eval {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()),
        )
        return result

    if state["global_step"] == 0:
        evaluate("before training")
    last_eval: dict[str, float] = {}
    window_start, window_samples, window_tokens, window_loss, window_micro = time.monotonic(), 0, 0, 0.0, 0
    run_start = time.monotonic()
    start_step = state["global_step"]
    # A bar where a person watches a terminal; progress lines (with ETA) everywhere else.
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=stage.name,
        unit="step",
        disable=dist.rank != 0 or not sys.stderr.isatty(),
    )
    engine.train()
    for epoch in range(state["epoch"], section.num_train_epochs):
        sampler.set_epoch(epoch)
        skip = state["micro_step"] if epoch == state["epoch"] else 0
        for micro, batch in enumerate(train_loader):
            if micro < skip:
                continue
            batch = to_device(batch, dist.device)
            loss = stage.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            window_loss += loss.item()
            window_micro += 1
            window_samples += stage.batch_samples(batch) * dist.world_size
            window_tokens += stage.batch_tokens(batch) * dist.world_size
            state.update(epoch=epoch, micro_step=micro + 1)
            if (micro + 1) % accum != 0 and micro + 1 != len(train_loader):
                continue
            state["global_step"] += 1
            step = state["global_step"]
            bar.update(1)
            if step % section.print_interval == 0 or step == total_steps:
                elapsed = time.monotonic() - window_start
                done = step - start_step
                eta = (time.monotonic() - run_start) / max(1, done) * (total_steps - step)
                values = {
                    "train/loss": window_loss / max(1, window_micro),
                    "train/lr": engine.get_lr()[0],
                    "train/samples_per_s": window_samples / elapsed,
                    "train/tokens_per_s": window_tokens / elapsed,
                    "train/memory_gib": memory_gib(dist),
                    "epoch": epoch + 1,
                }
                metrics.log(
                    step,
                    values,
                    echo=(
                        f"[{stage.name}] epoch {epoch + 1}/{section.num_train_epochs} step {step}/{total_steps} "
                        f"loss {values['train/loss']:.4f} lr {values['train/lr']:.3g} "
                        f"samples/s {values['train/samples_per_s']:.1f} mem {values['train/memory_gib']:.2f} GiB "
                        f"eta {eta:.0f}s"
                    ),
                )
                window_start, window_samples, window_tokens, window_loss, window_micro = time.monotonic(), 0, 0, 0.0, 0
            if section.eval_interval and step % section.eval_interval == 0:
                last_eval = evaluate(f"step {step}")
            if section.save_interval and step % section.save_interval == 0:
                checkpointer.save({"model": engine}, state)
            if stop_requested(dist.device):
                checkpointer.save({"model": engine}, state)
                acknowledge_stop(stage.name, step)
                return EXIT_STOPPED
        state.update(epoch=epoch + 1, micro_step=0)
        last_eval = evaluate(f"epoch {epoch + 1}/{section.num_train_epochs}")
        checkpointer.save({"model": engine}, state)
    bar.close()
    metrics.close()
    summary = {
        "stage": stage.name,
        "global_step": state["global_step"],
        **{f"eval/{k}": v for k, v in last_eval.items()},
    }
    save_final(engine.module, tokenizer, section.output_dir, section.zero_stage, lora_scaling, summary)
    info(f"[{stage.name}] saved the final model to {section.output_dir}")
    return 0
