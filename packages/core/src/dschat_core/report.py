"""What a run produced, for people: a summary of each finished stage, and ``dschat-core report``'s plots.

Everything is read from the stage folders (``dschat-finished.json`` and ``metrics.jsonl``; the live copy under
``work/`` for a stage still running), so it works for any backend whose storage this machine can read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .backend import FINISHED_MARKER, STAGE_OUTPUT_NAMES

#: (metric, label) plotted per stage; a stage's figure has one panel per metric it logged.
PLOTS = {
    "sft": [("train/loss", "train loss"), ("eval/perplexity", "eval perplexity"), ("train/samples_per_s", "samples/s")],
    "reward": [("train/loss", "train loss"), ("eval/accuracy", "eval accuracy"), ("train/samples_per_s", "samples/s")],
    "ppo": [
        ("reward", "rollout reward"),
        ("eval/reward", "eval reward (greedy)"),
        ("eval/accuracy", "eval accuracy (verifiers, greedy)"),
        ("kl", "KL to reference"),
        ("train/actor_loss", "actor loss"),
        ("train/critic_loss", "critic loss"),
        ("response_len", "response length"),
        ("time/generation_s", "generation s/step"),
        ("time/scoring_s", "scoring s/step"),
        ("time/training_s", "training s/step"),
        ("time/generated_tokens_per_s", "generated tokens/s"),
        ("train/entropy", "policy entropy"),
        ("zero_variance_frac", "groups with equal rewards"),
        ("train/clip_high", "ratio clipped high"),
        ("episodes/turns", "turns per episode"),
        ("eval/episodes/tool_calls", "eval tool calls per episode (greedy)"),
        ("episodes/tool_calls", "tool calls per episode"),
        ("episodes/tool_errors", "tool errors per episode"),
        ("episodes/truncated", "episodes cut by the token budget"),
    ],
    "dpo": [
        ("train/loss", "train loss"),
        ("eval/rewards/accuracies", "eval accuracy (implicit reward)"),
        ("eval/rewards/margins", "eval reward margin"),
        ("train/rewards/chosen", "chosen reward"),
        ("train/rewards/rejected", "rejected reward"),
        ("eval/logps/chosen", "eval log p(chosen)"),
        ("train/samples_per_s", "samples/s"),
    ],
}


def finished_summary(stage_dir: Path) -> dict[str, Any] | None:
    """A finished stage's summary; None while unfinished; {} (with a note) when the marker is damaged."""
    marker = stage_dir / FINISHED_MARKER
    if not marker.exists():
        return None
    try:
        summary = json.loads(marker.read_bytes().decode("utf-8", errors="replace"))
    except ValueError:
        summary = None
    if not isinstance(summary, dict):
        print(f"note: {marker} is damaged; its figures are not shown", file=sys.stderr)
        return {}
    return summary


def _change(summary: dict[str, Any], key: str, label: str) -> str:
    """'label A -> B' from the evaluation before training to the last one ('label B' without the first)."""
    before, after = summary.get(f"{key}_before"), summary.get(key, float("nan"))
    return f"{label} {before:.3f} -> {after:.3f}" if before is not None else f"{label} {after:.3f}"


