"""Downloads, import and inspect, against a local server in the hub's URL layout (nothing leaves the machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dschat_core.data.loading import load_raw
from dschat_core.models import init_tiny
from dschat_core.plugins import get_dataset_formats
from dschat_core.tiny_task import make_rows

from .hub_server import Hub, serve


def parquet_bytes(rows, tmp_path, name):
    import datasets

    path = tmp_path / name
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path.read_bytes()


@pytest.fixture
def hub(tmp_path):
    # Wide enough that the weights exceed two of huggingface_hub's 10 MiB read chunks: a connection dropped half
    # way has delivered one, and the retry asks for the rest with a Range request.
    model = init_tiny("opt", tmp_path / "src-model", hidden=512)
    model_files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    model_files.update(
        {
            "pytorch_model.bin": b"not wanted: safetensors exist",
            "flax_model.msgpack": b"no",
            "tf_model.h5": b"no",
            "onnx/model.onnx": b"no",
        }
    )
    data = {
        "data/train-00000-of-00001.parquet": parquet_bytes(make_rows(300, 1), tmp_path, "train.parquet"),
        "data/test-00000-of-00001.parquet": parquet_bytes(make_rows(40, 2), tmp_path, "test.parquet"),
        "dataset_infos.json": b"{}",
        "README.md": b"# rm-static",
    }
    state = Hub(
        {("model", "facebook/opt-tiny"): model_files, ("dataset", "Dahoas/rm-static"): data},
        drop_once={"model.safetensors", "data/train-00000-of-00001.parquet"},
    )
    server = serve(state)
    yield state
    server.shutdown()


def cli(hub, tmp_path, *args):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DSCHAT_PLUGINS": "",
        "HF_HUB_DISABLE_XET": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", "from dschat_core.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_model_download_takes_only_what_training_needs_and_resumes(hub, tmp_path):
    out = tmp_path / "models" / "opt-tiny"
    result = cli(hub, tmp_path, "model", "download", "facebook/opt-tiny", "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not {"pytorch_model.bin", "flax_model.msgpack", "tf_model.h5", "onnx"} & set(names)
    assert (out / "model.safetensors").read_bytes() == hub.repos[("model", "facebook/opt-tiny")]["model.safetensors"]
    assert any(r[2] and "safetensors" in r[1] for r in hub.requests)  # the dropped file resumed with a Range
    assert json.loads((out / "dschat-model.json").read_text())["source"] == "facebook/opt-tiny"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_dataset_download_reads_offline_like_the_original(hub, tmp_path):
    out = tmp_path / "datasets" / "Dahoas_rm_static"
    result = cli(hub, tmp_path, "data", "download", "Dahoas/rm-static", "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "300 train / 40 eval rows" in result.stdout
    train_gets = [r for r in hub.requests if r[0] == "GET" and "train-00000" in r[1]]
    assert len(train_gets) == 2  # the first connection dropped half way; the download went on
    meta = json.loads((out / "dschat-dataset.json").read_text())
    assert meta["format"] == "Dahoas/rm-static" and meta["source"] == "Dahoas/rm-static"
    raw = load_raw(str(out), get_dataset_formats(), 1234)
    assert raw.train[0] == make_rows(300, 1)[0]


def test_unknown_repository_is_a_clear_error(hub, tmp_path):
    result = cli(hub, tmp_path, "model", "download", "nobody/nothing", "-o", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "model nobody/nothing: not found" in result.stderr and "HF_ENDPOINT" in result.stderr


@pytest.mark.parametrize("command", ["model", "data"])
def test_without_network_a_download_exits_2_naming_the_mirror_and_the_import(hub, tmp_path, command):
    """No hub to reach (a closed port stands for a machine without network): one line, exit 2, the fixes."""

    class Offline:
        url = "http://127.0.0.1:9"

    result = cli(
        Offline, tmp_path, command, "download", "facebook/opt-tiny", "-o", str(tmp_path / "x"), "--attempts", "1"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot reach http://127.0.0.1:9" in lines[0] and "HF_ENDPOINT" in lines[0]
    assert "dschat-core data import FOLDER -o OUT" in lines[0]


def seed_manual_download(tmp_path) -> Path:
    """What the seed's users fetch by hand with wget."""
    folder = tmp_path / "manual" / "rm-static"
    (folder / "data").mkdir(parents=True)
    (folder / "dataset_infos.json").write_text("{}")
    train = parquet_bytes(make_rows(200, 3), tmp_path, "t.parquet")
    (folder / "data" / "train-00000-of-00001-2a1df75c6bce91ab.parquet").write_bytes(train)
    test = parquet_bytes(make_rows(30, 4), tmp_path, "e.parquet")
    (folder / "data" / "test-00000-of-00001-8c7c51afc6d45980.parquet").write_bytes(test)
    return folder


def test_import_then_inspect_a_manual_download(hub, tmp_path):
    source = seed_manual_download(tmp_path)
    out = tmp_path / "datasets" / "imported"
    result = cli(hub, tmp_path, "data", "import", str(source), "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "format Dahoas/rm-static, 200 train / 30 eval rows" in result.stdout
    formats = get_dataset_formats()
    direct, imported = load_raw(str(source), formats, 1234), load_raw(str(out), formats, 1234)
    assert direct.train.to_list() == imported.train.to_list() and direct.eval.to_list() == imported.eval.to_list()

    model = init_tiny("opt", tmp_path / "tok")
    result = cli(
        hub,
        tmp_path,
        "data",
        "inspect",
        str(out),
        "--tokenizer",
        str(model),
        "--set",
        "data.data_split=2,4,4",
        "--set",
        "ppo.max_prompt_seq_len=10",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    assert "rows: train 200, eval 30; data_split 2,4,4" in report
    assert "sft train: 40 rows" in report and "reward train: 80 rows" in report and "ppo train: 80 rows" in report
    assert "tokens p50" in report and "prompts over max_prompt_seq_len 10 (dropped)" in report


def test_inspect_fails_on_bad_data_as_training_does(hub, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    rows = make_rows(20, 5)
    rows[3]["chosen"] = None
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli(hub, tmp_path, "data", "inspect", str(folder), "--set", "data.strict=true")
    assert result.returncode == 2
    # The 9:1 split put the bad row first in the eval split; the message names the dataset, row and column.
    assert f"dataset {folder}, eval row 0: column 'chosen' is None; fix:" in result.stderr
    lenient = cli(hub, tmp_path, "data", "inspect", str(folder))
    assert lenient.returncode == 0 and "malformed skipped" in lenient.stdout
