"""``dschat-core eval``: one process, no DeepSpeed — a trained model beside its baseline, measured by the stages'
own code (the same data share, tokenization, truncation, collators and metrics as the ``eval/*`` training logs).

- ``sft``: perplexity on stage 1's held-out rows and greedy answers to their prompts, baseline beside fine-tuned.
- ``reward``: the reward model (value head loaded, unlike DeepSpeed-Chat's rw_eval) on stage 2's held-out pairs:
  accuracy and mean chosen/rejected scores.
- ``ppo``: the reward model's score of greedy answers to stage 3's held-out prompts, baseline and actor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RunConfig
from .data.pipeline import load_stage_data
from .errors import UserError
from .models import load_causal_lm, load_reward_model, load_tokenizer
from .plugins import get_dataset_formats
from .training.batching import eval_batches
from .training.distributed import local_dist


def _held_out(config: RunConfig, stage: str, tokenizer, count: int | None):
    if config.data.cache_dir is None:  # no run's cache named: tokenize into a scratch folder, not ~/.cache
        import atexit
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix="dschat-eval-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        config = config.model_copy(update={"data": config.data.model_copy(update={"cache_dir": scratch})})
    data = load_stage_data(config, stage, tokenizer, get_dataset_formats(), log=lambda text: None)
    rows = data.eval if data.eval is not None and len(data.eval) else None
    if rows is None:
        raise UserError(
            f"no held-out rows for stage {stage} in {', '.join(config.data.data_path)} with data_split "
            f"{config.data.data_split}; fix: pass the run's config with -c"
        )
    return data, rows.select(range(min(count, len(rows)))) if count else rows


def find_run_config(model_dir: str, stage: str) -> str:
    """The resolved config a run left beside its outputs (``<run>/configs/<stage>.yaml``): it names the run's data,
    split and lengths, so that evaluation reads the same held-out rows as training."""
    folder = Path(model_dir).expanduser().resolve()
    for parent in (folder.parent, folder.parent.parent):
        found = parent / "configs" / f"{stage}.yaml"
        if found.is_file():
            return str(found)
    raise UserError(
        f"no run config found beside {model_dir} (looked for configs/{stage}.yaml above it); fix: pass "
        "the run's config with -c, so that eval reads the run's held-out data"
    )


def load_lm(model_dir: str, trust: bool):
    dist = local_dist()
    return load_tokenizer(model_dir, trust), load_causal_lm(model_dir, trust_remote_code=trust).to(dist.device).eval()


def load_rm(model_dir: str, trust: bool):
    tokenizer = load_tokenizer(model_dir, trust)
    model = load_reward_model(model_dir, trust_remote_code=trust, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model.to(local_dist().device).eval()


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

    from .stages.reward import RewardStage
    from .stages.rl.engines.hf import HFEngine
    from .stages.rl.episodes import make_episode_runner
    from .stages.rl.evaluation import eval_prompts, greedy_answers, greedy_eval
    from .stages.rl.scoring import Scorer, make_rewarder
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
    if stage == "dpo":
        return evaluate_dpo(config, model, baseline, count, max_new_tokens)
    models = {"baseline": baseline, "model": model} if baseline else {"model": model}
    result: dict[str, Any] = {}
    rm = load_rm(reward_model, trust)[1] if stage == "ppo" and reward_model is not None else None
    if stage == "ppo" and rm is None and not config.ppo.reward_functions:
        raise UserError(
            "eval --stage ppo scores answers with a reward model or reward functions: pass "
            "--reward-model DIR, or a config with ppo.reward_functions (-c run.yaml)"
        )
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
            answers = greedy_answers(HFEngine(lm, tokenizer), tokenizer, prompts, max_new_tokens or 64, 16, dist)
            result[f"{label}/answers"] = [a["answer"] for a in answers]
        else:
            data, _ = _held_out(config, "ppo", tokenizer, None)
            update: dict[str, Any] = {
                "max_answer_seq_len": max_new_tokens or config.ppo.max_answer_seq_len,
                "reward_model_weight": 1.0 if rm is not None else 0.0,
            }
            if count:
                update["eval_prompts"] = count
            section = config.ppo.model_copy(update=update)
            held_out = eval_prompts(data, section)
            prompts = [ids for ids, _ in held_out]
            scorer = Scorer(rm, section, make_rewarder(section), tokenizer, dist)
            episodes = make_episode_runner(section, tokenizer, dist)  # ppo.environment: greedy episodes
            engine = HFEngine(lm, tokenizer)
            figures, records = greedy_eval(engine, scorer, held_out, section, tokenizer, dist, episodes)
            result[f"{label}/reward"] = figures["reward"]
            for key in ("accuracy", "episodes/turns", "episodes/tool_calls", "episodes/tool_errors"):
                if key in figures:
                    result[f"{label}/{key}"] = figures[key]
            result[f"{label}/answers"] = [r.get("transcript", r["answer"]) for r in records]
        result["prompts"] = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    return result


def evaluate_dpo(
    config: RunConfig, model: str, baseline: str | None, count: int | None, max_new_tokens: int | None
) -> dict[str, Any]:
    """DPO's held-out figures (its implicit rewards against the reference: ``baseline``, else the config's
    ``dpo.ref_model_name_or_path``) and greedy answers, the baseline's beside the model's."""
    from .stages.dpo import DPOStage
    from .stages.rl.engines.hf import HFEngine
    from .stages.rl.evaluation import greedy_answers

    trust, dist = config.trust_remote_code, local_dist()
    tokenizer, lm = load_lm(model, trust)
    dpo = DPOStage(config)
    dpo.tokenizer, dpo.source, dpo.reference = tokenizer, "none", None
    if not config.dpo.reference_free:
        reference = baseline or config.dpo.ref_model_name_or_path
        if not reference:
            raise UserError(
                "eval --stage dpo needs the reference: --baseline DIR (stage 1's model) or "
                "dpo.ref_model_name_or_path in the config"
            )
        dpo.source, dpo.reference = "engine", load_lm(reference, trust)[1]
    _, rows = _held_out(config, "dpo", tokenizer, count)
    batches = eval_batches(rows, config.dpo.per_device_eval_batch_size, dpo.collate, dist)
    result: dict[str, Any] = {"pairs": len(rows), **dpo.evaluate_model(lm, batches, dist)}
    prompts = [list(r["chosen_input_ids"][: r["prompt_len"]]) for r in rows.select(range(min(16, len(rows))))]
    models = {"baseline": (tokenizer, dpo.reference)} if baseline and dpo.reference is not None else {}
    if baseline and dpo.reference is None:
        models["baseline"] = load_lm(baseline, trust)
    models["model"] = (tokenizer, lm)
    for label, (tok, net) in models.items():
        engine = HFEngine(net, tok)
        answers = greedy_answers(engine, tok, prompts, max_new_tokens or config.dpo.eval_max_new_tokens, 16, dist)
        result[f"{label}/answers"] = [a["answer"] for a in answers]
    result["prompts"] = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    return result


def _judge_lines(result: dict[str, Any], labels: list[str]) -> tuple[str | None, dict[str, list[bool | None]]]:
    """The tiny task's verdict on each label's answers, and a summary line, where the prompts are its questions."""
    from .tiny_task import verdict

    prompts = result.get("prompts", [])
    verdicts = {
        label: [verdict(p, a) for p, a in zip(prompts, result[f"{label}/answers"], strict=False)] for label in labels
    }
    if not prompts or not labels or any(v is None for v in verdicts[labels[0]]):
        return None, {}
    count = len(verdicts[labels[0]])
    summary = ", ".join(f"{label} {sum(bool(v) for v in verdicts[label])}/{count} right" for label in labels)
    return f"the tiny task's judge: {summary}", verdicts


def _answer_lines(result: dict[str, Any], labels: list[str], shown: int) -> list[str]:
    summary, verdicts = _judge_lines(result, labels)
    lines = [summary] if summary else []
    for i, prompt in enumerate(result["prompts"][:shown]):
        lines.append(f"--- {prompt.strip()!r}")
        for label in labels:
            mark = (" [judge: right]" if verdicts[label][i] else " [judge: wrong]") if verdicts else ""
            lines.append(f"    {label}: {result[f'{label}/answers'][i].strip()!r}{mark}")
    return lines


def format_result(stage: str, result: dict[str, Any], shown: int = 5) -> str:
    if stage == "dpo":
        lines = [
            f"DPO on {result['pairs']} eval pairs: accuracy {result['rewards/accuracies']:.3f}, margin "
            f"{result['rewards/margins']:.3f} (chosen {result['rewards/chosen']:.3f}, rejected "
            f"{result['rewards/rejected']:.3f}), loss {result['loss']:.4f}"
        ]
        labels = [label for label in ("baseline", "model") if f"{label}/answers" in result]
        return "\n".join(lines + _answer_lines(result, labels, shown))
    if stage == "reward":
        return (
            f"reward model on {result['pairs']} eval pairs: accuracy {result['accuracy']:.3f}, chosen "
            f"{result['chosen_score']:.3f}, rejected {result['rejected_score']:.3f}"
        )
    metric = "perplexity" if stage == "sft" else "reward"
    labels = [label for label in ("baseline", "model") if f"{label}/answers" in result]
    lines = [", ".join(f"{label} {metric} {result[f'{label}/{metric}']:.3f}" for label in labels)]
    if all(f"{label}/accuracy" in result for label in labels):
        lines.append(", ".join(f"{label} accuracy {result[f'{label}/accuracy']:.3f}" for label in labels))
    if all(f"{label}/episodes/turns" in result for label in labels):  # ppo.environment: greedy episodes
        per_episode = [
            f"{label} turns {result[f'{label}/episodes/turns']:.2f}, tool calls "
            f"{result[f'{label}/episodes/tool_calls']:.2f}, tool errors {result[f'{label}/episodes/tool_errors']:.2f}"
            for label in labels
        ]
        lines.append(", ".join(per_episode) + " per episode")
    return "\n".join(lines + _answer_lines(result, labels, shown))
