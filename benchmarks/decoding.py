"""Decoding speed of HF ``generate`` per cache mode (dynamic, static, static with a compiled decode step) and the
fraction of the device's bound it reaches: memory bandwidth on a GPU (weights and KV cache read per step), FLOPs on a
CPU (its measured matmul peak). ``python -m benchmarks generation`` runs it on this machine's CPU; ``--gpu`` on CUDA.

Writes ``benchmarks/results/generation-<time>.json`` and ``benchmarks/results/generation.md``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

#: CPU shapes: (hidden, layers, heads) of the shipped tiny model and the ~25M-parameter OPT of ``compare --model``.
CPU_SHAPES = {"tiny": (64, 2, 4), "25m": (512, 8, 8)}


def decode_flops(parameters: int, layers: int, hidden: int, batch: int, context: int) -> float:
    """FLOPs of one decode step: 2 per weight per sequence, and the attention over the context (scores and sum)."""
    return 2.0 * parameters * batch + 4.0 * layers * hidden * batch * context


def generate_flops(parameters: int, layers: int, hidden: int, batch: int, prompt: int, answer: int) -> float:
    """FLOPs of a whole generation: the prefill over the prompt (causal attention: half the square) and every
    decode step over its context."""
    prefill = 2.0 * parameters * batch * prompt + 2.0 * layers * hidden * batch * prompt * prompt
    return prefill + sum(decode_flops(parameters, layers, hidden, batch, prompt + t) for t in range(answer))


def matmul_gflops(
    m: int, k: int, n: int, dtype: str = "float32", threads: int = 1, repeats: int | None = None, seconds: float = 1.0
) -> float:
    """This CPU's matmul rate (GFLOP/s) for an [m, k] × [k, n] product in ``dtype`` on ``threads`` threads: exactly
    ``repeats`` products, or as many as fit in ``seconds`` (at least one; bf16 without matrix units is slow)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    kind = getattr(torch, dtype)
    a, b = torch.randn(m, k, dtype=kind), torch.randn(k, n, dtype=kind)
    a @ b  # warm-up: the kernel chosen, its buffers made
    count, start = 0, time.perf_counter()
    while (count < repeats) if repeats else (count == 0 or time.perf_counter() - start < seconds):
        a @ b
        count += 1
    elapsed = time.perf_counter() - start
    torch.set_num_threads(before)
    return 2.0 * m * k * n * count / elapsed / 1e9


def matmul_peak_gflops(threads: int = 1, size: int = 1024, repeats: int = 20) -> float:
    """This CPU's fp32 matmul rate (GFLOP/s) on ``threads`` threads: the bound of a compute-bound decode."""
    return matmul_gflops(size, size, size, "float32", threads, repeats)


def decode_bytes(parameters: int, bytes_per_value: int, layers: int, hidden: int, batch: int, context: int) -> float:
    """Bytes one decode step reads: every weight once, and each sequence's keys and values so far."""
    return parameters * bytes_per_value + 2 * layers * hidden * bytes_per_value * batch * context


def bandwidth_fraction(bytes_per_step: float, step_s: float, peak_tbps: float) -> float:
    return bytes_per_step / step_s / (peak_tbps * 1e12)


