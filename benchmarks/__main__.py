"""``python -m benchmarks [--quick]``: data pipeline, stages 1-3 on the tiny sample, and 1 vs 2 CPU ranks.

Every figure comes from the runs' own ``metrics.jsonl`` (or timers around the data pipeline); medians over steps.
Writes ``benchmarks/results/run-<time>.json`` (machine, versions, git commit, every figure) and the table in
``docs/benchmarks.md``. Nothing here is asserted: these machines are noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "tiny-cpu.yaml"


def median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), int | float)]
    return round(statistics.median(values), 4) if values else None


def run_stage(root: Path, stage: str, ranks: int, *overrides: str) -> tuple[float, list[dict]]:
    """One stage through the local backend; (wall seconds, its metrics)."""
    args = [sys.executable, "-c", "from dschat_core.cli import main; main()", "train", "--backend", "local",
            "--stage", stage, "-c", str(SAMPLE), "--set", f"storage.root={root}",
            "--set", f"topology.gpus_per_node={ranks}", *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    subprocess.run(args, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    folder = {"sft": "actor", "reward": "reward", "ppo": "ppo"}[stage]
    metrics = root / "runs" / "tiny-cpu" / folder / "metrics.jsonl"
    return wall, [json.loads(line) for line in metrics.read_text().splitlines()]


def data_pipeline(quick: bool) -> dict:
    from dschat_core.config import load_config
    from dschat_core.data.pipeline import load_stage_data
    from dschat_core.models import train_tokenizer
    from dschat_core.plugins import get_dataset_formats
    from dschat_core.tiny_task import corpus, make_rows

    rows = 10_000 if quick else 50_000
    tokenizer = train_tokenizer(corpus())
    results = {"rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(rows, 7)))
        for num_proc in (1, 2):
            for stage in ("sft", "reward", "ppo"):
                config = load_config(None, [f"data.data_path=[{folder}]", f"data.cache_dir={tmp}/cache-{num_proc}",
                                            f"data.num_proc={num_proc}"])
                start = time.perf_counter()
                data = load_stage_data(config, stage, tokenizer, get_dataset_formats(), log=lambda text: None)
                cold = time.perf_counter() - start
                start = time.perf_counter()
                load_stage_data(config, stage, tokenizer, get_dataset_formats(), log=lambda text: None)
                warm = time.perf_counter() - start
                results[f"{stage}/num_proc{num_proc}"] = {
                    "rows": len(data.train) + (len(data.eval) if data.eval is not None else 0),
                    "cold_s": round(cold, 3), "cached_s": round(warm, 3)}
    return results


def stages(quick: bool, repeats: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        epochs = ["sft.num_train_epochs=4"] if quick else []
        runs: dict[int, list[tuple[float, list[dict]]]] = {1: [], 2: []}
        for repeat in range(repeats):  # alternate, so that drift on a noisy machine hits both alike
            for ranks in (1, 2):
                runs[ranks].append(run_stage(root / f"r{ranks}-{repeat}", "sft", ranks, *epochs))
        for ranks, done in runs.items():
            per_run = [median(records, "train/samples_per_s") for _, records in done]
            results[f"sft/ranks{ranks}"] = {
                "wall_s": round(statistics.median(w for w, _ in done), 1),
                "samples_per_s": round(statistics.median(per_run), 1), "samples_per_s_runs": per_run,
                "tokens_per_s": statistics.median(median(r, "train/tokens_per_s") for _, r in done),
                "memory_gib": median(done[-1][1], "train/memory_gib")}
        # Stages 2 and 3 continue in the first 2-rank SFT run's storage (stage 3 needs its actor).
        wall, records = run_stage(root / "r2-0", "reward", 2, *(["reward.num_train_epochs=2"] if quick else []))
        results["reward/ranks2"] = {"wall_s": round(wall, 1), "samples_per_s": median(records, "train/samples_per_s"),
                                    "accuracy": [r["eval/accuracy"] for r in records if "eval/accuracy" in r][-1]}
        wall, records = run_stage(root / "r2-0", "ppo", 2, *(["ppo.num_train_epochs=1"] if quick else []))
        steps = [r for r in records if "time/generation_s" in r]
        results["ppo/ranks2"] = {
            "wall_s": round(wall, 1), "steps": len(steps),
            "generation_s": median(steps, "time/generation_s"), "scoring_s": median(steps, "time/scoring_s"),
            "training_s": median(steps, "time/training_s"),
            "generated_tokens_per_s": median(steps, "time/generated_tokens_per_s"),
            "memory_gib": median(steps, "train/memory_gib"),
            "eval_reward": [r["eval/reward"] for r in records if "eval/reward" in r]}
    one, two = results["sft/ranks1"]["samples_per_s"], results["sft/ranks2"]["samples_per_s"]
    if one and two:
        results["sft/parallel_efficiency_2_ranks"] = round(two / (2 * one), 3)
    return results


def environment() -> dict:
    import datasets
    import deepspeed
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": sys.version.split()[0],
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "commit": commit.stdout.strip(), "device": "cpu"}


def markdown(result: dict) -> str:
    env, data, run = result["environment"], result["data"], result["stages"]
    lines = ["# Benchmarks", "", "Written by `python -m benchmarks" + (" --quick" if result["quick"] else "") + "` "
             f"(commit {env['commit']}, {env['machine']}, torch {env['torch']}, DeepSpeed {env['deepspeed']}). "
             "Medians over each run's logged steps; no GPU was lent for these figures.", "",
             f"## Data pipeline ({data['rows']} rm-static rows, tokenize + cache per stage)", "",
             "| stage | num_proc | rows | cold s | from cache s |", "|---|---|---|---|---|"]
    for key, item in data.items():
        if "/" in key:
            stage, proc = key.split("/")
            lines.append(f"| {stage} | {proc[-1]} | {item['rows']} | {item['cold_s']} | {item['cached_s']} |")
    lines += ["", "## Stages on the tiny sample (CPU ranks, fp32)", "",
              "| run | wall s | samples/s | tokens/s | memory GiB/rank |", "|---|---|---|---|---|"]
    def fmt(value, digits: int = 0) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    for key in ("sft/ranks1", "sft/ranks2", "reward/ranks2"):
        item = run[key]
        lines.append(f"| {key} | {item['wall_s']} | {fmt(item['samples_per_s'])} | {fmt(item.get('tokens_per_s'))} | "
                     f"{fmt(item.get('memory_gib'), 2)} |")
    if "sft/parallel_efficiency_2_ranks" in run:
        lines += ["", f"SFT parallel efficiency, 2 ranks vs 1: {run['sft/parallel_efficiency_2_ranks']} "
                  "(median of alternated runs; 2 ranks share the 2 cores, 1 rank uses both for its threads). "
                  f"Samples/s per run, 1 rank: {run['sft/ranks1']['samples_per_s_runs']}; 2 ranks: "
                  f"{run['sft/ranks2']['samples_per_s_runs']}."]
    ppo = run["ppo/ranks2"]
    total = (ppo["generation_s"] or 0) + (ppo["scoring_s"] or 0) + (ppo["training_s"] or 0)
    share = {k: round(100 * (ppo[k] or 0) / total) if total else 0 for k in ("generation_s", "scoring_s", "training_s")}
    lines += ["", f"## Stage 3, per PPO step (2 ranks, {ppo['steps']} steps)", "",
              "| generation s | scoring s (actor, ref, critic, reward forwards) | training s | generated tokens/s |",
              "|---|---|---|---|",
              f"| {ppo['generation_s']} ({share['generation_s']}%) | {ppo['scoring_s']} ({share['scoring_s']}%) | "
              f"{ppo['training_s']} ({share['training_s']}%) | {fmt(ppo['generated_tokens_per_s'])} |", "",
              f"Where a PPO step goes at this size: {share['training_s']}% in the updates (actor and critic "
              f"backward and optimizer steps per micro-batch), {share['generation_s']}% in generation (token by token, "
              f"KV-cached), {share['scoring_s']}% in the four scoring forwards. eval/reward over the run: "
              f"{', '.join(f'{x:.2f}' for x in ppo['eval_reward'])}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="Fewer rows and epochs (a few minutes on 2 cores).")
    parser.add_argument("--repeats", type=int, default=3, help="SFT runs per rank count, alternated.")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("DSCHAT_STATE_DIR", tempfile.mkdtemp(prefix="dschat-bench-state-"))
    result = {"quick": args.quick, "environment": environment(), "data": data_pipeline(args.quick),
              "stages": stages(args.quick, args.repeats)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2) + "\n")
    (REPO / "docs" / "benchmarks.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
