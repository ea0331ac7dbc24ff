"""Stage 2: the reward model — base model + value head, DeepSpeed-Chat's pairwise loss (from the first
differing token to the end of the longer answer) or a last-token loss; accuracy and mean scores as eval."""

from __future__ import annotations

from typing import Any

from ..config import Reward, RunConfig
from ..models import load_reward_model, token_values
from ..training.batching import pad_right
from ..training.distributed import Dist, all_reduce_sum
from ..training.run import run_stage
from .supervised import SupervisedStage, weighted_batches


def last_token_scores(values, attention_mask):
    """The value at each right-padded sequence's last real token."""
    last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def pairwise_loss(values, input_ids, attention_mask, mode: str = "pairwise"):
    """values/input_ids/attention_mask are [2B, L] with chosen rows first. Returns (loss, chosen_scores,
    rejected_scores), the scores read at each answer's last real token."""
    import torch
    import torch.nn.functional as F

    half = values.shape[0] // 2
    lengths = attention_mask.sum(dim=1)
    scores = last_token_scores(values, attention_mask)
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
    section: Reward
    always_trainable = ("score",)  # the value head trains even with only_optimize_lora

    def build_model(self, tokenizer):
        return load_reward_model(
            self.tokenizer_path(),
            self.section.dropout,
            self.config.trust_remote_code,
            pad_token_id=tokenizer.pad_token_id,
        )

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        ids, mask = pad_right(sequences, self.tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    def batch_samples(self, batch) -> int:
        return int(batch["input_ids"].shape[0] // 2)

    def loss(self, engine, batch):
        values = token_values(engine, batch["input_ids"], batch["attention_mask"])
        return pairwise_loss(values, batch["input_ids"], batch["attention_mask"], self.section.loss)[0]

    def eval_rows(self, eval_data):
        """DeepSpeed-Chat reads ``eval_iters`` batches per rank: that many rows over the run's world size."""
        section, topology = self.section, self.config.topology
        limit = section.eval_iters * section.per_device_eval_batch_size * topology.world_size
        return eval_data.select(range(min(limit, len(eval_data))))

    def evaluate_model(self, model, batches, dist: Dist) -> dict[str, float]:
        """Pair accuracy (chosen scored above rejected) and the mean scores, read at each answer's last token."""
        correct = chosen = rejected = count = 0.0
        for batch, weight in weighted_batches(batches, dist.device):
            scores = last_token_scores(
                token_values(model, batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]
            ).float()
            c, r = scores.chunk(2)
            correct += float((c > r).float() @ weight)
            chosen += float(c @ weight)
            rejected += float(r @ weight)
            count += float(weight.sum())
        correct, chosen, rejected, count = all_reduce_sum([correct, chosen, rejected, count], dist.device)
        count = max(count, 1.0)
        return {"accuracy": correct / count, "chosen_score": chosen / count, "rejected_score": rejected / count}


def run(config: RunConfig) -> int:
    return run_stage(RewardStage(config))