def summary_line(stage: str, stage_dir: Path) -> str:
    """One line per stage: its headline metric and where the model is."""
    summary = finished_summary(stage_dir)
    if summary is None:
        return f"{stage}: not finished ({stage_dir})"
    if stage == "sft":
        headline = f"eval perplexity {summary.get('eval/perplexity', float('nan')):.3f}"
    elif stage == "reward":
        headline = (
            f"eval accuracy {summary.get('eval/accuracy', float('nan')):.3f} (chosen "
            f"{summary.get('eval/chosen_score', float('nan')):.2f}, rejected "
            f"{summary.get('eval/rejected_score', float('nan')):.2f})"
        )
    elif stage == "dpo":
        headline = (
            f"{_change(summary, 'eval/rewards/accuracies', 'eval accuracy')}, margin "
            f"{summary.get('eval/rewards/margins', float('nan')):.3f} ({summary.get('loss', 'dpo')})"
        )
    else:
        headline = _change(summary, "eval/reward", "eval reward")
        if "eval/accuracy" in summary:
            headline += ", " + _change(summary, "eval/accuracy", "accuracy")
        if summary.get("algorithm") not in (None, "ppo"):
            headline += f" ({summary['algorithm']})"
        stage_dir = Path(stage_dir)
        models = [name for name in ("actor", "critic", "actor_ema") if (stage_dir / name).is_dir()]
        return f"{stage}: {headline}; models: " + ", ".join(str(stage_dir / m) for m in models)
    return f"{stage}: {headline}; model: {stage_dir}"


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    """The points of a stage's ``metrics.jsonl``; a line that is not a JSON object (the half-written last line a
    crashed run leaves, stray bytes) is skipped with a note on stderr."""
    live = stage_dir.parent / "work" / stage_dir.name / "metrics.jsonl"
    path = stage_dir / "metrics.jsonl" if (stage_dir / "metrics.jsonl").exists() else live
    if not path.exists():
        return []
    return [p for p in json_lines(path) if isinstance(p.get("step"), int)]


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per line; a line that is none (the half-written last line a crashed
    run leaves, stray bytes) is skipped with a note on stderr."""
    found, skipped = [], []
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if isinstance(item, dict):
            found.append(item)
        else:
            skipped.append(number)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (" …" if len(skipped) > 5 else "")
        print(f"note: {path}: skipped {len(skipped)} unreadable line(s) ({shown})", file=sys.stderr)
    return found


def _log_scale(values: list[float]) -> bool:
    """Values that span decades (perplexity from hundreds to one) read on a log axis."""
    positive = [v for v in values if isinstance(v, int | float) and v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) > 50


def samples(stage_dir: Path) -> list[tuple[int, list[dict[str, Any]]]]:
    """(step, answers) of every evaluation that saved its greedy answers (stage 3, DPO), by step."""
    folder = stage_dir.parent / "work" / stage_dir.name / "samples"
    found = []
    for path in folder.glob("step-*.jsonl"):
        if path.stem.split("-")[1].isdigit():
            found.append((int(path.stem.split("-")[1]), json_lines(path)))
    return sorted(found, key=lambda item: item[0])


def _answers_table(stage_dir: Path, shown: int = 5) -> list[str]:
    """The first and the last evaluation's answers to the same prompts, side by side."""
    evaluated = samples(stage_dir)
    if len(evaluated) < 2:
        return []
    (first_step, first), (last_step, last) = evaluated[0], evaluated[-1]
    later = {r["prompt"]: r for r in last}
    lines = ["", f"| prompt | answer at step {first_step} | answer at step {last_step} |", "|---|---|---|"]
    for row in first[:shown]:
        after = later.get(row["prompt"], {}).get("answer", "")

        def cell(text: str) -> str:
            return " ".join(str(text).split()).replace("|", "\\|")

        lines.append(f"| {cell(row['prompt'])} | {cell(row['answer'])} | {cell(after)} |")
    return lines


def _plot(axis, points: list[tuple[int, float]], label: str | None = None) -> None:
    axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None, label=label)


def _figure(panels: list[tuple[str, str]], series: dict[str, list[dict[str, Any]]], title: str, path: Path) -> None:
    """One panel per metric; one line per run in ``series`` (label -> records). Several runs get one legend for
    the whole figure, below the panels, where it covers no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    legend_rows = (len(series) + 2) // 3 if len(series) > 1 else 0
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows + 0.3 * legend_rows), squeeze=False)
    for axis, (key, label) in zip(axes.flat, panels, strict=False):
        every = []
        for name, records in series.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            every += [p[1] for p in points]
            _plot(axis, points, name)
        if _log_scale(every):
            axis.set_yscale("log")
        axis.set_title(label)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(title)
    if legend_rows:
        bottom = (0.3 * legend_rows + 0.15) / figure.get_figheight()
        figure.tight_layout(rect=(0, bottom, 1, 1))
        handles, labels = axes.flat[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="lower center", ncol=min(3, len(series)), fontsize=8, frameon=False)
    else:
        figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(run_dir: str | Path) -> list[Path]:
    """``<run>/report/<stage>.png`` for every stage with metrics, and ``<run>/report/report.md`` with each stage's
    summary and, where evaluations saved answers, the first and last ones side by side."""
    run = Path(run_dir)
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    written, lines = [], [f"# Run report: {run}", ""]
    for stage, folder in STAGE_OUTPUT_NAMES.items():
        stage_dir = run / folder
        records = read_metrics(stage_dir)
        if not records and finished_summary(stage_dir) is None:
            continue
        lines.append(f"- {summary_line(stage, stage_dir)}")
        panels = [(key, label) for key, label in PLOTS[stage] if any(key in r for r in records)]
        if not panels:
            continue
        path = out / f"{stage}.png"
        _figure(panels, {run.name: records}, f"{run.name}: {stage}", path)
        written.append(path)
        lines.append(f"\n![{stage}]({path.name})\n")
        lines += _answers_table(stage_dir)
    if len(lines) == 2:
        raise FileNotFoundError(f"no stage outputs or metrics under {run}")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [report, *written]


#: Settings that differ between any two runs without making them different experiments.
_NOT_A_DIFFERENCE = ("output_dir", "storage.root", "data.cache_dir", "run_name", "backends")


def _run_config(run: Path, stage: str) -> dict[str, Any]:
    """The stage's settings as the run resolved them: its own section and the shared ones (not other stages')."""
    import yaml

    from .tracking import flatten

    path = run / "configs" / f"{stage}.yaml"
    if not path.is_file():
        return {}
    flat = flatten(yaml.safe_load(path.read_text()) or {})
    others = tuple(f"{name}." for name in STAGE_OUTPUT_NAMES if name != stage)
    root = str(run.parent.parent)  # storage.root: paths under it are the same place in each run's own root

    def rooted(value: Any) -> Any:
        if isinstance(value, list):
            return [rooted(v) for v in value]
        return value.replace(root, "$root") if isinstance(value, str) and value.startswith(root) else value

    return {
        k: rooted(v)
        for k, v in flat.items()
        if not k.startswith(others)
        and not any(part in k for part in _NOT_A_DIFFERENCE)
        and not (isinstance(v, str) and str(run) in v)
    }


def _short_value(value: Any, width: int = 24) -> str:
    """A setting's value for a legend: a path by its last part, anything cut to ``width`` characters."""
    text = str(value)
    if isinstance(value, str) and "/" in value:
        text = Path(value.rstrip("/")).name
    elif isinstance(value, list) and value and all(isinstance(v, str) and "/" in v for v in value):
        text = ",".join(Path(v.rstrip("/")).name for v in value)
    return text if len(text) <= width else text[: width - 1] + "…"


