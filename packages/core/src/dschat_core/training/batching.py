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


def make_loader(dataset, batch_size: int, collate, dist, seed: int, shuffle: bool = True):
    """A distributed training loader whose worker seed comes from its own generator: iterating it must not draw
    from the global RNG, or a resumed run would sample differently from an uninterrupted one."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    sampler: DistributedSampler = DistributedSampler(
        dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle, seed=seed
    )
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
