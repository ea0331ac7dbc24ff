"""``python -m benchmarks --gpu``: its arithmetic against hand-computed values, and a clean skip without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks import decoding, gpu

REPO = Path(__file__).resolve().parents[2]


def test_mfu_counts_six_flops_per_parameter_per_token():
    # 1e9 parameters at 1e5 tokens/s: 6e14 FLOP/s of a 989 TFLOP/s peak
    assert gpu.mfu(1_000_000_000, 100_000.0, 989.0) == pytest.approx(6e14 / 989e12)


def test_decode_reads_every_weight_and_the_kv_cache_so_far():
    # 100 bf16 weights, 2 layers of width 4, 3 sequences of 5 tokens: 200 + K and V 2 * 2 * 4 * 2 * 3 * 5
    assert decoding.decode_bytes(100, 2, layers=2, hidden=4, batch=3, context=5) == 200 + 480
    assert decoding.bandwidth_fraction(4.8e12 * 0.001, 0.002, 4.8) == pytest.approx(0.5)


def test_decode_flops_count_the_weights_and_the_attention():
    # 100 weights × 3 sequences × 2, plus scores and weighted sum: 4 × 2 layers × width 4 × 3 sequences × 5 tokens
    assert decoding.decode_flops(100, layers=2, hidden=4, batch=3, context=5) == 600 + 480


def test_a_generation_counts_the_prefill_and_each_decode_step():
    # prefill: 2 × 100 × 3 × 5 + causal attention 2 × 2 × 4 × 3 × 25; then steps over 5 and 6 tokens of context
    expected = 3000 + 1200 + decoding.decode_flops(100, 2, 4, 3, 5) + decoding.decode_flops(100, 2, 4, 3, 6)
    assert decoding.generate_flops(100, layers=2, hidden=4, batch=3, prompt=5, answer=2) == expected


def test_device_peaks_by_name():
    assert gpu.device_peaks("NVIDIA H200") == (989.0, 4.8)
    assert gpu.device_peaks("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert gpu.device_peaks("Some Other GPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_without_cuda_it_skips_cleanly_and_writes_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--gpu", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here; skipped" in done.stdout
    assert list(tmp_path.iterdir()) == []
