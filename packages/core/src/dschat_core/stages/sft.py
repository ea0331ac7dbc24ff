"""Stage 1: supervised fine-tuning of the actor on prompt + chosen answer; perplexity on held-out rows."""

from __future__ import annotations

import math
from typing import Any

from ..config import SFT, RunConfig
from ..models import load_causal_lm, unwrapped
from ..training.batching import pack_rows, pad_right
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
        import torch

        ids, mask = pad_right([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if self.section.loss_on != "all":
            for i, row in enumerate(rows):
                if "loss_mask" in row:  # data with conversations: every assistant turn, nothing else
                    kept = torch.tensor(row["loss_mask"], dtype=torch.bool)
                    labels[i, : len(kept)] = labels[i, : len(kept)].masked_fill(~kept, IGNORE_INDEX)
                elif self.section.loss_on == "response":
                    labels[i, : row["prompt_len"]] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """With ``packing``, the micro-batch's rows packed padding-free (the same tokens and labels, so the same
        loss as the padded batch); else the padded batch."""
        import torch

        if not self.section.packing:
            return self.collate(rows)
        padded = self.collate(rows)
        mask = padded["attention_mask"].bool()
        sequences = [padded["input_ids"][i][mask[i]].tolist() for i in range(len(rows))]
        labels = [padded["labels"][i][mask[i]].tolist() for i in range(len(rows))]
        packed = pack_rows(sequences, labels, self.section.max_seq_len, self.tokenizer.pad_token_id, IGNORE_INDEX)
        return {**packed, "sequences": torch.tensor(len(rows))}

    def batch_samples(self, batch) -> int:
        return int(batch["sequences"]) if "sequences" in batch else int(batch["input_ids"].shape[0])

    def batch_tokens(self, batch) -> int:
        return int(batch["token_mask" if "token_mask" in batch else "attention_mask"].sum())

    def setup(self, dist: Dist, tokenizer) -> None:
        super().setup(dist, tokenizer)
        if self.section.packing:
            self.check_packing()

    def check_packing(self) -> None:
        """Packing is exact only where the model's attention keeps packed sequences apart by their position ids
        (transformers builds that mask for Llama and GPT-2, not for OPT): two sequences packed into
        one row must give the logits they give alone, or the run stops before training, on every rank alike."""
        import torch

        from ..errors import ConfigError
        from ..training.distributed import all_reduce_sum

        device = self.dist.device
        first, second = [5, 9, 13, 7, 11], [8, 6, 10]
        packed = pack_rows([first, second], [first, second], 16, self.tokenizer.pad_token_id)
        self.engine.eval()
        with torch.no_grad():
            together = self.engine(
                input_ids=packed["input_ids"].to(device),
                position_ids=packed["position_ids"].to(device),
                use_cache=False,
            ).logits[0, len(first) : len(first) + len(second)]
            alone = self.engine(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0]
        self.engine.train()
        apart = float((together.float() - alone.float()).abs().max()) < 1e-3
        if all_reduce_sum([0.0 if apart else 1.0], device)[0]:
            arch = type(unwrapped(self.engine)).__name__
            raise ConfigError(
                "sft.packing",
                True,
                f"{arch} attends across packed sequences (its attention mask ignores position ids)",
                "set sft.packing=false (sft.group_by_length=true also cuts padding), or use a model that does",
            )

    def loss(self, engine, batch):
        return engine(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            labels=batch["labels"],
            use_cache=False,
        ).loss

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
