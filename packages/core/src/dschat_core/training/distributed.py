"""The process group and what every rank shares: rank/world queries, barriers, reductions, seeding, rank-0 output."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: Any
    accelerator: str


def init_distributed() -> Dist:
    """DeepSpeed's backend for this accelerator: NCCL on GPUs, gloo on CPU."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    if accel.device_name() == "cpu" and os.environ.get("DSCHAT_CPU_THREADS") == "auto":
        torch.set_num_threads(cpu_share(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device, accel.device_name())


def cpu_share(local_ranks: int) -> int:
    """This rank's share of the cores the process may run on (a cgroup or Slurm's cpuset may allow fewer than
    the machine has)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_ranks))


def local_dist() -> Dist:
    """One process, no process group: for ``dschat-core eval`` and tests that call stage code directly."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Dist(0, 0, 1, device, device.type)


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    group = _group()
    return group.get_rank() if group else 0


def barrier() -> None:
    group = _group()
    if group:
        group.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over all ranks (the values themselves without a process group)."""
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    group = _group()
    if group:
        group.all_reduce(tensor)
    return tensor.tolist()


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank."""
    group = _group()
    if not group:
        return text
    box = [text]
    group.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_min(value: int, device) -> int:
    """The smallest ``value`` of any rank, on every rank."""
    return int(_all_reduce_one(value, device, "MIN"))


def all_reduce_max(value: float, device) -> float:
    """The largest ``value`` of any rank, on every rank."""
    return _all_reduce_one(value, device, "MAX")


def _all_reduce_one(value: float, device, op: str) -> float:
    import torch

    group = _group()
    if not group:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    group.all_reduce(tensor, op=getattr(group.ReduceOp, op))
    return float(tensor.item())


def first_message(text: str) -> str:
    """The first non-empty ``text`` of any rank (by rank), on every rank: a problem one rank found, for all."""
    group = _group()
    if not group:
        return text
    texts: list[str] = [""] * group.get_world_size()
    group.all_gather_object(texts, text)
    return next((t for t in texts if t), "")


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is true on any."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def info(text: str) -> None:
    if rank() == 0:
        print(text, flush=True)


def warn(text: str) -> None:
    if rank() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)
