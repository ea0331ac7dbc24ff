"""What stages 1 and 2 share on the run chassis: one trained model, a loader of rows, gradient accumulation.

A subclass supplies the model, the collator, the loss and the held-out evaluation (a pure function of a model and
batches, so that ``dschat-core eval`` computes exactly what training logs).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

from ..config import TrainStage
from ..plugins import get_dataset_formats
from ..training.batching import eval_batches, make_loader, row_lengths, to_device
from ..training.distributed import Dist
from ..training.engine import EngineSpec, build_engine
from ..training.run import Stage, StepResult, check_finite, planned_steps
from ..training.saving import save_final


def engine_spec(section: TrainStage, total_steps: int, always_trainable: tuple[str, ...] = ()) -> EngineSpec:
    """A stage-1/2 section as an engine spec (the keys are DeepSpeed-Chat's flags)."""
    return EngineSpec(
        zero_stage=section.zero_stage,
        dtype=section.dtype,
        offload=section.offload,
        learning_rate=section.learning_rate,
        weight_decay=section.weight_decay,
        scheduler_type=section.lr_scheduler_type,
        warmup=section.num_warmup_steps,
        total_steps=total_steps,
        micro_batch=section.per_device_train_batch_size,
        grad_accum=section.gradient_accumulation_steps,
        lora_dim=section.lora_dim,
        lora_module_name=section.lora_module_name,
        lora_learning_rate=section.lora_learning_rate,
        only_optimize_lora=section.only_optimize_lora,
        always_trainable=always_trainable,
        gradient_checkpointing=section.gradient_checkpointing,
        compile=section.compile,
    )


class SupervisedStage(Stage):
    """One model trained on rows of the stage's data share."""

    eval_every_epoch = True
    always_trainable: tuple[str, ...] = ()
    section: TrainStage

    # -- what a supervised stage supplies -----------------------------------------------------------------------
    @abstractmethod
    def build_model(self, tokenizer): ...

    @abstractmethod
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]: ...

    @abstractmethod
    def loss(self, engine, batch: dict[str, Any]) -> Any: ...

    @abstractmethod
    def evaluate_model(self, model, batches, dist: Dist) -> dict[str, float]:
        """Held-out figures of ``model`` (an engine or a plain model) over weighted ``batches`` (``eval_batches``)."""

    def train_collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The training loader's batches (the held-out ones always come from ``collate``)."""
        return self.collate(rows)

    def loss_and_metrics(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        """The loss to backpropagate and what else the step logs (``train/...``), means over the micro-batch."""
        return self.loss(engine, batch), {}

    def prepare_data(self, data):
        """The stage's tokenized rows, before the loader and the engine are built (a stage may add columns)."""
        return data

    def eval_rows(self, eval_data):
        """The held-out rows an evaluation reads (all by default)."""
        return eval_data

    def batch_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].shape[0])

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    # -- the chassis's side ------------------------------------------------------------------------------------
    def tokenizer_path(self) -> str:
        assert self.section.model_name_or_path, f"{self.name}.model_name_or_path must be resolved"
        return self.section.model_name_or_path

    def setup(self, dist: Dist, tokenizer) -> None:
        from ..data.pipeline import load_stage_data

        section, config = self.section, self.config
        self.dist, self.tokenizer = dist, tokenizer
        self.data = self.prepare_data(load_stage_data(config, self.name, tokenizer, get_dataset_formats()))
        lengths = row_lengths(self.data.train) if section.group_by_length else None
        self.loader = make_loader(
            self.data.train, section.per_device_train_batch_size, self.train_collate, dist, config.seed, lengths=lengths
        )
        self.accum = section.gradient_accumulation_steps
        # (values, samples, tokens) of the micro-batches since the last update
        self.pending: list[tuple[dict[str, float], int, int]] = []
        self.spec = engine_spec(section, planned_steps(section, self.steps_per_epoch()), self.always_trainable)
        self.engine = build_engine(self.build_model(tokenizer), self.spec, dist)
        self.engine.train()

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.loader) / self.accum)

    def engines(self) -> dict[str, Any]:
        return {"model": self.engine}

    def describe(self) -> str:
        s = self.section
        return (
            f"stage {self.name}: {len(self.data.train)} train rows, world size {self.dist.world_size}, "
            f"{self.steps_per_epoch()} steps/epoch × {s.num_train_epochs} epochs, ZeRO {s.zero_stage}, "
            f"{s.dtype}, LoRA {s.lora_dim or 'off'}"
        )

    def begin_epoch(self, epoch: int, position: int) -> None:
        self.loader.sampler.set_epoch(epoch)
        self.batches = iter(self.loader)
        for _ in range(position):
            next(self.batches)
        self.position = position

    def train_step(self) -> StepResult | None:
        """``gradient_accumulation_steps`` micro-batches (fewer at the end of the epoch), one optimizer update;
        the engine's accumulation boundary is set to match, so a step here is an update there."""
        for batch in self.batches:
            self.position += 1
            batch = to_device(batch, self.dist.device)
            boundary = len(self.pending) + 1 == self.accum or self.position == len(self.loader)
            self.engine.set_gradient_accumulation_boundary(boundary)
            loss, extra = self.loss_and_metrics(self.engine, batch)
            check_finite(self.dist.device, loss=loss.detach())
            self.engine.backward(loss)
            self.engine.step()
            self.pending.append(
                (
                    {"train/loss": float(loss.detach()), **extra},
                    self.batch_samples(batch) * self.dist.world_size,
                    self.batch_tokens(batch) * self.dist.world_size,
                )
            )
            if boundary:
                break
        if not self.pending:
            return None
        parts = [values for values, _, _ in self.pending]
        samples = sum(n for _, n, _ in self.pending)
        tokens = sum(n for _, _, n in self.pending)
        self.pending = []
        values = {key: sum(p[key] for p in parts) / len(parts) for key in parts[0]}
        values["train/lr"] = self.engine.get_lr()[0]
        return StepResult(values, samples, tokens)

    def drop_partial(self) -> None:
        # The bad micro-batch never reached backward; what was accumulated before it stays for the next update.
        pass

    def progress(self, values: dict[str, Any]) -> str:
        return (
            f"loss {values['train/loss']:.4f} lr {values['train/lr']:.3g} "
            f"samples/s {values.get('train/samples_per_s', 0.0):.1f} mem {values['train/memory_gib']:.2f} GiB"
        )

    def evaluate(self, step: int) -> dict[str, float]:
        if self.data.eval is None or len(self.data.eval) == 0:
            return {}
        import torch

        rows = self.eval_rows(self.data.eval)
        batch_size = self.section.per_device_eval_batch_size
        self.engine.eval()
        with torch.no_grad():
            result = self.evaluate_model(
                self.engine, eval_batches(rows, batch_size, self.collate, self.dist), self.dist
            )
        self.engine.train()
        return result

    def save_final(self, summary: dict[str, Any]) -> None:
        from ..training.distributed import info

        s = self.section
        assert s.output_dir
        save_final(self.engine.module, self.tokenizer, s.output_dir, s.zero_stage, self.spec.lora_scaling, summary)
        info(f"[{self.name}] saved the final model to {s.output_dir}")


def weighted_batches(batches, device):
    """Each batch on the device, with its per-row weights (1 real, 0 padding copy)."""
    for batch in batches:
        batch = to_device(batch, device)
        yield batch, batch.pop("weight").float()
