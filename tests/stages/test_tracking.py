"""Metric sinks for real (2 CPU ranks): the same values in metrics.jsonl, TensorBoard, W&B (offline) and MLflow (a
file store), each read back with its own reader; SIGKILL + resume continues the same tracked runs with no step
logged twice; a sink that cannot start exits 2 in one line; one that dies mid-run does not stop training; and
`dschat-core report A B` compares two runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dschat_core.backend import FINISHED_MARKER
from dschat_core.config import write_config

from ..webhook import Receiver, install_webhook_sink
from .runs import config, kill_after_checkpoint, metrics, run_stage

pytestmark = pytest.mark.ranks
ALL_SINKS = "tracking.sinks=[jsonl, tensorboard, wandb, mlflow]"


@pytest.fixture
def offline_tracking(tmp_path, monkeypatch) -> str:
    """W&B without network and an MLflow file store, as on a cluster without egress."""
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def work(out: Path) -> Path:
    return out.parent / "work" / out.name


def jsonl_points(out: Path, key: str) -> dict[int, float]:
    rows = [m for m in metrics(out) if key in m]
    assert len({m["step"] for m in rows}) == len(rows), "a step logged twice in metrics.jsonl"
    return {m["step"]: m[key] for m in rows}


def tensorboard_points(folder: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()  # honours the purge a resumed writer records
    return [(e.step, e.value) for e in events.Scalars(key)]


def wandb_records(folder: Path):
    """Every record of the offline runs under ``folder``: W&B's .wandb files are a LevelDB-style log (a 7-byte
    header, 32 KiB blocks of chunks: crc, length, type) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        position, chunks = 7, b""
        while position + 7 <= len(data):
            room = 32768 - position % 32768
            if room < 7:  # a block's tail too short for a chunk header is padding
                position += room
                continue
            _, length, kind = struct.unpack("<IHB", data[position : position + 7])
            if kind == 0 and length == 0:
                break
            chunks += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a full record, or a record's last chunk
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                chunks = b""
                yield record


def wandb_points(folder: Path, key: str) -> tuple[set[str], list[tuple[int, float]]]:
    run_ids, points = set(), []
    for record in wandb_records(folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_ids.add(record.run.run_id)
        elif kind == "history":
            # W&B splits a key at "/" into nested_key
            values = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
            }
            if key in values:
                points.append((values["_step"], values[key]))
    return run_ids, points


