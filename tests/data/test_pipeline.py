"""Loading local data, DeepSpeed-Chat's data_split, tokenization per stage, the cache, and bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dschat_core.config import load_config
from dschat_core.data.loading import DataError, load_raw
from dschat_core.data.pipeline import load_stage_data, phase_indices
from dschat_core.models import train_tokenizer
from dschat_core.plugins import get_dataset_formats
from dschat_core.tiny_task import corpus, make_rows


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(), vocab_size=300)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prefs(tmp_path):
    folder = tmp_path / "prefs"
    write_jsonl(folder / "train.jsonl", make_rows(200, 1))
    write_jsonl(folder / "test.jsonl", make_rows(40, 2))
    return folder


def config_for(tmp_path, data_path, *overrides):
    return load_config(
        None,
        [
            f"data.data_path={data_path}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "sft.max_seq_len=64",
            "reward.max_seq_len=64",
            "ppo.max_prompt_seq_len=64",
            *overrides,
        ],
    )


def test_phase_split_is_deepspeed_chats():
    shares = (0.2, 0.4, 0.4)
    parts = [phase_indices(100, shares, k, 1234) for k in range(3)]
    assert [len(p) for p in parts] == [20, 40, 40]
    assert len(set(np.concatenate(parts))) == 100  # disjoint and complete
    order = np.arange(100)
    np.random.RandomState(1234).shuffle(order)
    assert list(parts[1]) == list(order[20:60])
    assert list(phase_indices(100, shares, 1, 1234)) == list(parts[1])  # deterministic under the seed
    assert list(phase_indices(100, shares, 1, 99)) != list(parts[1])


def test_local_folder_is_recognised_by_columns(prefs):
    raw = load_raw(str(prefs), get_dataset_formats(), seed=1)
    assert raw.fmt.name == "Dahoas/rm-static"  # from its columns; the folder is called "prefs"
    assert (len(raw.train), len(raw.eval)) == (200, 40)


def test_single_file_without_eval_split_is_cut_9_to_1(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(100)]
    )
    raw = load_raw(str(path), get_dataset_formats(), seed=1)
    assert (len(raw.train), len(raw.eval)) == (90, 10)


def test_parquet_and_save_to_disk(tmp_path, prefs):
    import datasets

    rows = make_rows(50, 3)
    (tmp_path / "pq" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[:10]).to_parquet(str(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    raw = load_raw(str(tmp_path / "pq"), get_dataset_formats(), seed=1)
    assert (len(raw.train), len(raw.eval)) == (50, 10)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "disk"))
    assert len(load_raw(str(tmp_path / "disk"), get_dataset_formats(), seed=1).train) == 45


def test_stage_data_per_stage(tmp_path, prefs, tokenizer):
    config = config_for(tmp_path, prefs)
    sft = load_stage_data(config, "sft", tokenizer, get_dataset_formats(), log=lambda _: None)
    reward = load_stage_data(config, "reward", tokenizer, get_dataset_formats(), log=lambda _: None)
    ppo = load_stage_data(config, "ppo", tokenizer, get_dataset_formats(), log=lambda _: None)
    assert (len(sft.train), len(reward.train), len(ppo.train)) == (40, 80, 80)  # 2,4,4 of 200
    row = sft.train[0]
    assert row["input_ids"][-1] == tokenizer.eos_token_id  # the same EOS ends every stage's text
    assert reward.train[0]["chosen_input_ids"][-1] == tokenizer.eos_token_id
    assert reward.train[0]["rejected_input_ids"][-1] == tokenizer.eos_token_id
    assert 0 < row["prompt_len"] < len(row["input_ids"])
    assert "prompt_input_ids" in ppo.train.column_names


def test_over_long_prompts_are_counted(tmp_path, prefs, tokenizer):
    lengths = sorted(len(tokenizer(r["prompt"])["input_ids"]) for r in make_rows(200, 1))
    config = config_for(tmp_path, prefs, f"ppo.max_prompt_seq_len={lengths[len(lengths) // 2]}")
    data = load_stage_data(config, "ppo", tokenizer, get_dataset_formats(), log=lambda _: None)
    report = data.report[str(prefs)]["train"]
    assert report.too_long == 80 - len(data.train) and report.too_long > 0


def test_cache_reloads_and_changes_with_content(tmp_path, prefs, tokenizer):
    config = config_for(tmp_path, prefs)
    first = load_stage_data(config, "reward", tokenizer, get_dataset_formats(), log=lambda _: None)
    again = load_stage_data(config, "reward", tokenizer, get_dataset_formats(), log=lambda _: None)
    assert not first.from_cache and again.from_cache and again.cache_path == first.cache_path
    assert again.train[:5] == first.train[:5]
    rows = make_rows(200, 1)
    rows[7]["chosen"] = " A different answer."
    write_jsonl(prefs / "train.jsonl", rows)
    changed = load_stage_data(config, "reward", tokenizer, get_dataset_formats(), log=lambda _: None)
    assert not changed.from_cache and changed.cache_path != first.cache_path
    other_len = config_for(tmp_path, prefs, "reward.max_seq_len=32")
    assert (
        load_stage_data(other_len, "reward", tokenizer, get_dataset_formats(), log=lambda _: None).cache_path
        != changed.cache_path
    )


def test_bad_rows_are_skipped_and_counted_or_fatal_when_strict(tmp_path, tokenizer):
    rows = make_rows(100, 4)
    rows[3]["chosen"] = ""
    rows[5]["rejected"] = rows[5]["chosen"]
    folder = tmp_path / "bad"
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", make_rows(10, 5))
    messages = []
    data = load_stage_data(
        config_for(tmp_path, folder, "data.data_split=0,1,0"),
        "reward",
        tokenizer,
        get_dataset_formats(),
        log=messages.append,
    )
    assert len(data.train) == 98
    assert any("skipped 2 malformed rows" in m for m in messages)
    with pytest.raises(DataError, match=r"train row (3: column 'chosen' is empty|5: column 'chosen' is identical)"):
        load_stage_data(
            config_for(tmp_path, folder, "data.data_split=0,1,0", "data.strict=true"),
            "reward",
            tokenizer,
            get_dataset_formats(),
            log=lambda _: None,
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot read it|empty"),
        (b"{not json\n", "cannot read it"),
        (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', "cannot read it"),
        (b'{"query": "q", "reply": "a"}\n', "match no known format"),
    ],
)
def test_unreadable_data_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_raw(str(path), get_dataset_formats(), seed=1)
    assert info.value.exit_code == 2 and str(path) in info.value.format_message()


def test_unknown_name_and_sft_only_data_in_reward(tmp_path, tokenizer):
    with pytest.raises(DataError, match="neither a local path nor a known name"):
        load_raw("nobody/nothing", get_dataset_formats(), seed=1)
    path = write_jsonl(
        tmp_path / "demos" / "train.jsonl", [{"prompt": "USER: q ASSISTANT:", "label": f"a{i}"} for i in range(20)]
    )
    with pytest.raises(DataError, match="sft_only_data_path"):
        load_stage_data(
            config_for(tmp_path, path.parent), "reward", tokenizer, get_dataset_formats(), log=lambda _: None
        )


def test_empty_split_after_filtering(tmp_path, prefs, tokenizer):
    with pytest.raises(DataError, match="no train rows left"):
        load_stage_data(
            config_for(tmp_path, prefs, "ppo.max_prompt_seq_len=2"),
            "ppo",
            tokenizer,
            get_dataset_formats(),
            log=lambda _: None,
        )


def deepspeed_chat_split_index(data_split: str, data_size: int) -> list[int]:
    """DeepSpeed-Chat's get_raw_dataset_split_index (dschat/utils/data/data_utils.py), its cut arithmetic."""
    splits = [float(s) for s in data_split.split(",")]
    splits = [split / sum(splits) for split in splits]
    splits_index = [0]
    for index, split in enumerate(splits):
        splits_index.append(splits_index[index] + int(round(split * float(data_size))))
    diff = splits_index[-1] - data_size
    for index in range(1, len(splits_index)):
        splits_index[index] -= diff
    assert splits_index[-1] == data_size
    return splits_index


@pytest.mark.parametrize("data_split", ["2,4,4", "1,1,1", "6,2,2", "0,5,5", "3,0,7", "1,2,3"])
def test_cuts_are_deepspeed_chats_for_every_size(data_split):
    import numpy as np

    from dschat_core.config import load_config

    shares = load_config(None, [f"data.data_split={data_split}"]).data.split_shares
    for size in range(1, 301):
        bounds = deepspeed_chat_split_index(data_split, size)
        order = np.arange(size, dtype=np.uint32)
        np.random.RandomState(1234).shuffle(order)
        for phase in range(3):
            expected = order[bounds[phase] : bounds[phase + 1]].tolist()
            assert phase_indices(size, shares, phase, 1234).tolist() == expected, (size, phase)
    assert [len(phase_indices(11, (0.2, 0.4, 0.4), k, 1234)) for k in range(3)] == [3, 4, 4]
