"""Which checkpoint a run resumes from when some are damaged: the one `latest` names, else the newest usable one,
each one passed over named; a truncated torch file is found without reading the weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dschat_core.training.checkpoints import Checkpointer, checkpoints_dir, unusable


def make_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"step-{step}"
    (folder / "actor").mkdir(parents=True)
    torch.save({"weights": torch.arange(4096.0)}, folder / "actor" / "mp_rank_00_model_states.pt")
    torch.save({"python": None}, folder / "rng-rank0.pt")
    (folder / "state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_the_named_checkpoint_is_chosen_when_it_is_whole(tmp_path):
    checkpointer = Checkpointer(str(tmp_path / "runs" / "x" / "actor"), keep_last=2)
    root = checkpoints_dir(str(tmp_path / "runs" / "x" / "actor"))
    make_checkpoint(root, 4)
    eight = make_checkpoint(root, 8)
    (root / "latest").write_text("step-8")
    assert checkpointer.choose() == (eight, [])


def test_a_truncated_shard_falls_back_to_the_previous_checkpoint_naming_the_file(tmp_path):
    output = str(tmp_path / "runs" / "x" / "actor")
    root = checkpoints_dir(output)
    four = make_checkpoint(root, 4)
    eight = make_checkpoint(root, 8)
    (root / "latest").write_text("step-8")
    shard = eight / "actor" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    path, notes = Checkpointer(output, keep_last=2).choose()
    assert path == four
    assert len(notes) == 1 and "actor/mp_rank_00_model_states.pt is damaged or cut short" in notes[0]
    assert unusable(four) == ""


def test_latest_naming_nothing_or_outside_is_said(tmp_path):
    output = str(tmp_path / "runs" / "x" / "actor")
    root = checkpoints_dir(output)
    root.mkdir(parents=True)
    for named in ("step-99", "../../../etc"):
        (root / "latest").write_text(named)
        path, notes = Checkpointer(output, keep_last=2).choose()
        assert path is None and notes == [f"{root / 'latest'} names {named!r}, which is no checkpoint there"]
    four = make_checkpoint(root, 4)
    assert Checkpointer(output, keep_last=2).choose()[0] == four  # the pointer is wrong, a checkpoint is there


def test_a_checkpoint_without_its_state_is_not_used(tmp_path):
    output = str(tmp_path / "runs" / "x" / "actor")
    root = checkpoints_dir(output)
    (make_checkpoint(root, 4) / "state.json").write_text("{half")
    path, notes = Checkpointer(output, keep_last=2).choose()
    assert path is None and "state.json is damaged" in notes[0]


def test_a_setting_added_since_the_checkpoint_differs_only_off_its_default():
    from dschat_core.config import RunConfig, load_config
    from dschat_core.training.run import run_signature, signature_differences

    defaults = run_signature(RunConfig(), "sft")
    now = run_signature(load_config(None, ["sft.learning_rate=0.01"]), "sft")
    older = {k: v for k, v in now.items() if k != "sft.dropout"}  # written before sft.dropout existed
    assert signature_differences(now, older, defaults) == []
    moved = run_signature(load_config(None, ["sft.learning_rate=0.01", "sft.dropout=0.2"]), "sft")
    assert signature_differences(moved, older, defaults) == ["sft.dropout"]
    assert signature_differences(now, {**older, "sft.learning_rate": 0.02}, defaults) == ["sft.learning_rate"]
    # bounds on how long a run may go without learning are not what a checkpoint is valid for
    assert not {"sft.max_skipped_in_a_row", "sft.on_nonfinite"} & set(now)
