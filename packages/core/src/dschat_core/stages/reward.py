"""Stage 2: the reward model — base model + value head, DeepSpeed-Chat's pairwise loss (from the first
differing token to the end of the longer answer) or a last-token loss; accuracy and mean scores as eval."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..models import load_reward_model, token_values
from ..training.batching import all_reduce_sum, pad_right
from ..training.loop import SupervisedStage, run_supervised, to_device


def pairwise_loss(values, input_ids, attention_mask, mode: str = "pairwise"):
    """values/input_ids/attention_mask are [2B, L] with chosen rows first. Returns (loss, chosen_scores,
    rejected_scores), the scores read at each answer's last real token."""
    import torch
    import torch.nn.functional as F

    half = values.shape[0] // 2
    lengths = attention_mask.sum(dim=1)
    last = (lengths - 1).clamp(min=0)
    scores = values.gather(1, last.unsqueeze(1)).squeeze(1)
    chosen_scores, rejected_scores = scores[:half], scores[half:]
    if mode == "last_token":
        return -F.logsigmoid(chosen_scores - rejected_scores).mean(), chosen_scores, rejected_scores
    c_ids, r_ids = input_ids[:half], input_ids[half:]
    c_len, r_len = lengths[:half], lengths[half:]
    positions = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    differs = (c_ids != r_ids) & (positions < torch.maximum(c_len, r_len).unsqueeze(1))
    has_diff = differs.any(dim=1)
    first = torch.where(has_diff, differs.float().argmax(dim=1), torch.zeros_like(c_len))
    end = torch.maximum(c_len, r_len)
    span = (positions >= first.unsqueeze(1)) & (positions < end.unsqueeze(1)) & has_diff.unsqueeze(1)
    per_token = -F.logsigmoid(values[:half].float() - values[half:].float())
    per_pair = (per_token * span).sum(dim=1) / span.sum(dim=1).clamp(min=1)
    loss = per_pair[has_diff].mean() if bool(has_diff.any()) else per_pair.sum() * 0.0
    return loss, chosen_scores, rejected_scores


class RewardStage(SupervisedStage):
    name = "reward"
    always_trainable = ("score",)  # the value head trains even with only_optimize_lora

    def build_model(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id
        return load_reward_model(
            self.section.model_name_or_path,
            self.section.dropout,
            self.config.trust_remote_code,
            pad_token_id=tokenizer.pad_token_id,
        )

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        ids, mask = pad_right(sequences, self.pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    def batch_samples(self, batch) -> int:
        return int(batch["input_ids"].shape[0] // 2)

    def _forward(self, engine, batch):
        values = token_values(engine, batch["input_ids"], batch["attention_mask"])
        return pairwise_loss(values, batch["input_ids"], batch["attention_mask"], self.section.loss)

    def loss(self, engine, batch):
        return self._forward(engine, batch)[0]

    def evaluate(self, engine, loader, dist) -> dict[str, float]:
        correct = chosen = rejected = count = 0.0
        for i, batch in enumerate(loader):
            if i >= self.section.eval_iters:
                break
            batch = to_device(batch, dist.device)
            _, c, r = self._forward(engine, batch)
            correct += float((c > r).sum())
            chosen += float(c.float().sum())
            rejected += float(r.float().sum())
            count += c.shape[0]
        correct, chosen, rejected, count = all_reduce_sum([correct, chosen, rejected, count], dist.device)
        count = max(count, 1.0)
        return {"accuracy": correct / count, "chosen_score": chosen / count, "rejected_score": rejected / count}


def run(config: RunConfig) -> int:
    return run_supervised(RewardStage(config))
