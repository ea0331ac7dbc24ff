"""What a run produced, for people: a summary of each finished stage, and ``dschat-core report``'s plots.

Everything is read from the stage folders (``dschat-finished.json`` and ``metrics.jsonl``; the live copy under
``work/`` for a stage still running), so it works for any backend whose storage this machine can read.
"""

from __future__ import annotations

import json
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
        ("kl", "KL to reference"),
        ("train/actor_loss", "actor loss"),
        ("train/critic_loss", "critic loss"),
        ("response_len", "response length"),
        ("time/generation_s", "generation s/step"),
        ("time/scoring_s", "scoring s/step"),
        ("time/training_s", "training s/step"),
        ("time/generated_tokens_per_s", "generated tokens/s"),
    ],
}


def finished_summary(stage_dir: Path) -> dict[str, Any] | None:
    marker = stage_dir / FINISHED_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


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
    else:
        before = summary.get("eval/reward_before")
        headline = (
            f"eval reward {before:.3f} -> {summary.get('eval/reward', float('nan')):.3f}"
            if before is not None
            else f"eval reward {summary.get('eval/reward', float('nan')):.3f}"
        )
        stage_dir = Path(stage_dir)
        models = [name for name in ("actor", "critic", "actor_ema") if (stage_dir / name).is_dir()]
        return f"{stage}: {headline}; models: " + ", ".join(str(stage_dir / m) for m in models)
    return f"{stage}: {headline}; model: {stage_dir}"


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    live = stage_dir.parent / "work" / stage_dir.name / "metrics.jsonl"
    path = stage_dir / "metrics.jsonl" if (stage_dir / "metrics.jsonl").exists() else live
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(run_dir: str | Path) -> list[Path]:
    """``<run>/report/<stage>.png`` for every stage with metrics, and ``<run>/report/report.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        columns = min(3, len(panels))
        rows = (len(panels) + columns - 1) // columns
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
        for axis, (key, label) in zip(axes.flat, panels, strict=False):
            points = [(r["step"], r[key]) for r in records if key in r]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
            axis.set_title(label)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        for axis in list(axes.flat)[len(panels) :]:
            axis.axis("off")
        figure.suptitle(f"{run.name}: {stage}")
        figure.tight_layout()
        path = out / f"{stage}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
        lines.append(f"\n![{stage}]({path.name})\n")
    if len(lines) == 2:
        raise FileNotFoundError(f"no stage outputs or metrics under {run}")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [report, *written]