def time_generate(model, ids, mask, answer: int, extra: dict) -> float:
    """Median seconds of three greedy generations of exactly ``answer`` tokens, after one warm-up (which also
    compiles)."""
    import torch

    def run() -> None:
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=answer,
                min_new_tokens=answer,
                do_sample=False,
                pad_token_id=1,
                **extra,
            )
        if ids.is_cuda:
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generation(
    models: dict[str, tuple[Path, tuple[int, int, int]]],
    device: str,
    dtype: str,
    batch: int,
    prompt: int,
    answer: int,
    bound,
) -> dict:
    """Tokens/s of HF generate per cache mode (greedy, exactly ``answer`` new tokens, left-padded prompts), and
    ``bound(parameters, layers, hidden, batch, prompt, answer, seconds)``: the fraction of the device's bound."""
    import torch
    from transformers import AutoModelForCausalLM

    from dschat_core.stages.rl.engines.hf import compile_config

    modes = {
        "dynamic": {},
        "static": {"cache_implementation": "static"},
        "static+compile": {"cache_implementation": "static", "compile_config": compile_config()},
    }
    results: dict = {}
    for name, (path, (hidden, layers, _)) in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 500, (batch, prompt), generator=generator).to(device)
        mask = torch.ones_like(ids)
        for i in range(batch):
            mask[i, : i % 16] = 0
        for mode, extra in modes.items():
            try:
                seconds = time_generate(model, ids, mask, answer, extra)
                step_s = seconds / answer  # the prefill included
                results[f"{name}/{mode}"] = {
                    "parameters": params,
                    "tokens_per_s": round(batch * answer / seconds),
                    "decode_step_ms": round(1e3 * step_s, 3),
                    "bound_fraction": round(bound(params, layers, hidden, batch, prompt, answer, seconds), 3),
                }
            except Exception as exc:  # a mode this model or library cannot run: recorded, the rest go on
                results[f"{name}/{mode}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def markdown(result: dict, bound: str) -> str:
    env = result["environment"]
    lines = [
        f"# Decoding on {result['device']}",
        "",
        f"Written by `{result['command']}` (commit {env['commit']}, torch {env['torch']}, transformers "
        f"{env['transformers']}): HF `generate`, greedy, {result['batch']} left-padded prompts of {result['prompt']} "
        f"tokens, exactly {result['answer']} new tokens, {result['dtype']}, medians of 3 after a warm-up (which "
        f"compiles). Bound: {bound}.",
        "",
        *table(result["generation"], "fraction of the bound"),
    ]
    return "\n".join(lines) + "\n"


def table(generation: dict, bound_column: str) -> list[str]:
    """The decoding table: one row per model and cache mode (or the error it ended in)."""
    lines = [
        f"| model / cache | parameters | tokens/s | step ms (prefill included) | {bound_column} |",
        "|---|---|---|---|---|",
    ]
    for key, item in generation.items():
        if "error" in item:
            lines.append(f"| {key} | failed: {item['error'][:120]} | | | |")
        else:
            lines.append(
                f"| {key} | {item['parameters'] / 1e6:.1f}M | {item['tokens_per_s']} | {item['decode_step_ms']} | "
                f"{item['bound_fraction']} |"
            )
    return lines


def cpu_main(out: Path, quick: bool) -> int:
    """Decoding on one CPU thread (what each of 2 ranks has here), bound: the measured fp32 matmul rate."""
    import torch

    from benchmarks.__main__ import environment
    from dschat_core.models import init_tiny

    torch.set_num_threads(1)
    peak = matmul_peak_gflops()

    def bound(params, layers, hidden, batch, prompt, answer, seconds):
        return generate_flops(params, layers, hidden, batch, prompt, answer) / seconds / (peak * 1e9)

    batch, prompt, answer = 16, 32, 16 if quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            name: (init_tiny("opt", Path(tmp) / name, hidden=h, layers=n, heads=k), (h, n, k))
            for name, (h, n, k) in CPU_SHAPES.items()
        }
        result = {
            "command": "python -m benchmarks generation" + (" --quick" if quick else ""),
            "device": "CPU, 1 thread",
            "matmul_peak_gflops": round(peak, 1),
            "environment": environment(),
            "dtype": "float32",
            "batch": batch,
            "prompt": prompt,
            "answer": answer,
            "generation": generation(models, "cpu", "float32", batch, prompt, answer, bound),
        }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = markdown(result, f"decode FLOPs ÷ this thread's fp32 matmul rate, {peak:.1f} GFLOP/s (1024² matmul)")
    (out / f"generation-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "generation.md").write_text(text)
    print(text)
    return 0
