"""Stage 3's generation and scoring, for the engines of training and the plain models of ``dschat-core eval``.

A rollout is answers to a left-padded prompt batch with their masks and position ids; a :class:`Scorer` turns
answers into rewards (the reward model's score and the configured reward functions, weighted) and says which
answers its verifiers accept; :func:`greedy_eval` is the held-out evaluation both use.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..config import PPO
from ..models import token_values
from ..rewards import Rewarder, RewardFunctionError
from ..training import ppo_math, rl_math
from ..training.batching import left_pad
from ..training.distributed import Dist, all_reduce_sum, broadcast_text, first_message
from ..training.run import NonFinite


def rollout(
    model,
    prompt_ids,
    prompt_mask,
    section: PPO,
    tokenizer,
    greedy: bool,
    synced: bool = False,
    logprobs: bool = False,
):
    """Answers for a left-padded prompt batch: (sequences [B, P + T], full attention mask, position ids, answer
    mask [B, T], the answer tokens' log-probs [B, T] or None). ``synced`` keeps ranks in step under ZeRO-3
    (``synced_gpus``), which users of DeepSpeed-Chat found hanging without it. ``logprobs`` reads them off the raw
    logits ``generate`` computed for each new token (before temperature, top-k and top-p), which saves the actor
    a forward over the whole rollout."""
    import torch
    import torch.nn.functional as F

    kwargs: dict[str, Any] = {
        "max_new_tokens": section.max_answer_seq_len,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": section.generation_kv_cache,
        "synced_gpus": synced,
    }
    if greedy or not section.do_sample:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=section.temperature, top_k=section.top_k, top_p=section.top_p)
    if logprobs:
        kwargs.update(return_dict_in_generate=True, output_logits=True)
    if section.generation_kv_cache and section.generation_cache == "static" and supports_static_cache(model):
        kwargs["cache_implementation"] = "static"
        if section.compile_generation:
            kwargs["compile_config"] = compile_config()
            # A compiled decode step is specialised to the cache's length: prompt widths in steps of 32 keep the
            # shapes (and recompilations) few. Left padding changes no real token's position or attention.
            width = -(-prompt_ids.shape[1] // 32) * 32
            prompt_ids = F.pad(prompt_ids, (width - prompt_ids.shape[1], 0), value=tokenizer.pad_token_id)
            prompt_mask = F.pad(prompt_mask, (width - prompt_mask.shape[1], 0), value=0)
    answer_logprobs = None
    with torch.no_grad():
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        if logprobs:
            step_logits, sequences = sequences.logits, sequences.sequences
            answer_logprobs = ppo_math.step_logprobs(
                step_logits, sequences[:, prompt_ids.shape[1] :], section.compute_fp32_loss
            ).float()
    answer = sequences[:, prompt_ids.shape[1] :]
    action_mask = ppo_math.answer_mask(answer, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompt_mask, action_mask], dim=1)
    return sequences, attention_mask, ppo_math.position_ids(attention_mask), action_mask, answer_logprobs


def supports_static_cache(model) -> bool:
    """Whether ``model`` (a module, or an engine wrapping one) can generate with transformers' static cache; a
    model that cannot falls back to the dynamic cache, with one warning."""
    import warnings

    module = getattr(model, "module", model)
    if getattr(module, "_can_compile_fullgraph", False):
        return True
    warnings.warn(
        f"ppo.generation_cache: static is not supported by {type(module).__name__}; generating with the dynamic "
        "cache instead",
        stacklevel=2,
    )
    return False


def compile_config():
    """transformers' compile settings for the decode step, on every device (it compiles on GPUs only by default):
    inductor, dynamic shapes off (the static cache fixes them), CUDA graphs where there is CUDA."""
    import torch
    from transformers import CompileConfig

    mode = "reduce-overhead" if torch.cuda.is_available() else "default"
    config = CompileConfig(fullgraph=False, dynamic=False, mode=mode)
    config._compile_all_devices = True  # type: ignore[assignment]  # transformers declares it None
    return config


def reward_scores(reward_model, sequences, attention_mask, positions, action_mask):
    """The reward model's score at each answer's last real token."""
    values = token_values(reward_model, sequences, attention_mask, positions)
    prompt_len = sequences.shape[1] - action_mask.shape[1]
    last = prompt_len + action_mask.sum(dim=1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1).float()


class Scorer:
    """An answer's reward: ``reward_model_weight`` × the reward model's score plus the weighted reward functions.
    Every rank scores its own answers; a function that fails on any rank stops every rank alike."""

    def __init__(self, reward_model, section: PPO, rewarder: Rewarder | None, tokenizer, dist: Dist) -> None:
        self.reward_model, self.rewarder, self.tokenizer, self.dist = reward_model, rewarder, tokenizer, dist
        self.weight = section.reward_model_weight if section.reward_model_weight is not None else 1.0

    @property
    def verifies(self) -> bool:
        return bool(self.rewarder and self.rewarder.verifiers)

    def texts(self, sequences, action_mask) -> tuple[list[str], list[str]]:
        prompt_len = sequences.shape[1] - action_mask.shape[1]
        answers = sequences[:, prompt_len:].masked_fill(action_mask == 0, self.tokenizer.pad_token_id)
        return (
            self.tokenizer.batch_decode(sequences[:, :prompt_len], skip_special_tokens=True),
            self.tokenizer.batch_decode(answers, skip_special_tokens=True),
        )

    def __call__(self, sequences, attention_mask, positions, action_mask, rows: list[dict[str, Any]]):
        """(total reward [B], the parts by name [B] each: ``model``, each function, ``correct``)."""
        import torch

        parts: dict[str, Any] = {}
        total = torch.zeros(sequences.shape[0], device=sequences.device)
        if self.reward_model is not None:
            parts["model"] = reward_scores(self.reward_model, sequences, attention_mask, positions, action_mask)
            total = total + self.weight * parts["model"]
        if self.rewarder is not None:
            prompts, answers = self.texts(sequences, action_mask)
            values, problem, fix = [], "", ""
            for i, (prompt, answer, row) in enumerate(zip(prompts, answers, rows, strict=True)):
                try:
                    values.append(self.rewarder.score(prompt, answer, row))
                except RewardFunctionError as exc:
                    problem = f"{exc} on sample {i} of rank {self.dist.rank} (prompt {prompt.strip()[:80]!r})"
                    fix = exc.fix
                    break
            problem = first_message(problem)
            if problem:  # every rank raises, with the first failing rank's message and fix
                raise NonFinite(problem, first_message(fix))
            for name in self.rewarder.names:
                parts[name] = torch.tensor([v[name] for v in values], device=total.device)
            total = total + torch.tensor([self.rewarder.total(v) for v in values], device=total.device)
            if self.rewarder.verifiers:
                parts["correct"] = torch.tensor([float(self.rewarder.correct(v)) for v in values], device=total.device)
        return total, parts


def greedy_eval(
    policy,
    scorer: Scorer,
    prompts: list[tuple[list[int], dict[str, Any]]],
    section: PPO,
    tokenizer,
    dist: Dist,
    synced: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers to held-out prompts, scored: the means over all prompts of the reward, each of its parts
    (``accuracy`` for the verifiers' verdict) and the answer length; and this rank's answer records."""
    import torch

    mine = prompts[dist.rank :: dist.world_size]
    records: list[dict[str, Any]] = []
    sums: dict[str, float] = {}
    size = section.per_device_generation_batch_size
    # Every rank runs the same number of batches: generation under ZeRO-3 is collective.
    batches = math.ceil(math.ceil(len(prompts) / dist.world_size) / size)
    for i in range(batches):
        chunk = mine[i * size : (i + 1) * size]
        ids, mask = left_pad([p for p, _ in chunk or prompts[:1]], tokenizer.pad_token_id)
        ids, mask = ids.to(dist.device), mask.to(dist.device)
        with torch.no_grad():
            sequences, attention_mask, positions, action_mask, _ = rollout(
                policy, ids, mask, section, tokenizer, greedy=True, synced=synced
            )
            total, parts = scorer(
                sequences, attention_mask, positions, action_mask, [r for _, r in chunk or prompts[:1]]
            )
        if not chunk:
            continue
        figures = {
            "reward": total,
            "response_len": action_mask.sum(dim=1).float(),
            **{("accuracy" if k == "correct" else f"reward/{k}"): v for k, v in parts.items()},
        }
        for key, values in figures.items():
            sums[key] = sums.get(key, 0.0) + float(values.sum())
        prompt_texts, answers = scorer.texts(sequences, action_mask)
        for j, (prompt, answer) in enumerate(zip(prompt_texts, answers, strict=True)):
            records.append(
                judged(
                    {
                        "prompt": prompt,
                        "answer": answer,
                        "reward": float(total[j]),
                        **{k: float(v[j]) for k, v in parts.items()},
                    }
                )
            )
    keys = json.loads(broadcast_text(json.dumps(sorted(sums))))  # rank 0's: every rank reduces the same ones
    totals = all_reduce_sum([sums.get(k, 0.0) for k in keys], dist.device)
    return {k: v / len(prompts) for k, v in zip(keys, totals, strict=True)}, records


def greedy_answers(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, dist: Dist, synced: bool = False
) -> list[dict[str, Any]]:
    """Greedy answers to this rank's share of ``prompts`` (every rank runs the same number of batches, for
    ZeRO-3), as {prompt, answer} records."""
    import torch

    mine = prompts[dist.rank :: dist.world_size]
    records: list[dict[str, Any]] = []
    for i in range(math.ceil(math.ceil(len(prompts) / dist.world_size) / batch_size)):
        chunk = mine[i * batch_size : (i + 1) * batch_size]
        ids, mask = left_pad(chunk or prompts[:1], tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(dist.device),
                attention_mask=mask.to(dist.device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced,
            )
        if chunk:
            answers = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            prompt_texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            records += [judged({"prompt": p, "answer": a}) for p, a in zip(prompt_texts, answers, strict=True)]
    return records


def judged(record: dict[str, Any]) -> dict[str, Any]:
    """A saved answer with the tiny task's verdict (``judge``: right or not) where its prompt is one of the task's
    questions, so that the README's claims can be checked from the samples."""
    from ..tiny_task import verdict

    right = verdict(record["prompt"], record["answer"])
    return record if right is None else {**record, "judge": right}


def overlong(section: PPO, sequences, action_mask, eos_token_id: int):
    """DAPO's overlong handling of answers cut off at ``max_answer_seq_len``: (truncated [B], the mask the loss
    uses, a reward penalty [B])."""
    import torch

    answers = sequences[:, -action_mask.shape[1] :]
    cut = rl_math.truncated(action_mask, answers, eos_token_id)
    mask = action_mask.float()
    penalty = torch.zeros(sequences.shape[0], device=sequences.device)
    if section.overlong == "mask":
        mask = mask * (~cut).unsqueeze(1).float()
    elif section.overlong == "penalty":
        penalty = rl_math.overlong_penalty(
            action_mask.sum(dim=1), section.max_answer_seq_len, section.overlong_buffer, section.overlong_penalty
        )
    return cut, mask, penalty
