"""``dschat-core eval``: one process, no DeepSpeed — a trained model beside its baseline, measured by the stages'
own code (the same data share, tokenization, truncation, collators and metrics as the ``eval/*`` training logs).

- ``sft``: perplexity on stage 1's held-out rows and greedy answers to their prompts, baseline beside fine-tuned.
- ``reward``: the reward model (value head loaded, unlike DeepSpeed-Chat's rw_eval) on stage 2's held-out pairs:
  accuracy and mean chosen/rejected scores.
- ``ppo``: the reward model's score of greedy answers to stage 3's held-out prompts, baseline and actor.
"""

from __future__ import annotations

from typing import Any

from .config import RunConfig
from .data.pipeline import load_stage_data
from .errors import UserError
from .models import load_causal_lm, load_reward_model, load_tokenizer
from .plugins import get_dataset_formats
from .training.batching import eval_batches, left_pad
from .training.distributed import local_dist


def _held_out(config: RunConfig, stage: str, tokenizer, count: int | None):
    data = load_stage_data(config, stage, tokenizer, get_dataset_formats(), log=lambda text: None)
    rows = data.eval if data.eval is not None and len(data.eval) else None
    if rows is None:
        raise UserError(
            f"no held-out rows for stage {stage} in {', '.join(config.data.data_path)} with data_split "
            f"{config.data.data_split}; fix: pass the run's config with -c"
        )
    return data, rows.select(range(min(count, len(rows)))) if count else rows


def load_lm(model_dir: str, trust: bool):
    dist = local_dist()
    return load_tokenizer(model_dir, trust), load_causal_lm(model_dir, trust_remote_code=trust).to(dist.device).eval()


def load_rm(model_dir: str, trust: bool):
    tokenizer = load_tokenizer(model_dir, trust)
    model = load_reward_model(model_dir, trust_remote_code=trust, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model.to(local_dist().device).eval()


def greedy_answers(tokenizer, model, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    import torch

    answers = []
    for start in range(0, len(prompts), 16):
        ids, mask = left_pad(prompts[start : start + 16], tokenizer.pad_token_id)
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


def evaluate(
    stage: str,
    config: RunConfig,
    model: str,
    baseline: str | None,
    reward_model: str | None,
    count: int | None,
    max_new_tokens: int | None,
) -> dict[str, Any]:
    """The figures of ``model`` (and ``baseline``) on the run's held-out data; ``count`` limits the rows or
    prompts (default: what training evaluates), ``max_new_tokens`` the answers (default: the run's lengths)."""
    import torch

    from .stages.ppo import eval_prompts, greedy_eval
    from .stages.reward import RewardStage
    from .stages.sft import SFTStage

    trust, dist = config.trust_remote_code, local_dist()
    if stage == "reward":
        tokenizer, rm = load_rm(model, trust)
        reward = RewardStage(config)
        reward.tokenizer = tokenizer
        _, rows = _held_out(config, "reward", tokenizer, count)
        rows = reward.eval_rows(rows)
        batches = eval_batches(rows, config.reward.per_device_eval_batch_size, reward.collate, dist)
        with torch.no_grad():
            return {"pairs": len(rows), **reward.evaluate_model(rm, batches, dist)}
    models = {"baseline": baseline, "model": model} if baseline else {"model": model}
    result: dict[str, Any] = {}
    rm = load_rm(reward_model, trust)[1] if stage == "ppo" and reward_model is not None else None
    for label, path in models.items():
        assert path is not None
        tokenizer, lm = load_lm(path, trust)
        if stage == "sft":
            sft = SFTStage(config)
            sft.tokenizer = tokenizer
            _, rows = _held_out(config, "sft", tokenizer, count)
            prompts = [list(r["input_ids"][: r["prompt_len"]]) for r in rows]
            batches = eval_batches(rows, config.sft.per_device_eval_batch_size, sft.collate, dist)
            with torch.no_grad():
                result[f"{label}/perplexity"] = sft.evaluate_model(lm, batches, dist)["perplexity"]
            result[f"{label}/answers"] = greedy_answers(tokenizer, lm, prompts, max_new_tokens or 64)
        else:
            assert rm is not None
            data, _ = _held_out(config, "ppo", tokenizer, None)
            section = config.ppo.model_copy(
                update={"max_answer_seq_len": max_new_tokens or config.ppo.max_answer_seq_len}
            )
            if count:
                section = section.model_copy(update={"eval_prompts": count})
            prompts = eval_prompts(data, section)
            figures, records = greedy_eval(lm, rm, prompts, section, tokenizer, dist)
            result[f"{label}/reward"] = figures["reward"]
            result[f"{label}/answers"] = [r["answer"] for r in records]
        result["prompts"] = tokenizer.batch_decode(prompts, skip_special_tokens=True)
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
