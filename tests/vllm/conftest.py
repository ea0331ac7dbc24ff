"""Stage 3 on vLLM's CPU build (tox -e vllm): skipped where vLLM is not installed (the other tiers)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM's tests run in tox -e vllm")

from dschat_core.models import init_tiny  # noqa: E402
from dschat_core.tiny_task import write_sample  # noqa: E402


@pytest.fixture(scope="session")
def wide_heads(tmp_path_factory):
    """Tiny models whose attention heads are 32 wide (vLLM's CPU kernels take 32 to 512), and the tiny task."""
    root = tmp_path_factory.mktemp("vllm-assets")
    return {
        "opt": init_tiny("opt", root / "tiny-opt", heads=2),
        "llama": init_tiny("llama", root / "tiny-llama", heads=2),
        "data": write_sample(root / "data"),
    }
