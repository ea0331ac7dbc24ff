"""Stage ``preflight``: prove that every rank can talk to every other before spending GPU hours.

Initialises DeepSpeed's distributed backend (NCCL on GPUs, gloo on CPU), all-reduces a tensor across all
ranks and checks the sum, then rank 0 reports world size, ranks, accelerator, devices, library versions and
free memory per rank.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

GIB = 1024**3
LIBRARIES = ("torch", "deepspeed", "transformers", "datasets", "peft", "dschat-core")


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def rank_report(local_rank: int) -> dict[str, Any]:
    """What this rank sees: host, accelerator, device and free memory."""
    import psutil
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    report: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "local_rank": local_rank,
        "accelerator": accel.device_name(),
        "devices_visible": accel.device_count() if accel.device_name() != "cpu" else 0,
        "host_free_gib": round(psutil.virtual_memory().available / GIB, 1),
    }
    if accel.device_name() == "cuda":
        free, total = torch.cuda.mem_get_info(local_rank)
        report["device"] = f"cuda:{local_rank} {torch.cuda.get_device_name(local_rank)}"
        report["device_free_gib"] = round(free / GIB, 1)
        report["device_total_gib"] = round(total / GIB, 1)
    else:
        report["device"] = "cpu"
    return report


def run(config: object = None) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")

    value = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(value)
    expected = world_size * (world_size + 1) / 2
    ok = abs(value.item() - expected) < 1e-6

    reports: list[dict[str, Any] | None] = [None] * world_size
    dist.all_gather_object(reports, {"rank": rank, "all_reduce_ok": ok, **rank_report(local_rank)})
    failed = [r["rank"] for r in reports if r and not r["all_reduce_ok"]]
    if rank == 0:
        lines = [
            "preflight report",
            f"world_size: {world_size}",
            f"backend: {dist.get_backend()}",
            f"all_reduce: {'ok' if not failed else 'FAILED'} (sum {value.item():g}, expected {expected:g})",
        ]
        for r in reports:
            assert r is not None
            mem = f"host free {r['host_free_gib']} GiB"
            if "device_free_gib" in r:
                mem += f", device free {r['device_free_gib']}/{r['device_total_gib']} GiB"
            lines.append(
                f"rank {r['rank']}: host {r['host']} local_rank {r['local_rank']} "
                f"accelerator {r['accelerator']} device {r['device']} ({mem})"
            )
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()))
        print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if failed:
        print(f"error: all_reduce gave a wrong sum on ranks {failed}", file=sys.stderr, flush=True)
        return 1
    return 0
