"""Greedy answers through a rollout engine: stage 3's held-out evaluation, ``dschat-core eval`` and DPO's sample
answers all generate here."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from ...config import PPO
from ...training.batching import left_pad
from ...training.distributed import Dist, all_reduce_sum, broadcast_text
from .engines import Rollout, RolloutEngine, Sampling
from .episodes import EpisodeRunner, Episodes, episode_scores, generate_rollouts
from .scoring import Scorer, texts, transcripts


def eval_prompts(data, section: PPO) -> list[tuple[list[int], dict[str, Any]]]:
    """The held-out prompts every evaluation uses, with their rows: the first ``eval_prompts`` of the stage's
    eval share (its train share when it has none)."""
    source = data.eval if data.eval is not None and len(data.eval) else data.train
    rows = source.select(range(min(section.eval_prompts, len(source))))
    return [(list(r["prompt_input_ids"]), json.loads(r["row"])) for r in rows]


def greedy_rollouts(
    engine: RolloutEngine,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    dist: Dist,
    pad_id: int,
    episodes: EpisodeRunner | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> Iterator[tuple[slice, Rollout, Episodes | None]]:
    """Greedy rollouts of this rank's share of ``prompts`` (every ``world_size``-th), batch by batch, with the
    slice of the share each covers; with an environment, greedy episodes of the prompts' ``rows``. Every rank
    runs the same number of batches (generation under ZeRO-3 is collective): a rank out of prompts generates for
    the first one and yields an empty slice."""
    mine = prompts[dist.rank :: dist.world_size]
    my_rows = (rows or [{} for _ in prompts])[dist.rank :: dist.world_size]
    sampling = Sampling(max_new_tokens=max_new_tokens, greedy=True)
    for i in range(math.ceil(math.ceil(len(prompts) / dist.world_size) / batch_size)):
        share = slice(i * batch_size, min((i + 1) * batch_size, len(mine)))
        ids, mask = left_pad(mine[share] or prompts[:1], pad_id)
        batch_rows = my_rows[share] or (rows or [{}])[:1]
        out, played = generate_rollouts(
            engine, episodes, ids.to(dist.device), mask.to(dist.device), batch_rows, sampling
        )
        yield share, out, played


def judged(record: dict[str, Any]) -> dict[str, Any]:
    """A saved answer with the tiny task's verdict (``judge``: right or not) where its prompt is one of the task's
    questions, so that the README's claims can be checked from the samples."""
    from ...tiny_task import verdict

    right = verdict(record["prompt"], record["answer"])
    return record if right is None else {**record, "judge": right}


def greedy_answers(
    engine: RolloutEngine, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, dist: Dist
) -> list[dict[str, Any]]:
    """Greedy answers to this rank's share of ``prompts``, as {prompt, answer} records."""
    records: list[dict[str, Any]] = []
    for share, out, _ in greedy_rollouts(engine, prompts, max_new_tokens, batch_size, dist, tokenizer.pad_token_id):
        if share.stop > share.start:
            prompt_texts, answers = texts(tokenizer, out.sequences, out.action_mask)
            records += [judged({"prompt": p, "answer": a}) for p, a in zip(prompt_texts, answers, strict=True)]
    return records


def greedy_eval(
    engine: RolloutEngine,
    scorer: Scorer,
    prompts: list[tuple[list[int], dict[str, Any]]],
    section: PPO,
    tokenizer,
    dist: Dist,
    episodes: EpisodeRunner | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers (or, with an environment, greedy episodes) to held-out prompts, scored: the means over all
    prompts of the reward, each of its parts (``accuracy`` for the verifiers' verdict), the answer length and an
    episode's tool calls; and this rank's answer records (with each episode's transcript)."""
    import torch

    rows = [row for _, row in prompts][dist.rank :: dist.world_size]
    records: list[dict[str, Any]] = []
    sums: dict[str, float] = {}
    batches = greedy_rollouts(
        engine,
        [ids for ids, _ in prompts],
        section.max_answer_seq_len,
        section.per_device_generation_batch_size,
        dist,
        tokenizer.pad_token_id,
        episodes,
        [row for _, row in prompts],
    )
    for share, out, played in batches:
        with torch.no_grad():  # every rank scores, as every rank generated: a reward model under ZeRO-3 is collective
            total, parts = scorer(
                out.sequences, out.attention_mask, out.position_ids, out.action_mask, rows[share] or [prompts[0][1]]
            )
            if played is not None:
                total, parts = episode_scores(played, total, parts)
        if share.stop <= share.start:
            continue
        figures = {
            "reward": total,
            "response_len": out.action_mask.sum(dim=1).float(),
            **({f"episodes/{k}": torch.tensor(v) for k, v in played.figures().items()} if played else {}),
            **{("accuracy" if k == "correct" else f"reward/{k}"): v for k, v in parts.items()},
        }
        for key, values in figures.items():
            sums[key] = sums.get(key, 0.0) + float(values.sum())
        prompt_texts, answers = texts(tokenizer, out.sequences, out.action_mask, out.attention_mask)
        whole = transcripts(tokenizer, out.sequences, out.attention_mask, out.action_mask.shape[1])
        for j, (prompt, answer) in enumerate(zip(prompt_texts, answers, strict=True)):
            record = {"prompt": prompt, "answer": answer, "reward": float(total[j])}
            if episodes is not None:
                record["transcript"] = whole[j]
            records.append(judged({**record, **{k: float(v[j]) for k, v in parts.items()}}))
    keys = json.loads(broadcast_text(json.dumps(sorted(sums))))  # rank 0's: every rank reduces the same ones
    totals = all_reduce_sum([sums.get(k, 0.0) for k in keys], dist.device)
    return {k: v / len(prompts) for k, v in zip(keys, totals, strict=True)}, records
