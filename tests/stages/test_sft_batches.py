"""Stage 1's batch construction, as docs/training.md documents it against DeepSpeed-Chat's (issue 31, measured by
`python -m benchmarks sft-gap`): rows padded to the batch's longest, not to max_seq_len, and padding out of the loss."""

from __future__ import annotations

from types import SimpleNamespace

from dschat_core.config import load_config
from dschat_core.stages.sft import IGNORE_INDEX, SFTStage


def test_padding_is_out_of_the_loss_and_rows_are_padded_to_the_longest_only():
    stage = SFTStage(load_config(None, ["sft.loss_on=all", "sft.max_seq_len=128"]))
    stage.tokenizer = SimpleNamespace(pad_token_id=1)
    batch = stage.collate([{"input_ids": [5, 6, 7, 2], "prompt_len": 2}, {"input_ids": [8, 2], "prompt_len": 1}])
    assert batch["input_ids"].shape == (2, 4)  # the batch's longest row, not 128
    assert batch["labels"].tolist() == [[5, 6, 7, 2], [8, 2, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
