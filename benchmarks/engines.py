"""Stage 3's rollout engines side by side on this CPU (run in the vllm environment: ``tox -e vllm --notest``, then
``.tox/vllm/bin/python -m benchmarks rollout-engines``; ``python -m benchmarks generation`` runs it too where vLLM
is installed).

1. Generation: tokens/s of the hf and the vllm engine (the classes stage 3 runs, through the same seam) on
   ~25M-parameter OPT and Llama, 16 and 64 prompts, greedy and 4 sampled answers per prompt, 1 and 2 threads;
   each engine and thread count in its own process (vLLM binds the process's threads once), the engines alternated.
2. A stage-3 step: GRPO on the tiny question-answer task (samples/tiny-cpu-grpo.yaml, 2 ranks, an OPT with
   32-wide heads), ``rollout_engine`` hf against vllm, alternated, with the step split (generation, scoring,
   training, weight sync).

Nothing is asserted; ratios come from one run on one machine, which the result names.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = (512, 8, 8)  # hidden, layers, heads: ~25M parameters, heads 64 wide
PROMPT, ANSWER = 32, 48
WORKLOADS = {"16 prompts, greedy": (16, 1), "64 prompts, greedy": (64, 1), "16 prompts × 4 sampled": (16, 4)}


def worker(engine_name: str, path: str, threads: int) -> dict:
    """In its own process: this engine's generated tokens/s per workload (median of 3 after a warm-up) and, for
    vLLM, its start-up seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dschat_core.config import PPO
    from dschat_core.stages.rl.engines import Sampling
    from dschat_core.training.distributed import local_dist

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    section = PPO(
        actor_model_name_or_path=path,
        max_prompt_seq_len=PROMPT,
        max_answer_seq_len=ANSWER,
        dtype="fp32",
        vllm={"cpu_threads": threads},
    )
    start = time.perf_counter()
    if engine_name == "vllm":
        from dschat_core.stages.rl.engines.vllm import VLLMEngine

        engine = VLLMEngine.for_stage(section, None, tokenizer, local_dist())
    else:
        from dschat_core.stages.rl.engines.hf import HFEngine

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        engine = HFEngine.for_stage(section, model, tokenizer, local_dist())
    result: dict = {"start_s": round(time.perf_counter() - start, 2), "tokens_per_s": {}}
    generator = torch.Generator().manual_seed(0)
    for name, (prompts, n) in WORKLOADS.items():
        ids = torch.randint(4, 500, (prompts, PROMPT), generator=generator).repeat_interleave(n, 0)
        mask = torch.ones_like(ids)
        sampling = Sampling(max_new_tokens=ANSWER, greedy=n == 1, temperature=1.0)
        rates = []
        for i in range(4):
            begin = time.perf_counter()
            out = engine.generate(ids, mask, sampling)
            seconds = time.perf_counter() - begin
            if i:  # the first is a warm-up
                rates.append(float(out.action_mask.sum()) / seconds)
        result["tokens_per_s"][name] = round(statistics.median(rates), 1)
    return result


def generation(threads: tuple[int, ...] = (1, 2)) -> dict:
    from dschat_core.models import init_tiny

    hidden, layers, heads = SHAPE
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("opt", "llama"):
            path = init_tiny(arch, Path(tmp) / arch, hidden=hidden, layers=layers, heads=heads)
            for count in threads:
                for engine in ("hf", "vllm"):  # alternated, each in a fresh process
                    done = subprocess.run(
                        [sys.executable, "-m", "benchmarks.engines", "worker", engine, str(path), str(count)],
                        capture_output=True,
                        text=True,
                        cwd=REPO,
                        timeout=1800,
                    )
                    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    key = f"{arch}/{count} thread{'s' if count > 1 else ''}/{engine}"
                    results[key] = json.loads(lines[-1]) if lines else {"error": done.stderr[-400:]}
    return results


