"""DPO and its variants (``dpo.loss``: sigmoid, ipo, hinge, robust, simpo, orpo) on the run chassis: one trained
policy (stage 1's model by default) on the stage-2 share of the preference pairs, against a frozen reference.

Where the reference's log-probabilities come from:
- ``none``: the reference-free losses (simpo, orpo) use none;
- ``adapters``: with LoRA training only the adapters (``only_optimize_lora``) and the reference the policy's own
  starting point, the reference *is* the policy with its adapters switched off: no second copy of the weights;
- ``precomputed`` (``precompute_ref_logprobs``): computed once by a reference engine that is freed before training,
  and cached beside the tokenized data, keyed by it and by the reference model;
- ``engine``: a frozen reference engine beside the policy.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..config import DPO, RunConfig
from ..models import load_causal_lm
from ..training import dpo_math
from ..training.batching import eval_batches, pad_right
from ..training.checkpoints import work_dir
from ..training.distributed import Dist, all_reduce_sum, barrier, broadcast_text, info
from ..training.engine import EngineSpec, build_engine
from ..training.run import run_stage
from .rl.engines.hf import HFEngine
from .rl.evaluation import greedy_answers
from .supervised import SupervisedStage, weighted_batches

#: What an evaluation sums per pair (weighted), then divides by the pairs.
EVAL_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def reference_source(section: DPO) -> str:
    """none | adapters | precomputed | engine (see the module's docstring)."""
    if section.reference_free:
        return "none"
    if section.precompute_ref_logprobs:
        return "precomputed"
    same = section.ref_model_name_or_path in (None, section.model_name_or_path)
    return "adapters" if section.lora_dim and section.only_optimize_lora and same else "engine"


def reference_spec(section: DPO) -> EngineSpec:
    zero = (
        section.reference_zero_stage
        if section.reference_zero_stage is not None
        else (3 if section.zero_stage == 3 else 0)
    )
    return EngineSpec(
        zero_stage=zero,
        dtype=section.dtype,
        offload=section.offload_reference_model,
        train=False,
        micro_batch=section.per_device_train_batch_size,
    )


def _files_signature(path: str) -> list[tuple[str, int, int]]:
    folder = Path(path)
    if not folder.is_dir():
        return [(path, 0, 0)]  # a hub id: its name is the key
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


class DPOStage(SupervisedStage):
    name = "dpo"
    section: DPO

    def setup(self, dist: Dist, tokenizer) -> None:
        self.source = reference_source(self.section)
        self.reference = None
        super().setup(dist, tokenizer)  # calls prepare_data: the precomputed log-probs join the rows there
        if self.source == "engine":
            self.reference = build_engine(self.reference_model(), reference_spec(self.section), dist)
        held_out = self.data.eval if self.data.eval is not None and len(self.data.eval) else self.data.train
        count = min(self.section.eval_samples, len(held_out))
        self.sample_prompts = [list(r["chosen_input_ids"][: r["prompt_len"]]) for r in held_out.select(range(count))]

    def reference_model(self):
        section = self.section
        assert section.ref_model_name_or_path
        model = load_causal_lm(section.ref_model_name_or_path, 0.0, self.config.trust_remote_code)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def describe(self) -> str:
        return (
            super().describe()
            + f", loss {self.section.loss} (β {self.section.beta:g}), reference: "
            + {
                "none": "none (reference-free)",
                "adapters": "the policy with its LoRA adapters off",
                "precomputed": "precomputed log-probs (no reference engine in training)",
                "engine": "a frozen engine",
            }[self.source]
        )

    # -- rows and batches ----------------------------------------------------------------------------------------
    def build_model(self, tokenizer):
        model = load_causal_lm(self.tokenizer_path(), self.section.dropout, self.config.trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """[2B, L]: chosen rows, then rejected; ``answer_mask`` marks the answer tokens (after the prompt)."""
        import torch

        sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        ids, mask = pad_right(sequences, self.tokenizer.pad_token_id)
        starts = torch.tensor([r["prompt_len"] for r in rows] * 2).unsqueeze(1)
        answer = (torch.arange(ids.shape[1]).unsqueeze(0) >= starts) & (mask == 1)
        batch = {"input_ids": ids, "attention_mask": mask, "answer_mask": answer.long()}
        if rows and "ref_chosen" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows])
        return batch

    def batch_samples(self, batch) -> int:
        return int(batch["input_ids"].shape[0] // 2)

    # -- log-probabilities -----------------------------------------------------------------------------------
    @staticmethod
    def logps(model, batch) -> tuple[Any, Any, Any]:
        """(summed answer log-prob [2B], answer tokens [2B], logits)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logps, count = dpo_math.answer_logps(logits, batch["input_ids"], batch["answer_mask"])
        return logps, count, logits

    def reference_logps(self, policy, batch):
        import torch

        if self.source == "none":
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        with torch.no_grad():
            if self.source == "adapters":
                module = getattr(policy, "module", policy)
                with module.disable_adapter():
                    return self.logps(policy, batch)[0]
            assert self.reference is not None, "the reference model is not loaded"
            return self.logps(self.reference, batch)[0]

    def pair_losses(self, policy, batch) -> dict[str, Any]:
        """Per pair [B]: the loss and the implicit rewards; the policy's log-probs too."""
        section = self.section
        logps, count, logits = self.logps(policy, batch)
        half = logps.shape[0] // 2
        chosen, rejected, chosen_len, rejected_len = logps[:half], logps[half:], count[:half], count[half:]
        ref = self.reference_logps(policy, batch)
        nll = -chosen / chosen_len.clamp(min=1)  # the SFT loss on the chosen answer, per token
        beta = section.beta
        if section.loss == "simpo":
            loss, reward_c, reward_r = dpo_math.simpo(
                chosen, rejected, chosen_len, rejected_len, beta, section.simpo_gamma
            )
        elif section.loss == "orpo":
            loss, reward_c, reward_r = dpo_math.orpo(chosen, rejected, chosen_len, rejected_len, nll, beta)
        else:
            ref_c, ref_r = ref[:half], ref[half:]
            if section.loss == "ipo":
                loss, reward_c, reward_r = dpo_math.ipo(chosen, rejected, ref_c, ref_r, chosen_len, rejected_len, beta)
            elif section.loss == "hinge":
                loss, reward_c, reward_r = dpo_math.hinge(chosen, rejected, ref_c, ref_r, beta)
            elif section.loss == "robust":
                loss, reward_c, reward_r = dpo_math.robust(
                    chosen, rejected, ref_c, ref_r, beta, section.label_smoothing
                )
            else:
                loss, reward_c, reward_r = dpo_math.sigmoid(
                    chosen, rejected, ref_c, ref_r, beta, section.label_smoothing
                )
        if section.sft_weight:
            loss = loss + section.sft_weight * nll
        return {
            "loss": loss,
            "rewards/chosen": reward_c.detach(),
            "rewards/rejected": reward_r.detach(),
            "rewards/margins": (reward_c - reward_r).detach(),
            "rewards/accuracies": dpo_math.pair_accuracy(reward_c, reward_r),
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
        }

    def loss_and_metrics(self, engine, batch):
        parts = self.pair_losses(engine, batch)
        loss = parts["loss"].mean()
        return loss, {f"train/{k}": float(v.float().mean()) for k, v in parts.items() if k != "loss"}

    def loss(self, engine, batch):
        return self.loss_and_metrics(engine, batch)[0]

    def evaluate_model(self, model, batches, dist: Dist) -> dict[str, float]:
        """Held-out pairs: the loss, implicit rewards, margins, accuracy (chosen rewarded above rejected) and
        log-probs, means over pairs."""
        import torch

        sums = dict.fromkeys(EVAL_KEYS, 0.0)
        pairs = 0.0
        for batch, weight in weighted_batches(batches, dist.device):  # one weight per pair
            with torch.no_grad():
                parts = self.pair_losses(model, batch)
            for key in EVAL_KEYS:
                sums[key] += float(parts[key].float() @ weight)
            pairs += float(weight.sum())
        totals = all_reduce_sum([*sums.values(), pairs], dist.device)
        return {key: value / max(totals[-1], 1.0) for key, value in zip(EVAL_KEYS, totals, strict=False)}

    def evaluate(self, step: int) -> dict[str, float]:
        result = super().evaluate(step)
        if self.sample_prompts:  # greedy answers beside the figures, for people and a task's judge
            import torch.distributed as tdist

            self.engine.eval()
            synced = self.section.zero_stage == 3 and self.dist.world_size > 1
            records = greedy_answers(
                HFEngine(self.engine.module, self.tokenizer, synced=synced),
                self.tokenizer,
                self.sample_prompts,
                self.section.eval_max_new_tokens,
                self.section.per_device_eval_batch_size,
                self.dist,
            )
            self.engine.train()
            gathered: list[Any] = [records]
            if tdist.is_initialized():
                gathered = [None] * self.dist.world_size
                tdist.all_gather_object(gathered, records)
            if self.dist.rank == 0:
                assert self.section.output_dir
                path = work_dir(self.section.output_dir) / "samples" / f"step-{step}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r) + "\n" for part in gathered for r in part))
        return result

    # -- precomputed reference log-probs --------------------------------------------------------------------
    def prepare_data(self, data):
        """With ``precompute_ref_logprobs``: the reference runs once over the rows, before the policy is built,
        and is freed; the rows carry its log-probs (``ref_chosen``, ``ref_rejected``)."""
        if self.source != "precomputed":
            return data
        self.data = data
        self.reference = build_engine(self.reference_model(), reference_spec(self.section), self.dist)
        data.train, data.eval = self.precompute()
        self.reference = None  # training never runs it
        gc.collect()
        if self.dist.accelerator == "cuda":
            import torch

            torch.cuda.empty_cache()
        return data

    def precompute(self):
        """The reference's log-probs of every train and eval pair, computed once (each rank its share) and
        cached beside the tokenized data under a key of the data and the reference model."""
        import torch

        section = self.section
        key = hashlib.sha256(
            json.dumps(
                {
                    "data": self.data.cache_path,
                    "ref": section.ref_model_name_or_path,
                    "files": _files_signature(str(section.ref_model_name_or_path)),
                    "dtype": section.dtype,
                    "max_seq_len": section.max_seq_len,
                },
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:16]
        path = Path(self.data.cache_path) / f"ref-logps-{key}.pt"
        if broadcast_text("" if path.exists() else "compute") == "compute":  # every rank as rank 0 sees it
            splits = {"train": self.data.train, "eval": self.data.eval}
            computed = {name: self.score_rows(rows) for name, rows in splits.items() if rows is not None}
            if self.dist.rank == 0:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                torch.save(computed, tmp)
                os.replace(tmp, path)
            info(f"[dpo] reference log-probs computed and cached: {path}")
        else:
            info(f"[dpo] reference log-probs from the cache: {path}")
        barrier()
        cached = torch.load(path, weights_only=True)
        out: list[Any] = []
        for name, rows in (("train", self.data.train), ("eval", self.data.eval)):
            if rows is None:
                out.append(None)
                continue
            values = cached[name]
            rows = rows.add_column("ref_chosen", values[:, 0].tolist()).add_column(
                "ref_rejected", values[:, 1].tolist()
            )
            out.append(rows)
        return out[0], out[1]

    def score_rows(self, rows):
        """[N, 2] reference log-probs (chosen, rejected) of ``rows``, each rank scoring its share."""
        import torch
        import torch.distributed as tdist

        mine: list[list[float]] = []
        batches = eval_batches(rows, self.section.per_device_eval_batch_size, self.collate, self.dist)
        for batch, weight in weighted_batches(batches, self.dist.device):
            with torch.no_grad():
                logps = self.logps(self.reference, batch)[0].float().cpu()
            half = logps.shape[0] // 2
            mine += [
                [float(c), float(r)] for c, r, w in zip(logps[:half], logps[half:], weight[:half], strict=True) if w > 0
            ]
        gathered: list[Any] = [mine]
        if tdist.is_initialized():
            gathered = [None] * self.dist.world_size
            tdist.all_gather_object(gathered, mine)
        ordered = [None] * len(rows)
        for rank, part in enumerate(gathered):  # rank r scored rows r, r + W, …
            for j, values in enumerate(part):
                ordered[rank + j * self.dist.world_size] = values
        return torch.tensor(ordered, dtype=torch.float32)

    def save_final(self, summary: dict[str, Any]) -> None:
        super().save_final({**summary, "loss": self.section.loss, "reference": self.source})


def run(config: RunConfig) -> int:
    return run_stage(DPOStage(config))
