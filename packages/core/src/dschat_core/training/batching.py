"""Batches: padding, distributed loaders, moving to the device."""

from __future__ import annotations

from typing import Any


def pad_right(sequences: list[list[int]], pad_id: int):
    """Right-pad to the longest sequence: (input_ids, attention_mask) as long tensors."""
    import torch

    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def pack_rows(sequences: list[list[int]], labels: list[list[int]], width: int, pad_id: int, ignore: int = -100):
    """Padding-free rows: the sequences packed first-fit (longest first) into as few rows of at most ``width``
    tokens as hold them, each sequence with its own position ids from 0 (how transformers tells packed sequences
    apart without an attention mask). Each sequence's first label is ``ignore``, so that no token is predicted from
    the sequence before it; the tail of a row is padding with ``ignore`` labels, after every real token. Returns
    {input_ids, position_ids, labels, token_mask} [R, W], W the fullest row's length."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        size = len(sequences[i])
        slot = next((b for b, free in enumerate(room) if free >= size), None)
        if slot is None:
            bins.append([])
            room.append(max(width, size))
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= size
    length = max(sum(len(sequences[i]) for i in members) for members in bins)
    ids = torch.full((len(bins), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(bins), length), dtype=torch.long)
    target = torch.full((len(bins), length), ignore, dtype=torch.long)
    real = torch.zeros((len(bins), length), dtype=torch.long)
    for row, members in enumerate(sorted(bins)):  # rows in the sequences' order: deterministic, easy to read
        start = 0
        for i in members:
            size = len(sequences[i])
            ids[row, start : start + size] = torch.tensor(sequences[i])
            positions[row, start : start + size] = torch.arange(size)
            target[row, start + 1 : start + size] = torch.tensor(labels[i][1:])
            real[row, start : start + size] = 1
            start += size
        # the tail continues the last sequence's positions: padding after it, which nothing real attends to
        last = int(positions[row, start - 1])
        positions[row, start:] = torch.arange(last + 1, last + 1 + length - start)
    return {"input_ids": ids, "position_ids": positions, "labels": target, "token_mask": real}


def left_pad(prompts: list[list[int]], pad_id: int):
    """Left-padded prompt batch (DeepSpeed-Chat's PPO collator), padded to the batch's longest prompt."""
    import torch

    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt) :] = 1
    return ids, mask


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def row_lengths(dataset) -> list[int]:
    """Each row's longest token sequence (the columns named ``*input_ids``): what its padded width will be."""
    columns = [c for c in dataset.column_names if c.endswith("input_ids")]
    if not columns:
        raise ValueError(f"no *input_ids column to group by length among {dataset.column_names}")
    per_column = [[len(ids) for ids in dataset[c]] for c in columns]
    return [max(lengths) for lengths in zip(*per_column, strict=True)]


class LengthGroupedSampler:
    """A distributed sampler whose micro-batches hold rows of similar length, so that they pad to short widths.

    Each epoch: transformers' ``get_length_grouped_indices`` over the global batch (``batch_size`` × ranks), from a
    generator seeded by seed + epoch (a permutation grouped in mega-batches and sorted by length within them, the
    longest batch first); every global batch is dealt to the ranks in contiguous runs, so each rank's micro-batch
    is one length band. Padded to a multiple of the ranks by repeating rows, as ``DistributedSampler``; the same
    number of batches per rank, and the same order on a resumed run."""

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, rank: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.world_size, self.rank = world_size, rank
        self.epoch = 0
        self.per_rank = -(-len(lengths) // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size * self.world_size, generator=generator)
        order += order[: self.per_rank * self.world_size - len(order)]
        step = self.batch_size * self.world_size
        mine: list[int] = []
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            share = -(-len(chunk) // self.world_size)
            mine += chunk[self.rank * share : (self.rank + 1) * share]
        return iter(mine)


def make_loader(
    dataset,
    batch_size: int,
    collate,
    dist,
    seed: int,
    shuffle: bool = True,
    lengths: list[int] | None = None,
):
    """A distributed training loader whose worker seed comes from its own generator: iterating it must not draw
    from the global RNG, or a resumed run would sample differently from an uninterrupted one. With ``lengths``,
    micro-batches group rows of similar length (:class:`LengthGroupedSampler`)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    sampler: Any
    if lengths is not None:
        sampler = LengthGroupedSampler(lengths, batch_size, dist.world_size, dist.rank, seed)
    else:
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_batches(dataset, batch_size: int, collate, dist):
    """Every row of ``dataset`` exactly once over all ranks (rank r takes rows r, r + W, …), with a ``weight``
    tensor per batch: 1 for a real row, 0 for the copies that pad the last batches so that every rank runs the
    same number of forward passes (ZeRO-3 gathers parameters collectively). Sums weighted this way and reduced over
    ranks equal one process's; ``DistributedSampler``, which pads with repeated rows, would count some twice."""
    import math

    import torch

    mine = list(range(dist.rank, len(dataset), dist.world_size))
    per_rank = math.ceil(len(dataset) / dist.world_size)
    padded = [(i, 1.0) for i in mine] + [(0, 0.0)] * (per_rank - len(mine))
    for start in range(0, len(padded), batch_size):
        chunk = padded[start : start + batch_size]
        batch = collate([dataset[i] for i, _ in chunk])
        batch["weight"] = torch.tensor([w for _, w in chunk])
        yield batch