def stage3(repeats: int, steps: int) -> dict:
    """GRPO steps on 2 ranks with each engine, alternated: medians of the step split over steps 2.. (the first
    holds start-up effects)."""
    from benchmarks.__main__ import run_stage
    from dschat_core.models import init_tiny
    from dschat_core.tiny_task import write_sample

    root = Path(tempfile.mkdtemp(prefix="dschat-bench-engines-"))
    model = init_tiny("opt", root / "opt", heads=2)
    data = write_sample(root / "data")
    base = [
        f"data.data_path=[{data / 'tiny-qa'}]",
        f"data.sft_only_data_path=[{data / 'tiny-sft'}]",
        f"sft.model_name_or_path={model}",
    ]

    run_stage(root / "sft", "sft", 2, *base, sample="tiny-cpu-grpo")
    actor = root / "sft" / "runs" / "tiny-cpu-grpo" / "actor"
    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    for i in range(repeats):
        for engine in ("hf", "vllm"):
            _, records = run_stage(
                root / f"{engine}-{i}",
                "ppo",
                2,
                *base,
                f"ppo.actor_model_name_or_path={actor}",
                f"ppo.rollout_engine={engine}",
                f"ppo.max_steps={steps}",
                "ppo.eval_interval=0",
                sample="tiny-cpu-grpo",
            )
            runs[engine] += [r for r in records if "time/generation_s" in r and r["step"] > 1]
    keys = ("time/generation_s", "time/scoring_s", "time/training_s", "time/sync_s", "time/generated_tokens_per_s")
    return {
        engine: {k: round(statistics.median(r[k] for r in records), 4) for k in keys if all(k in r for r in records)}
        for engine, records in runs.items()
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Stage 3's rollout engines on this CPU: hf against vllm",
        "",
        f"Written by `{result['command']}` on {env['cpu']} ({env['machine']}), commit {env['commit']}, torch "
        f"{env['torch']}, transformers {env['transformers']}, vLLM {result['vllm']}. fp32, prompts of {PROMPT} "
        f"tokens, up to {ANSWER} new tokens; tokens/s counts the answer tokens generated (to EOS or the limit), "
        "medians of 3 after a warm-up, each engine in its own process, the engines alternated.",
        "",
        "## Generation",
        "",
        "| model / threads / engine | start s | " + " | ".join(f"{w} tok/s" for w in WORKLOADS) + " |",
        "|---|---|" + "---|" * len(WORKLOADS),
    ]
    for key, item in result["generation"].items():
        if "error" in item:
            lines.append(f"| {key} | failed: {item['error'][-200:]!r} |" + " |" * len(WORKLOADS))
        else:
            rates = " | ".join(str(item["tokens_per_s"][w]) for w in WORKLOADS)
            lines.append(f"| {key} | {item['start_s']} | {rates} |")
    lines += ["", "vllm ÷ hf, tokens/s:", ""]
    for key, item in result["generation"].items():
        if key.endswith("/vllm") and "error" not in item:
            hf = result["generation"].get(key[: -len("vllm")] + "hf", {})
            if "tokens_per_s" in hf:
                ratios = ", ".join(f"{w}: {item['tokens_per_s'][w] / hf['tokens_per_s'][w]:.2f}×" for w in WORKLOADS)
                lines.append(f"- {key[: -len('/vllm')]}: {ratios}")
    stage = result.get("stage3")
    if stage:
        lines += [
            "",
            f"## A stage-3 step (GRPO, 2 ranks, {result['stage3_steps']} steps × {result['stage3_repeats']} runs "
            "per engine, medians of steps 2 on)",
            "",
            "| engine | generation s | scoring s | training s | weight sync s | generated tok/s |",
            "|---|---|---|---|---|---|",
        ]
        for engine, item in stage.items():
            cells = [item.get(k) for k in ("time/generation_s", "time/scoring_s", "time/training_s", "time/sync_s")]
            cells.append(item.get("time/generated_tokens_per_s"))
            lines.append(f"| {engine} | " + " | ".join("" if c is None else f"{c:g}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(out: Path, quick: bool) -> int:
    import vllm
    from benchmarks.__main__ import environment

    stamp = time.strftime("%Y%m%d-%H%M%S")
    repeats, steps = (1, 4) if quick else (2, 8)
    result = {
        "command": "python -m benchmarks rollout-engines" + (" --quick" if quick else ""),
        "environment": environment(),
        "vllm": vllm.__version__,
        "generation": generation((1,) if quick else (1, 2)),
        "stage3": stage3(repeats, steps),
        "stage3_repeats": repeats,
        "stage3_steps": steps,
    }
    text = markdown(result)
    (out / f"rollout-engines-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "rollout-engines.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        os.environ.setdefault("DSCHAT_PLUGINS", "")
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
