"""Stage 1: supervised fine-tuning of the actor on prompt + chosen answer; perplexity on held-out rows."""

from __future__ import annotations

import math
from typing import Any

from ..config import SFT, RunConfig
from ..models import load_causal_lm
from ..training.batching import pad_right
from ..training.distributed import Dist, all_reduce_sum
from ..training.run import run_stage
from .supervised import SupervisedStage, weighted_batches

IGNORE_INDEX = -100


def token_nll(logits, labels):
    """Next-token negative log-likelihood [B, L-1] in fp32, 0 where the label is ignored."""
    import torch.nn.functional as F

    shifted = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(shifted.shape)


class SFTStage(SupervisedStage):
    name = "sft"
    section: SFT

    def build_model(self, tokenizer):
        model = load_causal_lm(self.tokenizer_path(), self.section.dropout, self.config.trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_right([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if self.section.loss_on == "response":
            for i, row in enumerate(rows):
                labels[i, : row["prompt_len"]] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, engine, batch):
        return engine(**batch, use_cache=False).loss

    def evaluate_model(self, model, batches, dist: Dist) -> dict[str, float]:
        """Perplexity over every held-out label token (the answer's only with ``loss_on: response``)."""
        total = tokens = 0.0
        for batch, weight in weighted_batches(batches, dist.device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            counted = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
            total += float(token_nll(logits, batch["labels"]).sum(dim=1) @ weight)
            tokens += float(counted.sum(dim=1) @ weight)
        total, tokens = all_reduce_sum([total, tokens], dist.device)
        loss = total / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def run(config: RunConfig) -> int:
    return run_stage(SFTStage(config))
