"""What can be known of a stage's models before anything is launched, where their folders are on this machine:
the sequence lengths fit the model's positions, and LoRA's ``lora_module_name`` names some of its linear layers.

Only the config is read, and LoRA's check builds the model on the ``meta`` device (no weights, no memory); a hub
id or a folder only the cluster sees is left to the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import ConfigError

#: The config keys that bound a model's sequence length, by architecture family.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _local_config(path: str | None, trust: bool) -> Any | None:
    if not path or not (Path(path).expanduser() / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(Path(path).expanduser()), trust_remote_code=trust, local_files_only=True)
    except Exception:  # an unreadable config: the worker will say exactly what is wrong
        return None


def positions(model_config: Any) -> int | None:
    for key in POSITION_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _lengths(config: RunConfig, stage: str) -> list[tuple[str, int]]:
    """(key, tokens) a stage puts through the model at most."""
    if stage == "ppo":
        section = config.ppo
        total = section.max_prompt_seq_len + section.max_answer_seq_len
        return [("ppo.max_prompt_seq_len + ppo.max_answer_seq_len", total)]
    return [(f"{stage}.max_seq_len", config.stage(stage).max_seq_len)]  # type: ignore[attr-defined]


def _lora(config: RunConfig, stage: str) -> list[tuple[str, int, str]]:
    """(key, rank, module name) of each LoRA a stage applies."""
    if stage == "ppo":
        ppo = config.ppo
        return [
            ("ppo.actor_lora_module_name", ppo.actor_lora_dim, ppo.actor_lora_module_name),
            ("ppo.critic_lora_module_name", ppo.critic_lora_dim, ppo.critic_lora_module_name),
        ]
    section = config.stage(stage)
    return [(f"{stage}.lora_module_name", section.lora_dim, section.lora_module_name)]  # type: ignore[attr-defined]


def check_models(config: RunConfig, stage: str) -> None:
    """Refuse lengths past a local model's positions and LoRA module names that match none of its linears."""
    trust = config.trust_remote_code
    for key, path in config.model_inputs(stage).items():
        model_config = _local_config(path, trust)
        if model_config is None:
            continue
        limit = positions(model_config)
        for length_key, length in _lengths(config, stage):
            if limit is not None and length > limit:
                raise ConfigError(
                    length_key,
                    length,
                    f"is more than the {limit} positions of the model in {path}",
                    f"use at most {limit} tokens",
                )
        if key == "ppo.actor_model_name_or_path" and config.ppo.rollout_engine == "vllm":
            check_vllm_head_size(config, model_config, path or "")
        if key.endswith(("reward_model_name_or_path", "ref_model_name_or_path")):
            continue  # frozen: no LoRA on them
        for lora_key, rank, module_name in _lora(config, stage):
            is_critic = "critic" in lora_key
            if rank and is_critic == key.endswith("critic_model_name_or_path"):
                check_lora(model_config, lora_key, module_name, path or "")


def check_lora(model_config: Any, key: str, module_name: str, path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .training.engine import BLOCK_PREFIXES, lora_targets

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception:  # an architecture transformers cannot build here: the worker will tell
        return
    if not lora_targets(model, module_name):
        blocks = [p for p in BLOCK_PREFIXES if lora_targets(model, p)]
        raise ConfigError(
            key,
            module_name,
            f"matches no linear layer of the model in {path}",
            f"use a part of its layers' names, e.g. {blocks[0]!r}" if blocks else "check the name",
        )


#: The head sizes vLLM's CPU attention kernels take (a model outside them dies at its first generation).
VLLM_CPU_HEAD_SIZES = (32, 512)


def head_size(model_config: Any) -> int | None:
    explicit = getattr(model_config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden, heads = getattr(model_config, "hidden_size", None), getattr(model_config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def check_vllm_head_size(config: RunConfig, model_config: Any, path: str) -> None:
    """On CPUs (``accelerator: cpu``, or auto on a machine without CUDA), vLLM runs only models whose attention
    heads are 32 to 512 wide."""
    import torch

    size = head_size(model_config)
    low, high = VLLM_CPU_HEAD_SIZES
    on_cpu = config.topology.accelerator == "cpu" or (
        config.topology.accelerator == "auto" and not torch.cuda.is_available()
    )
    if on_cpu and size is not None and not low <= size <= high:
        raise ConfigError(
            "ppo.rollout_engine",
            "vllm",
            f"cannot run the actor in {path} on CPUs: its attention heads are {size} wide and vLLM's CPU kernels "
            f"take {low} to {high}",
            "use rollout_engine hf for this model, or a model with wider heads",
        )
