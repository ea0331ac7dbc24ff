"""Length-grouped micro-batches (``group_by_length``): every row once per epoch over all ranks, the same number
of batches per rank as ``DistributedSampler``, deterministic under the seed and the epoch, and less padding."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from datasets import Dataset
from torch.utils.data import DistributedSampler

from dschat_core.training.batching import LengthGroupedSampler, make_loader, row_lengths


def lengths_of(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(8, 512) for _ in range(count)]


@pytest.mark.parametrize("count", [1000, 997, 33])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_over_all_ranks(count, world):
    lengths = lengths_of(count)
    samplers = [LengthGroupedSampler(lengths, 8, world, rank, seed=7) for rank in range(world)]
    drawn = [list(s) for s in samplers]
    reference = DistributedSampler(range(count), num_replicas=world, rank=0)
    assert all(len(d) == len(s) == len(reference) for d, s in zip(drawn, samplers, strict=True))
    together = [i for d in drawn for i in d]
    assert set(together) == set(range(count))
    assert len(together) - count < world  # padded by repeating fewer rows than ranks, as DistributedSampler


def test_deterministic_under_the_seed_and_new_each_epoch():
    lengths = lengths_of(400)
    first = LengthGroupedSampler(lengths, 8, 2, 1, seed=3)
    again = LengthGroupedSampler(lengths, 8, 2, 1, seed=3)
    assert list(first) == list(again)
    first.set_epoch(1)
    assert list(first) != list(again)
    again.set_epoch(1)
    assert list(first) == list(again)
    assert list(LengthGroupedSampler(lengths, 8, 2, 1, seed=4)) != list(LengthGroupedSampler(lengths, 8, 2, 1, seed=3))


def padded_tokens(order: list[int], lengths: list[int], batch: int) -> int:
    return sum(batch * max(lengths[i] for i in order[s : s + batch]) for s in range(0, len(order), batch))


def test_micro_batches_pad_far_less_than_shuffled_ones():
    lengths = lengths_of(2000)
    real = sum(lengths)
    for rank in range(2):
        grouped = list(LengthGroupedSampler(lengths, 16, 2, rank, seed=0))
        shuffled = list(DistributedSampler(range(2000), num_replicas=2, rank=rank, seed=0))
        mine = sum(lengths[i] for i in grouped)
        assert padded_tokens(grouped, lengths, 16) < 1.1 * mine  # near no padding
        assert padded_tokens(shuffled, lengths, 16) > 1.5 * sum(lengths[i] for i in shuffled)
        assert mine < real


def test_row_lengths_take_the_longest_token_column():
    rows = Dataset.from_dict(
        {"chosen_input_ids": [[1, 2, 3], [1]], "rejected_input_ids": [[1], [1, 2]], "prompt": ["a", "b"]}
    )
    assert row_lengths(rows) == [3, 2]
    with pytest.raises(ValueError, match="input_ids"):
        row_lengths(Dataset.from_dict({"text": ["a"]}))


def test_the_loader_groups_when_given_lengths():
    lengths = lengths_of(640)
    rows = Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    dist = SimpleNamespace(world_size=2, rank=0)
    loader = make_loader(rows, 8, lambda batch: [len(r["input_ids"]) for r in batch], dist, seed=0, lengths=lengths)
    assert isinstance(loader.sampler, LengthGroupedSampler)
    spreads = [max(b) - min(b) for b in loader]
    assert len(spreads) == 40 and sum(spreads) / len(spreads) < 100  # shuffled: ~400 of the 8..512 range
