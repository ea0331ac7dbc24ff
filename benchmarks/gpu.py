"""``python -m benchmarks --gpu`` (or ``gpu``): the GPU figures issue 18 asks for, in one run of under 10 minutes on
one H100/H200. Without CUDA it says so and exits 0 (nothing is measured, nothing written).

On random OPT-125M/350M/1.3B-shaped models (hidden size, layers and heads of the real ones; the vocabulary is the
shipped tokenizer's 512 tokens, so the LM head is small and the transformer blocks dominate):

- generation tokens/s of one model on the GPU, HF ``generate`` with the dynamic cache, the static cache, and the
  static cache with a compiled decode step (CUDA graphs), and the fraction of the GPU's memory bandwidth each
  reaches (weights + KV cache bytes read per decode step ÷ the step's time ÷ the HBM peak);
- stages 1 and 2 through the local backend (bf16, 1 GPU, ``max_steps``): samples/s, tokens/s and MFU
  (6 × parameters × tokens/s ÷ the bf16 dense peak);
- stage 3 (PPO) through the local backend: the step split (generation, scoring, training), generated tokens/s, with
  and without DeepSpeed's Hybrid Engine, and with the vllm rollout engine where vLLM is installed.

Writes ``benchmarks/results/gpu-<time>.json`` and ``benchmarks/results/gpu.md``, the device named.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path

from benchmarks.decoding import bandwidth_fraction, decode_bytes, generation, table

#: OPT shapes: (hidden, layers, heads), as facebook/opt-125m, -350m, -1.3b.
SHAPES = {"opt-125m": (768, 12, 12), "opt-350m": (1024, 24, 16), "opt-1.3b": (2048, 24, 32)}
#: Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s) of the devices this runs on, by name.
PEAKS = {"H200": (989.0, 4.8), "H100": (989.0, 3.35), "A100": (312.0, 2.0)}


def device_peaks(name: str) -> tuple[float, float] | None:
    """(bf16 TFLOP/s, HBM TB/s) of a device by its CUDA name, or None when unknown (no fractions then)."""
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None


def mfu(parameters: int, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of training: 6 FLOPs per parameter per token (forward 2, backward 4) ÷ peak."""
    return 6.0 * parameters * tokens_per_s / (peak_tflops * 1e12)


def stages(models: dict[str, Path], peaks, quick: bool, results: dict, progress) -> dict:
    """Stages 1 and 2, then PPO with and without the Hybrid Engine and on vLLM, through the local backend on 1 GPU,
    into ``results`` (``progress()`` after each run, so a lease cut short keeps what was measured); a run that fails
    is recorded with the end of its error and the rest go on."""
    from benchmarks.__main__ import headline, parameters, run_stage

    steps = 10 if quick else 20

    def measure(key: str, root: Path, stage: str, *overrides: str) -> dict:
        try:
            _, records = run_stage(
                root,
                stage,
                1,
                "topology.accelerator=cuda",
                "topology.gpus_per_node=1",
                f"{stage}.dtype=bf16",
                f"{stage}.eval_before_training=false",
                *overrides,
            )
            results[key] = headline(stage, records)
        except SystemExit as exc:
            results[key] = {"error": str(exc)[-500:]}
        progress()
        return results[key]

    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models.items():
            root = Path(tmp) / name
            params = parameters(path)
            for stage in ("sft", "reward"):
                item = measure(
                    f"{name}/{stage}",
                    root,
                    stage,
                    f"{stage}.model_name_or_path={path}",
                    f"{stage}.max_steps={steps}",
                    f"{stage}.per_device_train_batch_size=32",
                )
                item["parameters"] = params
                if peaks and item.get("tokens_per_s"):
                    item["mfu"] = round(mfu(params, item["tokens_per_s"], peaks[0]), 4)
            variants = [("ppo", []), ("ppo/hybrid_engine", ["ppo.enable_hybrid_engine=true"])]
            if importlib.util.find_spec("vllm") is not None:  # installed with dschat-core[vllm]
                variants.append(("ppo/vllm", ["ppo.rollout_engine=vllm", "ppo.vllm.enforce_eager=false"]))
            else:
                results[f"{name}/ppo/vllm"] = {"error": "vLLM is not installed here: pip install 'dschat-core[vllm]'"}
            for label, extra in variants:
                measure(
                    f"{name}/{label}",
                    root,
                    "ppo",
                    f"ppo.max_steps={max(steps // 3, 4)}",
                    "ppo.max_answer_seq_len=128",
                    "ppo.eval_prompts=16",
                    f"ppo.output_dir={root / label.replace('/', '-')}",
                    *extra,
                )
    return results


