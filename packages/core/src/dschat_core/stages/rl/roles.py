"""The engines of stage 3 as specs, only those the settings need: the actor (trained), the reference
(``kl_ctl`` > 0), the EMA actor (``enable_ema``), the critic (trained, PPO only) and the reward model
(``reward_model_weight`` > 0)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ...config import PPO
from ...training.engine import EngineSpec


def total_update_steps(section: PPO, prompt_batches: int) -> int:
    """Optimizer steps for the schedules: DeepSpeed-Chat's formula (answers per prompt batch included)."""
    answers = section.per_device_generation_batch_size * section.n_samples_per_prompt
    micro_per_batch = math.ceil(answers / section.per_device_training_batch_size)
    micro = section.num_train_epochs * prompt_batches * micro_per_batch * section.ppo_epochs
    return max(1, micro // section.gradient_accumulation_steps)


def role_specs(section: PPO, total_steps: int, ptx: bool) -> dict[str, EngineSpec]:
    """The engines of stage 3 as specs. The frozen copies follow their trained twin into ZeRO 3 (as
    DeepSpeed-Chat), else stay at ZeRO 0."""
    micro = section.per_device_training_batch_size
    frozen_zero = section.actor_zero_stage if section.actor_zero_stage == 3 else 0
    reward_zero = section.critic_zero_stage if section.critic_zero_stage == 3 else 0
    hybrid: dict[str, Any] = {}
    if section.enable_hybrid_engine:
        hybrid = {
            "hybrid_engine": {
                "enabled": True,
                "max_out_tokens": section.max_prompt_seq_len + section.max_answer_seq_len,
                "inference_tp_size": section.inference_tp_size,
                "release_inference_cache": section.release_inference_cache,
                "pin_parameters": not section.unpin_actor_parameters,
                "tp_gather_partition_size": section.tp_gather_partition_size,
            }
        }
    if section.enable_mixed_precision_lora:  # MixZ++: quantized frozen base weights under ZeRO-3
        hybrid["zero_optimization"] = {"zero_quantized_nontrainable_weights": True}
    actor = EngineSpec(
        zero_stage=section.actor_zero_stage,
        dtype=section.dtype,
        offload=section.offload,
        learning_rate=section.actor_learning_rate,
        weight_decay=section.actor_weight_decay,
        scheduler_type=section.lr_scheduler_type,
        warmup=section.num_warmup_steps,
        total_steps=total_steps,
        micro_batch=micro,
        # With PTX each micro-batch backpropagates twice before one optimizer update (DeepSpeed-Chat).
        grad_accum=section.gradient_accumulation_steps * (2 if ptx else 1),
        lora_dim=section.actor_lora_dim,
        lora_module_name=section.actor_lora_module_name,
        lora_learning_rate=section.actor_lora_learning_rate,
        only_optimize_lora=section.only_optimize_lora,
        # Gradient checkpointing is switched on for updates only: generation runs without it.
        compile=section.compile,
        extra_config=hybrid,
    )
    reference = EngineSpec(
        zero_stage=frozen_zero,
        dtype=section.dtype,
        offload=section.offload_reference_model,
        train=False,
        micro_batch=micro,
    )
    critic = replace(
        actor,
        zero_stage=section.critic_zero_stage,
        learning_rate=section.critic_learning_rate,
        weight_decay=section.critic_weight_decay,
        grad_accum=section.gradient_accumulation_steps,
        lora_dim=section.critic_lora_dim,
        lora_module_name=section.critic_lora_module_name,
        lora_learning_rate=section.critic_lora_learning_rate,
        always_trainable=("score",),  # the value head trains even with only_optimize_lora
        gradient_checkpointing=section.critic_gradient_checkpointing,
        extra_config={},
    )
    return {
        "actor": actor,
        "reference": reference,
        # The same adapters as the actor, so that parameters line up one to one.
        "ema": replace(
            reference,
            lora_dim=actor.lora_dim,
            lora_module_name=actor.lora_module_name,
            only_optimize_lora=actor.only_optimize_lora,
        ),
        "critic": critic,
        "reward": replace(reference, zero_stage=reward_zero, offload=section.offload_reward_model),
    }
