"""Padding helpers shared by the stages' collators."""

from __future__ import annotations


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


def all_reduce_sum(values: list[float], device):
    """Sum a few floats over all ranks."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()