def run_labels(runs: list[Path], configs: dict[Path, dict[str, Any]], differs: list[str]) -> dict[Path, str]:
    """Short names for runs side by side: the run's name where the names differ; for runs of one name (one config
    under several roots), the settings they differ in, as key=value (at most two, values shortened)."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names) or not differs:
        return {r: r.name if names.count(r.name) == 1 else f"{r.parent.parent.name}/{r.name}" for r in runs}
    return {
        r: ", ".join(f"{k.rsplit('.', 1)[-1]}={_short_value(configs[r].get(k))}" for k in differs[:2]) for r in runs
    }


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Every stage's curves of several runs overlaid (same axes; one legend below the panels with a short label per
    run), and ``report.md`` with the final figures and the stage's settings that differ, side by side."""
    runs = [Path(r) for r in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = ["# Runs compared: " + ", ".join(r.name for r in runs), ""]
    for stage, folder in STAGE_OUTPUT_NAMES.items():
        present = [r for r in runs if read_metrics(r / folder) or finished_summary(r / folder)]
        if not present:
            continue
        configs = {r: _run_config(r, stage) for r in present}
        keys = sorted({k for c in configs.values() for k in c})
        differs = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
        short = run_labels(present, configs, differs)
        series = {short[r]: read_metrics(r / folder) for r in present}
        panels = [(key, label) for key, label in PLOTS[stage] if any(key in m for s in series.values() for m in s)]
        lines += [f"## {stage}", ""]
        if panels:
            path = out / f"{stage}.png"
            names = [r.name for r in present]
            title = " vs ".join(names) if len(set(names)) == len(names) else f"{len(names)} runs of {names[0]}"
            _figure(panels, series, f"{stage}: {title}", path)
            written.append(path)
            lines.append(f"![{stage}]({path.name})\n")
        finals = {r: finished_summary(r / folder) or {} for r in present}
        figures = sorted(
            {k for f in finals.values() for k in f if k.startswith("eval/") and isinstance(f[k], int | float)}
        )
        if figures:
            lines += ["| run | " + " | ".join(figures) + " |", "|---" * (len(figures) + 1) + "|"]
            lines += [
                f"| {short[r]} | " + " | ".join(f"{finals[r].get(k, float('nan')):.4g}" for k in figures) + " |"
                for r in present
            ]
            lines.append("")
        if differs:
            lines += ["| setting | " + " | ".join(short[r] for r in present) + " |", "|---" * (len(present) + 1) + "|"]
            lines += [f"| `{k}` | " + " | ".join(f"{configs[r].get(k)}" for r in present) + " |" for k in differs]
            lines.append("")
    if len(lines) == 2:
        raise FileNotFoundError("no stage outputs or metrics under " + ", ".join(map(str, runs)))
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [report, *written]
