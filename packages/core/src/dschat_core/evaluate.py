"""``dschat-core eval``: one process, no DeepSpeed — look at a trained model beside its baseline.

- ``sft``: perplexity on stage 1's eval share and greedy answers to the same prompts, baseline beside fine-tuned.
- ``reward``: the reward model (value head loaded, unlike DeepSpeed-Chat's rw_eval) on stage 2's eval pairs:
  accuracy and mean chosen/rejected scores.
- ``ppo``: the reward model's score of greedy answers from the baseline (stage 1) and the PPO actor.
"""

from __future__ import annotations

import math
from typing import Any

from .config import STAGES, RunConfig
from .data.loading import load_raw
from .data.pipeline import phase_indices, rows_to_triples
from .errors import UserError
from .models import load_causal_lm, load_reward_model, load_tokenizer, token_values
from .plugins import get_dataset_formats


def eval_triples(config: RunConfig, stage: str, limit: int) -> list[tuple[str, str, str | None]]:
    """The first ``limit`` eval rows of ``stage``'s share, as training splits them."""
    triples: list[tuple[str, str, str | None]] = []
    jobs = [(source, config.data.split_shares, STAGES.index(stage)) for source in config.data.data_path]
    if stage == "sft":  # demonstrations-only data belongs wholly to stage 1, as in training
        jobs += [(source, (1.0, 0.0, 0.0), 0) for source in config.data.sft_only_data_path]
    for source, shares, phase in jobs:
        raw = load_raw(source, get_dataset_formats(), config.seed)
        indices = phase_indices(len(raw.eval), shares, phase, config.seed)
        columns, _ = rows_to_triples(
            raw.eval, raw.fmt, indices, source, "eval", config.data.strict, need_rejected=stage == "reward"
        )
        triples += list(zip(columns["prompt"], columns["chosen"], columns["rejected"], strict=True))
    if not triples:
        raise UserError(
            f"no held-out rows for stage {stage} in {', '.join(s for s, _, _ in jobs)} with data_split "
            f"{config.data.data_split}; fix: pass the run's config with -c"
        )
    return triples[:limit]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_lm(model_dir: str, trust: bool):
    return load_tokenizer(model_dir, trust), load_causal_lm(model_dir, trust_remote_code=trust).to(_device()).eval()


def load_rm(model_dir: str, trust: bool):
    tokenizer = load_tokenizer(model_dir, trust)
    model = load_reward_model(model_dir, trust_remote_code=trust, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model.to(_device()).eval()


def greedy_answers(tokenizer, model, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    from .stages.ppo import left_pad

    answers = []
    for start in range(0, len(prompts), 16):
        ids, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts[start : start + 16]], tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return answers


def perplexity(tokenizer, model, pairs: list[tuple[str, str]], response_only: bool) -> float:
    """Stage 1's eval metric on (prompt, answer) pairs: over every token, or the answer's only (``loss_on``)."""
    import torch

    total, count = 0.0, 0
    for prompt, answer in pairs:
        ids = tokenizer(prompt + answer + (tokenizer.eos_token or ""), return_tensors="pt")["input_ids"]
        labels = ids.clone()
        if response_only:
            labels[:, : len(tokenizer(prompt)["input_ids"])] = -100
        with torch.no_grad():
            loss = model(input_ids=ids.to(model.device), labels=labels.to(model.device)).loss.float().item()
        tokens = int((labels[:, 1:] != -100).sum())
        total += loss * tokens
        count += tokens
    return math.exp(min(total / max(count, 1), 50.0))


def reward_scores(tokenizer, model, prompts: list[str], answers: list[str]) -> list[float]:
    """The reward model's value at each text's last token (its EOS), as stages 2 and 3 read it."""
    import torch

    scores = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tokenizer(prompt + answer + (tokenizer.eos_token or ""), return_tensors="pt")["input_ids"]
        ids = ids.to(model.device)
        with torch.no_grad():
            scores.append(float(token_values(model, ids, torch.ones_like(ids))[0, -1]))
    return scores


def evaluate(
    stage: str,
    config: RunConfig,
    model: str,
    baseline: str | None,
    reward_model: str | None,
    count: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    trust = config.trust_remote_code
    if stage == "reward":
        triples = eval_triples(config, "reward", count)
        prompts = [t[0] for t in triples]
        rm = load_rm(model, trust)
        chosen = reward_scores(*rm, prompts, [t[1] for t in triples])
        rejected = reward_scores(*rm, prompts, [str(t[2]) for t in triples])
        return {
            "pairs": len(triples),
            "accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(1, len(triples)),
            "chosen_score": sum(chosen) / max(1, len(chosen)),
            "rejected_score": sum(rejected) / max(1, len(rejected)),
        }
    triples = eval_triples(config, "sft" if stage == "sft" else "ppo", count)
    prompts = [t[0] for t in triples]
    models = {"baseline": baseline, "model": model} if baseline else {"model": model}
    result: dict[str, Any] = {"prompts": prompts}
    rm = load_rm(reward_model, trust) if stage == "ppo" and reward_model is not None else None
    for label, path in models.items():
        assert path is not None
        lm = load_lm(path, trust)
        answers = greedy_answers(*lm, prompts, max_new_tokens)
        result[f"{label}/answers"] = answers
        if stage == "sft":
            result[f"{label}/perplexity"] = perplexity(
                *lm, [(t[0], t[1]) for t in triples], config.sft.loss_on == "response"
            )
        else:
            assert rm is not None
            scores = reward_scores(*rm, prompts, answers)
            result[f"{label}/reward"] = sum(scores) / max(1, len(scores))
    return result


def format_result(stage: str, result: dict[str, Any], shown: int = 5) -> str:
    if stage == "reward":
        return (
            f"reward model on {result['pairs']} eval pairs: accuracy {result['accuracy']:.3f}, chosen "
            f"{result['chosen_score']:.3f}, rejected {result['rejected_score']:.3f}"
        )
    metric = "perplexity" if stage == "sft" else "reward"
    labels = [label for label in ("baseline", "model") if f"{label}/answers" in result]
    lines = [", ".join(f"{label} {metric} {result[f'{label}/{metric}']:.3f}" for label in labels)]
    for i, prompt in enumerate(result["prompts"][:shown]):
        lines.append(f"--- {prompt.strip()!r}")
        lines += [f"    {label}: {result[f'{label}/answers'][i].strip()!r}" for label in labels]
    return "\n".join(lines)
