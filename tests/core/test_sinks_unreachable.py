"""A tracking server out of reach stops the stage in seconds, in one line (it used to stay silent for minutes)."""

from __future__ import annotations

import time

import pytest

from dschat_core.plugins import get_metric_sinks
from dschat_core.tracking import MLFLOW_BOUNDS, SinkContext, SinkError, start_sinks


def test_an_unreachable_mlflow_server_fails_the_start_in_seconds(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9 (discard)
    for name in MLFLOW_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    context = SinkContext("sft", tmp_path, "run-sft", "run", "dschat", "dschat", [], {}, 0)
    started = time.monotonic()
    with pytest.raises(SinkError) as caught:
        start_sinks(["mlflow"], get_metric_sinks(), context)
    took = time.monotonic() - started
    line = str(caught.value)
    assert "tracking sink 'mlflow' could not start" in line and "\n" not in line
    assert took < 120, took  # MLflow's own defaults: 120 s per request, 7 retries with doubling waits
