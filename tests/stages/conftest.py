from __future__ import annotations

import pytest

from dschat_core.models import init_tiny
from dschat_core.tiny_task import write_sample


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tiny random models of real architectures and the tiny task's data, built offline."""
    root = tmp_path_factory.mktemp("assets")
    return {
        "opt": init_tiny("opt", root / "tiny-opt"),
        "llama": init_tiny("llama", root / "tiny-llama"),
        "data": write_sample(root / "data"),
    }
