"""``dschat-core data inspect``: what training would make of a dataset, without training.

It loads and validates exactly as the stages do (same split, same row checks, same messages and exit codes) and
reports rows per split and per stage, and with a tokenizer the token lengths and what each stage would truncate
or drop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import DATA_PHASES, PIPELINES, RunConfig
from .formats import DatasetFormat
from .loading import DataError, load_raw
from .pipeline import checks_of, make_renderer, phase_indices, rows_to_triples, stage_lengths, tokenize_function

#: How ``data inspect`` marks the tokens a stage's loss covers in the row it renders.
TRAINED = ("[[", "]]")


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    values = np.asarray(lengths)
    return {
        "p50": int(np.percentile(values, 50)),
        "p90": int(np.percentile(values, 90)),
        "p99": int(np.percentile(values, 99)),
        "max": int(values.max()),
    }


def _token_report(stage: str, columns: dict[str, list], tokenizer, config: RunConfig) -> dict[str, Any]:
    eos = tokenizer.eos_token or ""

    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []

    prompts, chosen, rejected = columns["prompt"], columns["chosen"], columns["rejected"]
    if stage == "sft":
        full = lengths([p + c + eos for p, c in zip(prompts, chosen, strict=True)])
        limit = config.sft.max_seq_len
        return {"tokens": _percentiles(full), "truncated": sum(n > limit for n in full), "limit": limit}
    if stage in ("reward", "dpo"):
        full = [
            max(a, b)
            for a, b in zip(
                lengths([p + c + eos for p, c in zip(prompts, chosen, strict=True)]),
                lengths([p + r + eos for p, r in zip(prompts, rejected, strict=True)]),
                strict=True,
            )
        ]
        limit = config.stage(stage).max_seq_len  # type: ignore[attr-defined]
        return {"tokens": _percentiles(full), "truncated": sum(n > limit for n in full), "limit": limit}
    prompt_lengths = lengths(prompts)
    limit = config.ppo.max_prompt_seq_len
    return {"tokens": _percentiles(prompt_lengths), "dropped": sum(n > limit for n in prompt_lengths), "limit": limit}


def inspect_dataset(
    source: str, formats: dict[str, DatasetFormat], config: RunConfig, tokenizer=None
) -> dict[str, Any]:
    raw = load_raw(source, formats, config.seed)
    if raw.fmt.conversational and tokenizer is None:
        raise DataError(
            f"dataset {source}: {raw.fmt.name} rows become text through a chat template; fix: pass --tokenizer DIR "
            "(the model's tokenizer) to render them"
        )
    renderer = make_renderer(config, tokenizer, [raw]) if tokenizer is not None else None
    report: dict[str, Any] = {
        "source": source,
        "format": raw.fmt.name,
        "columns": raw.train.column_names,
        "rows": {"train": len(raw.train), "eval": len(raw.eval)},
        "data_split": config.data.data_split,
        "stages": {},
    }
    for stage in PIPELINES[config.pipeline]:
        entry: dict[str, Any] = {}
        for split, data in (("train", raw.train), ("eval", raw.eval)):
            indices = phase_indices(len(data), config.data.split_shares, DATA_PHASES[stage], config.seed)
            try:
                columns, split_report = rows_to_triples(
                    data,
                    raw.fmt,
                    indices,
                    source,
                    split,
                    config.data.strict,
                    stage,
                    checks_of(config),
                    renderer,
                    spans=stage == "sft" and renderer is not None,
                )
            except DataError as exc:
                if not raw.fmt.pairwise and stage in ("reward", "dpo"):
                    entry = {"usable": False, "why": "no rejected answers (SFT-only data)"}
                    break
                raise exc
            item: dict[str, Any] = {"rows": split_report.rows, "skipped": split_report.skipped}
            if split_report.first_problem:
                item["first_problem"] = split_report.first_problem
            if tokenizer is not None and split_report.rows:
                item.update(_token_report(stage, columns, tokenizer, config))
                if "example" not in report:
                    report["example"] = {"stage": stage, "text": marked_row(stage, columns, tokenizer, config)}
            entry[split] = item
        report["stages"][stage] = entry
    shares = dict(zip(("sft", "reward", "ppo"), config.data.split_shares, strict=True))
    shares["dpo"] = shares["reward"]  # DPO reads stage 2's share
    for stage, entry in report["stages"].items():
        starved = entry.get("usable") is not False and not entry.get("train", {}).get("rows")
        if starved and shares.get(stage, 0) > 0:
            raise DataError(
                f"dataset {source}: stage {stage} gets no training row from its data_split share "
                f"({config.data.data_split}, {len(raw.train)} train rows in all), so training it would fail; "
                "fix: more rows, or a data_split that gives that stage none (and train it on other data)"
            )
    usable = [s for s, e in report["stages"].items() if e.get("usable") is not False and e.get("train", {}).get("rows")]
    if not usable:
        raise DataError(
            f"dataset {source}: no stage of the {config.pipeline} pipeline gets a usable row with "
            f"data_split {config.data.data_split}; fix: give the stages that can read it a share, or "
            "use another pipeline"
        )
    return report


def marked_row(stage: str, columns: dict[str, list], tokenizer, config: RunConfig) -> str:
    """The first row as ``stage`` tokenizes it, decoded, with the tokens its loss covers between ``TRAINED``
    marks: stage 1's labels (``sft.loss_on``: every assistant turn of a conversation by default), the chosen
    answer that stage 2 and DPO score, and for stage 3 the prompt alone (its answers are generated)."""
    first = {name: values[:1] for name, values in columns.items()}
    encoded = {k: v[0] for k, v in tokenize_function(stage, tokenizer, stage_lengths(config, stage))(first).items()}
    if stage == "ppo":
        return tokenizer.decode(encoded["prompt_input_ids"])
    ids = encoded["input_ids"] if stage == "sft" else encoded["chosen_input_ids"]
    if stage == "sft" and config.sft.loss_on == "all":
        trained = [1] * len(ids)
    elif stage == "sft" and "loss_mask" in encoded:
        trained = encoded["loss_mask"]
    elif stage == "sft" and config.sft.loss_on == "auto":  # text data only: DeepSpeed-Chat's, every token
        trained = [1] * len(ids)
    elif stage == "reward":  # the reward model is trained on its score at the last token
        trained = [0] * (len(ids) - 1) + [1]
    else:
        trained = [int(i >= encoded["prompt_len"]) for i in range(len(ids))]
    text, inside = "", False
    for token, on in zip(ids, trained, strict=True):
        if bool(on) != inside:
            text += TRAINED[0] if on else TRAINED[1]
            inside = bool(on)
        text += tokenizer.decode([token])
    return text + (TRAINED[1] if inside else "")


def position_warnings(report: dict[str, Any], positions: int | None) -> list[str]:
    """Stages whose longest sequence is past the model's positions (they would be cut)."""
    if positions is None:
        return []
    return [
        f"warning: {stage} {split}: its longest sequence ({item['tokens']['max']} tokens) is past the model's "
        f"{positions} positions"
        for stage, entry in report["stages"].items()
        for split, item in entry.items()
        if isinstance(item, dict) and item.get("tokens", {}).get("max", 0) > positions
    ]


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"dataset {report['source']}: format {report['format']}, columns {', '.join(report['columns'])}",
        f"rows: train {report['rows']['train']}, eval {report['rows']['eval']}; data_split {report['data_split']}",
    ]
    for stage, entry in report["stages"].items():
        if entry.get("usable") is False:
            lines.append(f"  {stage}: not usable: {entry['why']}")
            continue
        for split, item in entry.items():
            text = f"  {stage} {split}: {item['rows']} rows"
            if item.get("skipped"):
                text += f", {item['skipped']} malformed skipped (first: {item['first_problem']})"
            if item.get("tokens"):
                tokens = item["tokens"]
                text += f"; tokens p50 {tokens['p50']} p90 {tokens['p90']} p99 {tokens['p99']} max {tokens['max']}"
                if "truncated" in item:
                    text += f"; {item['truncated']} over max_seq_len {item['limit']} (truncated)"
                if "dropped" in item:
                    text += f"; {item['dropped']} prompts over max_prompt_seq_len {item['limit']} (dropped)"
            lines.append(text)
    if "example" in report:
        example = report["example"]
        what = "the prompt as generation reads it" if example["stage"] == "ppo" else "trained tokens between [[ ]]"
        lines += [f"first {example['stage']} row, rendered ({what}):", example["text"]]
    return "\n".join(lines)
