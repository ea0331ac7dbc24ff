"""Models become DeepSpeed engines in one place: an :class:`EngineSpec` (built from a stage section or a stage-3
role) says how, and :func:`build_engine` applies gradient checkpointing, LoRA (peft), ZeRO, offload, dtype, the
optimizer and the schedule."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .distributed import Dist

NO_DECAY = (
    "bias",
    "layer_norm.weight",
    "layernorm.weight",
    "norm.weight",
    "ln_f.weight",
    "ln_1.weight",
    "ln_2.weight",
)


@dataclass(frozen=True)
class EngineSpec:
    """How one model is wrapped: frozen (``train`` False: no optimizer, eval mode) or trained."""

    zero_stage: int
    dtype: str
    offload: bool = False
    train: bool = True
    learning_rate: float = 0.0
    weight_decay: float = 0.0
    scheduler_type: str = "cosine"
    warmup: int = 0
    total_steps: int = 1
    micro_batch: int = 1
    grad_accum: int = 1
    lora_dim: int = 0
    lora_module_name: str = ""
    lora_learning_rate: float = 0.0
    only_optimize_lora: bool = False
    always_trainable: tuple[str, ...] = ()
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the trained model (its forward, so also generate's decode steps)
    extra_config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lora_scaling(self) -> float | None:
        """DeepSpeed-Chat's LoRA scaling (1/r), for merging at the final save; None without LoRA."""
        return 1.0 / self.lora_dim if self.lora_dim else None


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
        "steps_per_print": 10**9,  # progress is ours (training/run.py)
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


#: DeepSpeed-Chat's default ``lora_module_name`` (OPT's blocks); on other architectures it means their blocks.
DEFAULT_LORA_MODULES = "decoder.layers."
BLOCK_PREFIXES = ("decoder.layers.", "layers.", "h.", "blocks.")


def lora_targets(model, module_name: str) -> list[str]:
    """The linear layers LoRA goes on: every one whose qualified name contains ``module_name`` (DeepSpeed-Chat's
    rule). The default, OPT's ``decoder.layers.``, follows the architecture: Llama's and Qwen's blocks are
    ``layers.``, GPT-2's ``h.``."""
    import torch

    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    candidates = BLOCK_PREFIXES if module_name == DEFAULT_LORA_MODULES else (module_name,)
    for prefix in candidates:
        found = [name for name in linears if prefix in name]
        if found:
            return found
    return []


def apply_lora(
    model, lora_dim: int, module_name: str, only_optimize_lora: bool, always_trainable: tuple[str, ...] = ()
):
    """peft LoRA on :func:`lora_targets`, scaling 1/r as DeepSpeed-Chat. Without ``only_optimize_lora`` everything
    but the adapted base weights still trains."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, module_name)
    if not targets:
        raise ValueError(f"lora_module_name {module_name!r} matches no linear layer of this model")
    config = LoraConfig(r=lora_dim, lora_alpha=1, lora_dropout=0.0, target_modules=targets, bias="none")
    peft_model = get_peft_model(model, config)
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


def say_if_building(op_name: str, what: str) -> None:
    """DeepSpeed compiles an op the first time an environment uses it, for a minute or more and silently unless
    installed prebuilt: rank 0 says so. Built ops are kept in TORCH_EXTENSIONS_DIR, a folder per op (its builder's
    NAME), which the worker keeps per environment."""
    from deepspeed.git_version_info import installed_ops

    folder = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR", ""), op_name)
    built = os.path.isdir(folder) and any(name.endswith(".so") for name in os.listdir(folder))
    if not (built or installed_ops.get(op_name)) and os.environ.get("RANK", "0") == "0":
        print(
            f"dschat: building DeepSpeed's {what} for this environment (once, about a minute; kept in {folder})",
            flush=True,
        )


def make_optimizer(groups, lr: float, offload: bool, accelerator: str):
    """DeepSpeed's CPU Adam under offload, its fused Adam on GPUs, torch's AdamW on CPU."""
    betas = (0.9, 0.95)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        say_if_building(CPUAdamBuilder.NAME, "CPU Adam op")
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas)
    if accelerator == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, lr=lr, betas=betas)
        except Exception:  # the op did not build here: torch's is correct, only slower
            pass
    import torch

    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        base[key] = _merge(dict(base.get(key, {})), value) if isinstance(value, Mapping) else value
    return base


def prepare_model(model, spec: EngineSpec):
    """Gradient checkpointing and LoRA as the spec says; returns the model to wrap (a peft model with LoRA)."""
    if spec.train and spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if spec.lora_dim:
        model = apply_lora(model, spec.lora_dim, spec.lora_module_name, spec.only_optimize_lora, spec.always_trainable)
        if spec.train and spec.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def build_engine(model, spec: EngineSpec, dist: Dist):
    """The DeepSpeed engine for ``model`` as ``spec`` says. A trained engine gets decay/LoRA/no-decay parameter
    groups, the optimizer and transformers' schedule; a frozen one no optimizer, and eval mode."""
    import deepspeed

    model = prepare_model(model, spec)
    config = ds_config(
        micro_batch=spec.micro_batch,
        grad_accum=spec.grad_accum if spec.train else 1,
        world_size=dist.world_size,
        zero_stage=spec.zero_stage,
        dtype=spec.dtype,
        offload=spec.offload,
        train=spec.train,
    )
    if not spec.train:
        for param in model.parameters():
            param.requires_grad = False
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    from transformers import get_scheduler

    groups = param_groups(model, spec.weight_decay, spec.lora_learning_rate)
    optimizer = make_optimizer(groups, spec.learning_rate, spec.offload, dist.accelerator)
    scheduler = get_scheduler(
        spec.scheduler_type, optimizer, num_warmup_steps=spec.warmup, num_training_steps=spec.total_steps
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=_merge(config, spec.extra_config)
    )
    if spec.compile:
        # Padded widths change from batch to batch: dynamic shapes from the start, not a recompile per width.
        engine.compile(compile_kwargs={"dynamic": True})
    return engine