def mlflow_runs(uri: str, stage: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    # Read back after the run: the sink allowed the file store itself, in the ranks (not inherited from here).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("dschat")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dschat.stage` = '{stage}'")
    return client, runs


def test_every_sink_logs_the_same_values(tmp_path, assets, offline_tracking, monkeypatch):
    cfg = config(tmp_path, assets, "sft.max_steps=4", "sft.print_interval=1", ALL_SINKS)
    out, log = run_stage(cfg, "sft")
    expected = jsonl_points(out, "train/loss")
    assert sorted(expected) == [1, 2, 3, 4]

    board = tensorboard_points(work(out) / "tensorboard", "train/loss")
    assert [step for step, _ in board] == [1, 2, 3, 4]
    assert all(v == pytest.approx(expected[s], rel=1e-6) for s, v in board)  # TensorBoard keeps float32

    run_ids, points = wandb_points(work(out), "train/loss")
    assert len(run_ids) == 1
    assert dict(points) == expected

    client, runs = mlflow_runs(offline_tracking, "sft", monkeypatch)
    assert len(runs) == 1 and runs[0].info.run_name == "tiny-cpu-sft"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == expected
    params = runs[0].data.params
    assert params["sft.learning_rate"] == str(cfg.sft.learning_rate) and params["run_name"] == "tiny-cpu"
    assert "backends" not in " ".join(params)
    assert json.loads((work(out) / "tracking.json").read_text())["mlflow"]["run_id"] == runs[0].info.run_id


def test_sigkill_and_resume_continue_the_same_tracked_runs_without_a_step_twice(
    tmp_path, assets, offline_tracking, monkeypatch
):
    cfg = config(tmp_path, assets, "sft.max_steps=8", "sft.save_interval=3", "sft.print_interval=1", ALL_SINKS)
    kill_after_checkpoint(cfg, "sft", "actor", step=3)
    out, log = run_stage(cfg, "sft")
    assert "resumed sft from" in log

    assert sorted(jsonl_points(out, "train/loss")) == list(range(1, 9))
    steps = [step for step, _ in tensorboard_points(work(out) / "tensorboard", "train/loss")]
    assert sorted(steps) == list(range(1, 9))

    run_ids, points = wandb_points(work(out), "train/loss")
    assert len(run_ids) == 1, run_ids  # both attempts wrote to one W&B run
    assert len(list(work(out).glob("wandb/offline-run-*"))) == 2
    counts = Counter(step for step, _ in points)
    assert max(counts.values()) == 1 and max(counts) == 8, counts

    client, runs = mlflow_runs(offline_tracking, "sft", monkeypatch)
    assert len(runs) == 1  # the resumed attempt reopened the killed one's run
    history = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert len(history) == len(set(history)) and max(history) == 8, history


def user_env(site: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop("DSCHAT_PLUGINS", None)  # installed plugins load, as for a user
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def train(cfg_path: Path, env: dict[str, str], *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "dschat_core.cli", "train", "-b", "local", "-s", "sft", "-c", str(cfg_path)]
    for assignment in sets:
        args += ["--set", assignment]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)


def test_a_sink_that_cannot_start_stops_the_stage_with_one_line_and_exit_2(tmp_path, assets):
    cfg = tmp_path / "run.yaml"
    write_config(config(tmp_path, assets, "sft.max_steps=2", "tracking.sinks=[wandb]"), cfg)
    # W&B online with no API key anywhere: what a cluster job without its secret sees.
    # (DeepSpeed's built CPU op stays where the worker keeps it: another home would build it again, 30-40 s.)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    env = user_env(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=cache, WANDB_SILENT="true")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_CONFIG_DIR"):
        env.pop(name, None)
    result = train(cfg, env)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: stage sft did not succeed")
    assert "tracking sink 'wandb' could not start: UsageError: No API key" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "tiny-cpu" / "actor" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def webhook_site(tmp_path_factory) -> Path:
    return install_webhook_sink(tmp_path_factory.mktemp("dschat-webhook"), tmp_path_factory.mktemp("site"))


def test_the_documented_sink_plugin_gets_every_point_and_its_death_mid_run_does_not_stop_training(
    tmp_path, assets, webhook_site
):
    receiver = Receiver(die_after_step=3)
    cfg = tmp_path / "run.yaml"
    write_config(config(tmp_path, assets, "sft.max_steps=6", "sft.print_interval=1"), cfg)
    env = user_env(webhook_site, DSCHAT_WEBHOOK_URL=receiver.url, DSCHAT_WEBHOOK_TOKEN="fake-token-4f1c")
    result = train(cfg, env, "tracking.sinks=[jsonl, webhook]")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    out = tmp_path / "runs" / "tiny-cpu" / "actor"
    assert (out / "model.safetensors").exists()
    assert sorted(jsonl_points(out, "train/loss")) == list(range(1, 7))  # metrics.jsonl has every point
    assert output.count("warning: tracking sink 'webhook' failed") == 1
    received = {step: v["train/loss"] for step, v in receiver.points().items() if "train/loss" in v}
    assert min(received) == 1 and 3 <= max(received) < 6  # posted until the service went away at step 3
    assert received == {s: v for s, v in jsonl_points(out, "train/loss").items() if s in received}
    assert receiver.posts[0]["event"] == "start" and receiver.posts[0]["params"]["sft.max_steps"] == 6
    assert receiver.authorization == {"Bearer fake-token-4f1c"}
    assert "fake-token-4f1c" not in output  # a secret reaches the sink, not the logs


def test_a_plugin_sink_missing_its_setting_exits_2_before_training(tmp_path, assets, webhook_site):
    cfg = tmp_path / "run.yaml"
    write_config(config(tmp_path, assets, "sft.max_steps=2"), cfg)
    result = train(cfg, user_env(webhook_site), "tracking.sinks=[webhook]")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "tracking sink 'webhook' could not start: KeyError: 'DSCHAT_WEBHOOK_URL'" in last


def test_report_compares_two_runs_with_different_learning_rates(tmp_path, assets):
    runs = []
    for name, rate in (("lr-small", "1e-4"), ("lr-large", "3e-3")):
        out, _ = run_stage(
            config(tmp_path, assets, f"run_name={name}", f"sft.learning_rate={rate}", "sft.max_steps=6"), "sft"
        )
        runs.append(out.parent)
    target = tmp_path / "compare"
    result = subprocess.run(
        [sys.executable, "-m", "dschat_core.cli", "report", *map(str, runs), "-o", str(target)],
        capture_output=True,
        text=True,
        env=user_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (target / "sft.png").stat().st_size > 10_000
    report = (target / "report.md").read_text()
    assert "# Runs compared: lr-small, lr-large" in report
    assert "| `sft.learning_rate` | 0.0001 | 0.003 |" in report
    finals = [line for line in report.splitlines() if line.startswith(("| lr-small |", "| lr-large |"))]
    assert len(finals) == 2 and "eval/perplexity" in report
    small, large = (json.loads((run / "actor" / FINISHED_MARKER).read_text()) for run in runs)
    assert small["eval/perplexity"] != large["eval/perplexity"]
