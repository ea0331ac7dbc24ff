"""DeepSpeed from the run config: distributed init, the DeepSpeed config, LoRA, optimizer and schedule."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight", "ln_1.weight", "ln_2.weight")


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
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device, accel.device_name())


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ds_config(
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    zero_stage: int,
    dtype: str,
    offload: bool = False,
    train: bool = True,
) -> dict[str, Any]:
    """DeepSpeed-Chat's train/eval configs (dschat/utils/ds_utils.py), built in code."""
    device = "cpu" if offload else "none"
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "offload_param": {"device": device},
        "stage3_param_persistence_threshold": 1e4,
        "memory_efficient_linear": False,
    }
    if train:
        zero.update(
            {
                "offload_optimizer": {"device": device},
                "overlap_comm": zero_stage > 0,
                "stage3_max_live_parameters": 3e7,
                "stage3_prefetch_bucket_size": 3e7,
            }
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "steps_per_print": 10**9,  # progress is ours (training/metrics.py)
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }
    if dtype == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale_window": 100} if train else {"enabled": True}
    elif dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def apply_lora(
    model, lora_dim: int, module_name: str, only_optimize_lora: bool, always_trainable: tuple[str, ...] = ()
):
    """peft LoRA on every linear whose qualified name contains ``module_name`` (DeepSpeed-Chat's rule), scaling
    1/r as DeepSpeed-Chat. Without ``only_optimize_lora`` everything but the adapted base weights still trains."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = [
        name for name, module in model.named_modules() if module_name in name and isinstance(module, torch.nn.Linear)
    ]
    if not targets:
        raise ValueError(f"lora_module_name {module_name!r} matches no linear layer of this model")
    peft_model = get_peft_model(
        model, LoraConfig(r=lora_dim, lora_alpha=1, lora_dropout=0.0, target_modules=targets, bias="none")
    )
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.requires_grad = True
        elif ".base_layer." in name:
            param.requires_grad = False
        else:
            param.requires_grad = (not only_optimize_lora) or any(key in name for key in always_trainable)
    return peft_model


def param_groups(model, weight_decay: float, lora_lr: float) -> list[dict[str, Any]]:
    """Decay, LoRA (own learning rate) and no-decay groups; empty groups dropped."""
    decay, lora, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name:
            lora.append(param)
        elif any(key in name for key in NO_DECAY):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": lora, "weight_decay": weight_decay, "lr": lora_lr},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups, lr: float, offload: bool, accelerator: str):
    """DeepSpeed's CPU Adam under offload, its fused Adam on GPUs, torch's AdamW on CPU."""
    betas = (0.9, 0.95)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas)
    if accelerator == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, lr=lr, betas=betas)
        except Exception:  # the op did not build here: torch's is correct, only slower
            pass
    import torch

    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        base[key] = _merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
    return base


def make_engine(
    model,
    *,
    lr: float,
    weight_decay: float,
    lora_lr: float,
    scheduler_type: str,
    warmup: int,
    total_steps: int,
    micro_batch: int,
    grad_accum: int,
    zero_stage: int,
    dtype: str,
    offload: bool,
    dist: Dist,
    extra_config: dict[str, Any] | None = None,
):
    """A training engine: optimizer, schedule and DeepSpeed config; ``extra_config`` is merged into the latter
    (stage 3's ``hybrid_engine`` section)."""
    import deepspeed
    from transformers import get_scheduler

    optimizer = make_optimizer(param_groups(model, weight_decay, lora_lr), lr, offload, dist.accelerator)
    scheduler = get_scheduler(scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    config = ds_config(
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        world_size=dist.world_size,
        zero_stage=zero_stage,
        dtype=dtype,
        offload=offload,
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=_merge(config, extra_config or {})
    )
    return engine


def make_eval_engine(model, *, micro_batch: int, zero_stage: int, dtype: str, offload: bool, dist: Dist):
    """A frozen model under DeepSpeed (stage 3's reference, reward and EMA models): no optimizer, eval mode."""
    import deepspeed

    for param in model.parameters():
        param.requires_grad = False
    config = ds_config(
        micro_batch=micro_batch,
        grad_accum=1,
        world_size=dist.world_size,
        zero_stage=zero_stage,
        dtype=dtype,
        offload=offload,
        train=False,
    )
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
