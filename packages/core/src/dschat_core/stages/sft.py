"""Stage 1: supervised fine-tuning of the actor on prompt + chosen answer, perplexity eval each epoch."""

from __future__ import annotations

import math
from typing import Any

from ..config import RunConfig
from ..models import load_causal_lm
from ..training.batching import all_reduce_sum, pad_right
from ..training.loop import SupervisedStage, run_supervised, to_device

IGNORE_INDEX = -100


class SFTStage(SupervisedStage):
    name = "sft"

    def build_model(self, tokenizer):
        model = load_causal_lm(self.section.model_name_or_path, self.section.dropout, self.config.trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
        self.pad_id = tokenizer.pad_token_id
        return model

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_right([r["input_ids"] for r in rows], self.pad_id)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if self.section.loss_on == "response":
            for i, row in enumerate(rows):
                labels[i, : row["prompt_len"]] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, engine, batch):
        return engine(**batch, use_cache=False).loss

    def evaluate(self, engine, loader, dist) -> dict[str, float]:
        total, tokens = 0.0, 0.0
        for batch in loader:
            batch = to_device(batch, dist.device)
            count = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += engine(**batch, use_cache=False).loss.float().item() * count
            tokens += count
        total, tokens = all_reduce_sum([total, tokens], dist.device)
        loss = total / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def run(config: RunConfig) -> int:
    return run_supervised(SFTStage(config))