def markdown(result: dict) -> str:
    from benchmarks.__main__ import fmt

    env = result["environment"]
    lines = [
        "# Benchmarks on a GPU",
        "",
        f"Written by `python -m benchmarks --gpu{' --quick' if result['quick'] else ''}` on {result['device']} "
        f"(commit {env['commit']}, torch {env['torch']}, DeepSpeed {env['deepspeed']}), random OPT-shaped models "
        "with the shipped 512-token vocabulary, bf16.",
        "",
        "## Generation (HF generate, 32 left-padded prompts of 128 tokens, fixed answer length)",
        "",
        *table(result["generation"], "HBM bandwidth fraction"),
    ]
    lines += [
        "",
        "## Stages through the local backend (1 GPU)",
        "",
        "| model / stage | samples/s | tokens/s | MFU | step s (gen / score / train) | generated tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for key, item in result["stages"].items():
        if "error" in item:
            lines.append(f"| {key} | failed: {item['error'][-120:]!r} | | | | |")
            continue
        split = ""
        if item.get("step_s") is not None:
            split = f"{item['step_s']} ({item['generation_s']} / {item['scoring_s']} / {item['training_s']})"
        mfu_cell = f"{100 * item['mfu']:.1f}%" if item.get("mfu") is not None else ""
        lines.append(
            f"| {key} | {fmt(item.get('samples_per_s'), 1)} | {fmt(item.get('tokens_per_s'))} | {mfu_cell} | "
            f"{split} | {fmt(item.get('generated_tokens_per_s'))} |"
        )
    return "\n".join(lines) + "\n"


def main(out: Path, quick: bool) -> int:
    import torch

    if not torch.cuda.is_available():
        print("python -m benchmarks --gpu: no CUDA device here; skipped (nothing measured, nothing written)")
        return 0
    from benchmarks.__main__ import environment
    from dschat_core.models import init_tiny

    device = torch.cuda.get_device_name(0)
    peaks = device_peaks(device)
    names = ["opt-125m", "opt-350m"] if quick else list(SHAPES)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            name: init_tiny(
                "opt",
                Path(tmp) / name,
                hidden=SHAPES[name][0],
                layers=SHAPES[name][1],
                heads=SHAPES[name][2],
                max_positions=2048,
            )
            for name in names
        }
        stamp = time.strftime("%Y%m%d-%H%M%S")
        result: dict = {
            "quick": quick,
            "device": device,
            "peaks_bf16_tflops_hbm_tbps": peaks,
            "environment": {**environment(), "device": device},
            "generation": {},
            "stages": {},
        }

        def save() -> None:  # after each part: what was measured survives a run cut short
            result["wall_s"] = round(time.monotonic() - started, 1)
            (out / f"gpu-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
            (out / "gpu.md").write_text(markdown(result))

        result["generation"] = generation(
            {name: (path, SHAPES[name]) for name, path in models.items()},
            "cuda",
            "bfloat16",
            32,
            128,
            64 if quick else 128,
            lambda params, layers, hidden, batch, prompt, answer, seconds: bandwidth_fraction(
                decode_bytes(params, 2, layers, hidden, batch, prompt + answer // 2),  # the mean context
                seconds / answer,
                peaks[1] if peaks else float("nan"),
            ),
        )
        save()
        stages(models, peaks, quick, result["stages"], save)
    save()
    print(markdown(result))
    return 0
