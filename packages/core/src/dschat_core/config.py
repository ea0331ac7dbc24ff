"""The run-config schema: one YAML file for all three stages, DeepSpeed-Chat's flag names and defaults.

Loading goes: YAML file -> ``--set key=value`` overrides -> pydantic validation. Any problem becomes a
:class:`~dschat_core.errors.ConfigError` naming the key, the value and the fix, before anything is launched.
Sections under ``backends:`` belong to the adapters; each backend validates its own (``Backend.config_model``).
"""

from __future__ import annotations

import base64
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MISSING, ConfigError, UserError

STAGES = ("sft", "reward", "ppo", "dpo")
"""Every training stage."""

PIPELINES = {"rlhf": ("sft", "reward", "ppo"), "dpo": ("sft", "dpo"), "rl": ("sft", "ppo")}
"""What ``--stage all`` runs, in order, by ``pipeline``: InstructGPT's three stages; SFT then DPO; SFT then RL with
rule or verifier rewards only (no reward model)."""

#: Which of ``data.data_split``'s three shares each stage reads (DPO reads the preference pairs of stage 2).
DATA_PHASES = {"sft": 0, "reward": 1, "dpo": 1, "ppo": 2}

#: The stages a stage starts from, where the pipeline has them.
READS = {"ppo": ("sft", "reward"), "dpo": ("sft",)}

Dtype = Literal["fp16", "bf16", "fp32"]
SchedulerType = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
ZeroStage = Literal[0, 1, 2, 3]
Resume = Literal["auto", "never"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Topology(Section):
    nodes: int = Field(1, ge=1, le=100_000, description="Number of nodes (T9K worker replicas, Slurm nodes).")
    gpus_per_node: int = Field(
        1, ge=1, le=1024, description="Training processes per node: GPUs per node, or CPU ranks on a CPU-only machine."
    )
    accelerator: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when a GPU is visible, else CPU with the gloo backend."
    )
    master_port: int | None = Field(
        None, ge=1024, le=65535, description="Rendezvous port; a free one is chosen when unset."
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class Data(Section):
    data_path: list[str] = Field(
        default_factory=lambda: ["Dahoas/rm-static"],
        description="Dataset names (see `dschat-core data list`) or local folders/files; several blend.",
    )
    data_split: str = Field(
        "2,4,4", description="Shares of every dataset for stages 1/2/3 (disjoint, deterministic under `seed`)."
    )
    sft_only_data_path: list[str] = Field(
        default_factory=list, description="Single-response datasets used whole by stage 1 only."
    )
    unsupervised_dataset_name: str | None = Field(None, description="Text dataset for stage 3's PTX loss.")
    unsupervised_dataset_config_name: str | None = Field(None, description="Its config name, if any.")
    cache_dir: str | None = Field(None, description="Tokenized-data cache; defaults to the backend's storage layout.")
    num_proc: int = Field(1, ge=1, description="Processes for tokenization.")
    strict: bool = Field(False, description="Fail on the first malformed row instead of skipping and counting.")
    chat_template: str | None = Field(
        None,
        max_length=65_536,
        description="A Jinja chat template for conversational datasets (messages, conversational pairs and prompts), "
        "used instead of the tokenizer's; null: the tokenizer's own (docs/data.md).",
    )

    @field_validator("data_path", "sft_only_data_path", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("data_split")
    @classmethod
    def _split(cls, value: str) -> str:
        parts = value.split(",")
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            raise ValueError("must be three comma-separated numbers such as '2,4,4'") from None
        if not all(math.isfinite(share) for share in shares):
            raise ValueError("must be three finite numbers such as '2,4,4'")
        if len(shares) != 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
            raise ValueError("must be three non-negative numbers with a positive sum, such as '2,4,4'")
        return value

    @property
    def split_shares(self) -> tuple[float, float, float]:
        shares = [float(p) for p in self.data_split.split(",")]
        total = sum(shares)
        return tuple(s / total for s in shares)  # type: ignore[return-value]


class StageSettings(Section):
    """What every training stage shares: its output, schedule, checkpoints and failure policy (the run chassis,
    ``training/run.py``, reads these)."""

    output_dir: str | None = Field(None, description="Where the final model goes; defaults to the storage layout.")
    num_train_epochs: int = Field(1, ge=1, le=100_000)
    max_steps: int | None = Field(
        None, ge=1, description="End after this many steps, as a finished run (final eval and save); None: all epochs."
    )
    print_interval: int = Field(10, ge=1, description="Steps between progress lines.")
    eval_interval: int = Field(0, ge=0, description="Steps between evaluations (0: none between).")
    eval_before_training: bool = Field(True, description="Evaluate once before the first step.")
    save_interval: int = Field(0, ge=0, description="Steps between checkpoints (0: none between).")
    save_each_epoch: bool = Field(True, description="Checkpoint at the end of every epoch.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept.")
    resume: Resume = Field("auto", description="auto: continue from the last checkpoint if there is one.")
    overwrite: bool = Field(False, description="Allow replacing a finished model in output_dir.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="NaN/inf in a loss, reward or advantage: stop the run, or skip the batch (counted)."
    )
    max_skipped_in_a_row: int = Field(
        20,
        ge=1,
        le=1_000_000,
        description="With on_nonfinite: skip, stop the run (nothing marked finished) once this many batches in a "
        "row were skipped: it is learning nothing.",
    )
    enable_tensorboard: bool = True
    retries: int = Field(
        0,
        ge=0,
        le=100,
        description="Restart a failed or preempted run from its checkpoint up to this many times "
        "(not again after failing twice the same way at the same step).",
    )
    dtype: Dtype = Field("fp16", description="fp16 (with loss scaling) or bf16 on GPUs; fp32 or bf16 on CPU ranks.")
    group_by_length: bool = Field(
        False,
        description="Micro-batches of rows of similar length (shuffled, then sorted within mega-batches of 50 "
        "batches, deterministic under `seed`): less padding; off: DeepSpeed-Chat's shuffled order.",
    )
    compile: bool = Field(
        False, description="torch.compile each trained model (DeepSpeed's engine.compile); see docs/training.md."
    )


class TrainStage(StageSettings):
    """Flags shared by stages 1 and 2 (DeepSpeed-Chat's step-1/step-2 `main.py`)."""

    model_name_or_path: str | None = Field(None, description="Hub id or local folder of the base model.")
    per_device_train_batch_size: int = Field(16, ge=1, le=65536)
    per_device_eval_batch_size: int = Field(16, ge=1, le=65536)
    max_seq_len: int = Field(512, ge=8, le=1 << 20)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
    lr_scheduler_type: SchedulerType = "cosine"
    num_warmup_steps: int = Field(0, ge=0)
    gradient_checkpointing: bool = False
    dropout: float | None = Field(None, ge=0, lt=1, description="None keeps the model config's dropout.")
    offload: bool = Field(False, description="ZeRO-Offload of parameters and optimizer state to CPU.")
    zero_stage: ZeroStage = 0
    lora_dim: int = Field(0, ge=0, description=">0 enables LoRA (peft) with this rank.")
    lora_module_name: str = Field("decoder.layers.", description="LoRA goes on linears whose name contains this.")
    only_optimize_lora: bool = False
    lora_learning_rate: float = Field(5e-4, gt=0)
    compute_fp32_loss: bool = False
    eval_interval: int = Field(
        0, ge=0, description="Steps between evaluations; 0: only before training and at each epoch end."
    )

    @model_validator(mode="after")
    def _lora(self) -> TrainStage:
        if self.only_optimize_lora and self.lora_dim == 0:
            raise ValueError("only_optimize_lora needs lora_dim > 0 [only_optimize_lora]")
        return self


class SFT(TrainStage):
    learning_rate: float = Field(1e-3, gt=0)
    loss_on: Literal["auto", "all", "response"] = Field(
        "auto",
        description="auto: the assistant turns where some data is conversational, else prompt and answer as "
        "DeepSpeed-Chat; all: every token; response: the answer (every assistant turn of a conversation) only.",
    )
    packing: bool = Field(
        False,
        description="Pack each micro-batch's rows padding-free into rows of up to max_seq_len, told apart by "
        "position ids (the same loss); needs a model whose attention reads them (Llama, GPT-2; not OPT), checked "
        "at start.",
    )


class Reward(TrainStage):
    learning_rate: float = Field(5e-5, gt=0)
    num_padding_at_beginning: int = Field(
        1, ge=0, description="Accepted for DeepSpeed-Chat compatibility; answer ends come from the attention mask."
    )
    eval_iters: int = Field(100, ge=1, description="Batches per evaluation.")
    loss: Literal["pairwise", "last_token"] = Field(
        "pairwise", description="pairwise: DeepSpeed-Chat's loss from the first differing token; last_token."
    )


class VLLMSettings(Section):
    """``ppo.vllm``: the rollout engine's settings where ``ppo.rollout_engine`` is vllm (docs/training.md)."""

    max_model_len: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="Longest sequence the engine holds; null: max_prompt_seq_len + max_answer_seq_len.",
    )
    enforce_eager: bool = Field(
        True, description="No CUDA graphs or torch.compile: the engine starts in seconds; false for speed on GPUs."
    )
    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="GPU: the share of the device's memory the engine takes (the actor trains in "
        "the rest; the engine sleeps while it does).",
    )
    cpu_kv_cache_gib: int = Field(1, ge=1, le=4096, description="CPU: the KV cache per rank, GiB (whole).")
    cpu_threads: int | None = Field(
        None, ge=1, le=4096, description="CPU: cores each rank's engine binds; null: the rank's share."
    )


class EnvironmentSettings(Section):
    """``ppo.environment``: multi-turn episodes with an environment (tools, games) instead of one answer per
    prompt (docs/training.md, docs/environments.md)."""

    name: str | None = Field(
        None, description="A registered environment (`dschat-core environments`); null: one answer per prompt."
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="The environment's own settings.")
    max_turns: int = Field(4, ge=1, le=1024, description="Model turns per episode at most.")
    timeout: float = Field(
        10.0, gt=0, le=86_400, description="Seconds one environment step may take before it counts as failed."
    )
    max_observation_tokens: int = Field(
        64, ge=1, le=1 << 20, description="Longest observation; a longer one counts as a failed step."
    )
    on_error: Literal["fail", "score"] = Field(
        "fail",
        description="A step that raises, hangs or floods: fail stops the run naming the environment, step and "
        "episode; score ends that episode as failed (reward failure_reward) and counts it.",
    )
    failure_reward: float = Field(0.0, ge=-1e6, le=1e6, description="With on_error: score, a failed episode's reward.")


class PPO(StageSettings):
    """Stage 3 flags (DeepSpeed-Chat's step-3 `main.py`) plus its hard-coded constants as settings."""

    actor_model_name_or_path: str | None = Field(None, description="Defaults to stage 1's output.")
    critic_model_name_or_path: str | None = Field(None, description="Defaults to stage 2's output.")
    reward_model_name_or_path: str | None = Field(
        None, description="The reward model that scores rollouts; defaults to the critic's starting point."
    )
    num_padding_at_beginning: int = Field(1, ge=0, description="Unused by stage 3, as in DeepSpeed-Chat.")
    per_device_generation_batch_size: int = Field(16, ge=1, le=65536)
    per_device_training_batch_size: int = Field(16, ge=1, le=65536)
    generation_batches: int = Field(1, ge=1, le=1024)
    ppo_epochs: int = Field(1, ge=1, le=1000)
    max_prompt_seq_len: int = Field(256, ge=1, le=1 << 20)
    max_answer_seq_len: int = Field(256, ge=1, le=1 << 20)
    actor_learning_rate: float = Field(9.65e-6, gt=0)
    critic_learning_rate: float = Field(5e-6, gt=0)
    actor_weight_decay: float = Field(0.0, ge=0)
    critic_weight_decay: float = Field(0.0, ge=0)
    lr_scheduler_type: SchedulerType = "cosine"
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
    num_warmup_steps: int = Field(100, ge=0)
    unsup_coef: float = Field(27.8, ge=0)
    enable_hybrid_engine: bool = False
    unpin_actor_parameters: bool = False
    release_inference_cache: bool = False
    inference_tp_size: int = Field(1, ge=1)
    tp_gather_partition_size: int = Field(8, ge=1)
    offload: bool = False
    offload_reference_model: bool = False
    offload_reward_model: bool = False
    actor_zero_stage: ZeroStage = 0
    critic_zero_stage: ZeroStage = 0
    actor_gradient_checkpointing: bool = False
    critic_gradient_checkpointing: bool = False
    actor_dropout: float | None = Field(None, ge=0, lt=1)
    critic_dropout: float | None = Field(None, ge=0, lt=1)
    actor_lora_dim: int = Field(0, ge=0)
    critic_lora_dim: int = Field(0, ge=0)
    actor_lora_module_name: str = "decoder.layers."
    critic_lora_module_name: str = "decoder.layers."
    only_optimize_lora: bool = False
    actor_lora_learning_rate: float = Field(5e-4, gt=0)
    critic_lora_learning_rate: float = Field(5e-4, gt=0)
    enable_ema: bool = False
    enable_mixed_precision_lora: bool = False
    compute_fp32_loss: bool = False
    align_overflow: bool = Field(False, description="Not supported (DeepSpeed-Chat's fp16 overflow alignment).")
    # DeepSpeed-Chat's hard-coded constants, with its values as defaults.
    kl_ctl: float = Field(
        0.1,
        ge=0,
        validation_alias=AliasChoices("kl_ctl", "kl_coef"),
        description="KL coefficient β (also `kl_coef`); 0 loads no reference model.",
    )
    clip_reward_value: float = Field(5.0, gt=0)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    ema_beta: float = Field(0.992, gt=0, lt=1)
    # Rollout sampling: on by default (greedy rollouts never explore).
    do_sample: bool = True
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering.")
    top_p: float = Field(1.0, gt=0, le=1)
    generation_kv_cache: bool = Field(
        True, description="Reuse attention keys/values while generating; off only to measure what it saves."
    )
    generation_cache: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="static: a preallocated KV cache (transformers' StaticCache), the shape a compiled decode "
        "step needs; models that cannot use it fall back to dynamic with a warning.",
    )
    compile_generation: bool = Field(
        False, description="torch.compile the decode step (with generation_cache: static); see docs/training.md."
    )
    logprobs_from_generation: bool = Field(
        True,
        description="The behaviour policy's log-probs from the logits generation already computed (before "
        "temperature/top-k/top-p), not a second actor forward; off only to measure what it saves.",
    )
    rollout_engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="What generates rollouts: hf (transformers' generate on the actor, or the Hybrid Engine) or "
        "vllm (an engine per rank, weights synced after each update; pip install dschat-core[vllm]).",
    )
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)
    environment: EnvironmentSettings = Field(default_factory=EnvironmentSettings)
    rollout_correction_cap: float = Field(
        2.0,
        ge=0,
        le=1e6,
        description="With rollout_engine vllm: each token's loss weighted by min(pi_train/pi_vllm, cap) "
        "(truncated importance sampling); 0: off.",
    )
    # Beyond PPO (docs/training.md): one implementation; these choose the algorithm and its options.
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "ppo",
        description="ppo (critic, GAE), grpo, rloo, reinforce_pp (REINFORCE++) or reinforce_pp_baseline "
        "(REINFORCE++ against the group's mean); all but ppo train no critic.",
    )
    n_samples_per_prompt: int = Field(
        1, ge=1, le=4096, description="Answers sampled per prompt (a group); grpo/rloo need >= 2."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="GRPO: divide advantages by the group's std, the batch's, or not at all (Dr. GRPO)."
    )
    kl_in: Literal["reward", "loss"] | None = Field(
        None,
        description="The KL to the reference in the per-token reward or in the loss; null: loss for grpo, "
        "reward for the others.",
    )
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(None, description="null: k1 in the reward, k3 in the loss.")
    clip_low: float | None = Field(None, gt=0, lt=1, description="Ratio clip below 1; null: cliprange.")
    clip_high: float | None = Field(None, gt=0, description="Ratio clip above 1 (DAPO's clip-higher); null: cliprange.")
    dual_clip: float | None = Field(None, gt=1, description="Bound negative advantages' loss at dual_clip × |A|.")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = Field(
        "token_mean",
        description="Policy-loss aggregation: per token (DAPO), per answer (GRPO), each answer's sum (verl's "
        "seq-mean-token-sum), each answer's sum over max_answer_seq_len (Dr. GRPO).",
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop groups whose rewards are all equal and draw more prompts to fill the step."
    )
    dynamic_sampling_max_batches: int = Field(4, ge=1, description="Most prompt batches drawn for one step.")
    reward_function_timeout: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="Seconds one reward function call may take before the run stops naming it, the step and the "
        "sample; 0: no limit.",
    )
    max_steps_without_signal: int = Field(
        20,
        ge=0,
        le=1_000_000,
        description="Stop the run (exit 2) after this many steps in a row without a learning signal: every "
        "group's answers rewarded alike (or every answer alike, one per prompt), or every group dropped by "
        "dynamic sampling; 0: never stop for it.",
    )
    overlong: Literal["none", "mask", "penalty"] = Field(
        "none", description="Answers cut at max_answer_seq_len: left as they are, out of the loss, or penalised."
    )
    overlong_buffer: int = Field(4, ge=1, description="Penalty: from max_answer_seq_len - buffer tokens on.")
    overlong_penalty: float = Field(1.0, ge=0, description="Penalty at max_answer_seq_len (linear from the buffer).")
    reward_functions: dict[str, float | dict[str, Any]] = Field(
        default_factory=dict,
        description="Rule or verifier rewards by registered name: a weight, or "
        "`{weight: W, setting: value}`; see `dschat-core rewards`.",
    )
    reward_model_weight: float | None = Field(
        None,
        ge=0,
        description="Weight of the reward model's score; null: 1 in the rlhf pipeline, 0 in rl (no "
        "reward model loaded).",
    )
    print_interval: int = Field(1, ge=1, description="Steps between progress lines.")
    eval_interval: int = Field(10, ge=0, description="Steps between greedy `eval/reward` on held-out prompts.")
    eval_prompts: int = Field(64, ge=1, description="Held-out prompts scored per evaluation.")

    @model_validator(mode="after")
    def _deepspeed_chat_rules(self) -> PPO:
        if self.inference_tp_size > 1 and self.actor_zero_stage != 3:
            raise ValueError("inference_tp_size > 1 needs actor_zero_stage 3 [inference_tp_size]")
        if self.enable_mixed_precision_lora and (self.actor_lora_dim == 0 or self.actor_zero_stage != 3):
            raise ValueError(
                "enable_mixed_precision_lora needs actor_lora_dim > 0 and actor_zero_stage 3 "
                "[enable_mixed_precision_lora]"
            )
        if self.compile_generation and self.generation_cache != "static":
            raise ValueError(
                "compile_generation needs generation_cache: static (a compiled decode step needs fixed cache "
                "shapes) [compile_generation]"
            )
        if self.generation_cache == "static" and not self.generation_kv_cache:
            raise ValueError(
                "generation_cache: static is a KV cache; it needs generation_kv_cache true [generation_cache]"
            )
        if self.enable_hybrid_engine and self.actor_lora_dim > 0:
            raise ValueError(
                "enable_hybrid_engine fuses only DeepSpeed-Chat's own LoRA layers, not peft's; turn off "
                "enable_hybrid_engine or set actor_lora_dim 0 [enable_hybrid_engine]"
            )
        if self.align_overflow:
            raise ValueError(
                "align_overflow is not supported: DeepSpeed skips each engine's overflowed fp16 step on its own; "
                "leave it off, or use bf16 [align_overflow]"
            )
        if self.only_optimize_lora and self.actor_lora_dim == 0 and self.critic_lora_dim == 0:
            raise ValueError("only_optimize_lora needs actor_lora_dim or critic_lora_dim > 0 [only_optimize_lora]")
        if self.algorithm in ("grpo", "rloo", "reinforce_pp_baseline") and self.n_samples_per_prompt < 2:
            raise ValueError(
                f"{self.algorithm} compares the answers to one prompt: set n_samples_per_prompt to 2 or more "
                "[n_samples_per_prompt]"
            )
        if self.rollout_engine == "vllm" and self.enable_hybrid_engine:
            raise ValueError(
                "enable_hybrid_engine is the hf engine's way to generate; with rollout_engine vllm turn it off "
                "[enable_hybrid_engine]"
            )
        longest = self.max_prompt_seq_len + self.max_answer_seq_len
        if self.rollout_engine == "vllm" and self.vllm.max_model_len is not None and self.vllm.max_model_len < longest:
            raise ValueError(
                f"vllm.max_model_len {self.vllm.max_model_len} is shorter than max_prompt_seq_len + "
                f"max_answer_seq_len = {longest}; use at least {longest}, or null [vllm]"
            )
        if self.dynamic_sampling and self.n_samples_per_prompt < 2:
            raise ValueError(
                "dynamic_sampling drops groups of equal rewards: needs n_samples_per_prompt >= 2 [dynamic_sampling]"
            )
        for name, spec in self.reward_functions.items():
            if isinstance(spec, dict) and not isinstance(spec.get("weight", 1.0), int | float):
                raise ValueError(f"reward_functions.{name}.weight must be a number [reward_functions]")
        if self.overlong == "penalty" and self.overlong_buffer > self.max_answer_seq_len:
            raise ValueError(
                f"the overlong penalty starts max_answer_seq_len - overlong_buffer tokens in: "
                f"{self.max_answer_seq_len} - {self.overlong_buffer} < 0; use a buffer of at most "
                f"{self.max_answer_seq_len} tokens [overlong_buffer]"
            )
        return self

    # -- what the settings resolve to ------------------------------------------------------------------------
    @property
    def kl_location(self) -> str:
        return self.kl_in or ("loss" if self.algorithm == "grpo" else "reward")

    @property
    def kl_kind(self) -> str:
        return self.kl_estimator or ("k3" if self.kl_location == "loss" else "k1")

    @property
    def needs_critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def needs_reference(self) -> bool:
        return self.kl_ctl > 0

    @property
    def uses_reward_model(self) -> bool:
        return (self.reward_model_weight if self.reward_model_weight is not None else 1.0) > 0


class DPO(TrainStage):
    """Offline preference optimisation on stage 1's model: DPO and its variants (docs/training.md)."""

    model_name_or_path: str | None = Field(None, description="The policy to start from; defaults to stage 1's output.")
    ref_model_name_or_path: str | None = Field(
        None, description="The frozen reference; defaults to the policy's starting point (unused by simpo and orpo)."
    )
    learning_rate: float = Field(1e-6, gt=0)
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge, robust (cDPO), simpo and orpo (no reference model)."
    )
    beta: float = Field(0.1, gt=0, description="β: the KL strength (sigmoid, ipo, hinge, robust, simpo); λ for orpo.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust: how often a label is taken to be flipped.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin γ.")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an NLL term on the chosen answers (RPO).")
    precompute_ref_logprobs: bool = Field(
        False, description="Compute the reference's log-probs once, cached with the data; no reference in training."
    )
    reference_zero_stage: ZeroStage | None = Field(None, description="null: 3 when zero_stage is 3, else 0.")
    offload_reference_model: bool = False
    eval_samples: int = Field(16, ge=0, description="Held-out prompts answered greedily at each evaluation (saved).")
    eval_max_new_tokens: int = Field(32, ge=1, description="Longest of those answers, in tokens.")

    @model_validator(mode="after")
    def _settings_the_loss_reads(self) -> DPO:
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing applies to the sigmoid (cDPO) and robust losses, not to {self.loss}: set it to 0 "
                "or choose one of those losses [label_smoothing]"
            )
        return self

    @property
    def reference_free(self) -> bool:
        return self.loss in ("simpo", "orpo")


class Tracking(Section):
    """Where metrics go besides the progress lines (docs/tracking.md)."""

    sinks: list[str] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="Registered metric sinks: jsonl (always on), tensorboard, wandb, mlflow (`dschat-core sinks`).",
    )
    project: str = Field("dschat", description="W&B project; MLflow experiment unless `experiment` is set.")
    experiment: str | None = Field(None, description="MLflow experiment; default: project.")
    run_name: str | None = Field(None, description="Names the tracked runs (<run_name>-<stage>); default: run_name.")
    tags: list[str] = Field(default_factory=list, description="Tags on every tracked run.")


class Storage(Section):
    root: str | None = Field(
        None, description="Root for models, datasets, caches and outputs; each backend has its default."
    )


_RUN_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class RunConfig(Section):
    """The whole run: shared settings, one section per stage, one per backend."""

    run_name: str = Field("dschat", description="Names jobs and the output folder: lowercase letters, digits and '-'.")
    output_dir: str | None = Field(None, description="Root of this run's outputs; defaults to the storage layout.")
    pipeline: Literal["rlhf", "dpo", "rl"] = Field(
        "rlhf",
        description="What `--stage all` runs: rlhf (sft, reward, ppo), dpo (sft, dpo), rl (sft, ppo with "
        "rule/verifier rewards, no reward model).",
    )
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="Seeds every RNG (NumPy takes 32 bits).")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")
    backend: str | None = Field(
        None,
        description="The launch backend `train` uses when no --backend is given; default: the only installed one.",
    )
    topology: Topology = Field(default_factory=Topology)
    storage: Storage = Field(default_factory=Storage)
    data: Data = Field(default_factory=Data)
    sft: SFT = Field(default_factory=SFT)
    reward: Reward = Field(default_factory=Reward)
    ppo: PPO = Field(default_factory=PPO)
    dpo: DPO = Field(default_factory=DPO)
    tracking: Tracking = Field(default_factory=Tracking)
    backends: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="One section per backend (local, slurm, t9k), validated by its adapter."
    )

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, value: str) -> str:
        if len(value) > 40 or not _RUN_NAME.match(value):
            raise ValueError("must be 1-40 lowercase letters, digits or '-', starting and ending alphanumeric")
        return value

    def stage(self, name: str) -> StageSettings:
        return getattr(self, name)

    def model_inputs(self, stage: str) -> dict[str, str | None]:
        """The models a stage starts from, by config key (``ppo.actor_model_name_or_path`` …)."""
        if stage in ("sft", "reward"):
            return {f"{stage}.model_name_or_path": getattr(self, stage).model_name_or_path}
        if stage == "ppo":
            keys = ["actor_model_name_or_path"]
            keys += ["critic_model_name_or_path"] if self.ppo.needs_critic else []
            keys += ["reward_model_name_or_path"] if self.ppo.uses_reward_model else []
            return {f"ppo.{key}": getattr(self.ppo, key) for key in keys}
        if stage == "dpo":
            inputs = {"dpo.model_name_or_path": self.dpo.model_name_or_path}
            if not self.dpo.reference_free:
                inputs["dpo.ref_model_name_or_path"] = self.dpo.ref_model_name_or_path
            return inputs
        return {}

    def base_model(self, stage: str) -> str | None:
        """The model a stage's output grows from: its own for stage 1-2, stage 1's for those after it."""
        own = next(iter(self.model_inputs(stage).values()), None)
        return own or (self.sft.model_name_or_path if stage in READS else None)


# ---------------------------------------------------------------------------------------------------------
# Loading, overrides and error reporting


#: A run config is small: bigger files, or aliases expanding past this many nodes, are refused unread.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (the second would win, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (also at line {seen[key].line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded (an alias bomb has billions)."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int = 0) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if depth > 100:
            raise RecursionError
        sizes[id(n)] = 0  # cycles count once
        children: list[yaml.Node] = []
        if isinstance(n, yaml.MappingNode):
            children = [part for pair in n.value for part in pair]
        elif isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        total = 1 + sum(size(child, depth + 1) for child in children)
        sizes[id(n)] = min(total, MAX_YAML_NODES + 1)
        return sizes[id(n)]

    return size(node)


def parse_yaml(text: str, what: str, key: str = "config file") -> Any:
    """YAML text as data: safe (no object construction), no duplicate keys, bounded alias expansion; problems
    are a ConfigError naming ``what``."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_YAML_NODES:
            raise ConfigError(
                key,
                what,
                f"expands past {MAX_YAML_NODES} YAML nodes (aliases)",
                "write the values out instead of nesting anchors",
            )
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(key, what, f"invalid YAML{where}: {problem}", "fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError(key, what, "nests too deep", "flatten the YAML") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run-config file; unreadable or malformed files are a ConfigError naming the file."""
    path = Path(path)
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ConfigError(
            "config file", str(path), "is not a regular file (a pipe or device would hang)", "pass a YAML file"
        )
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            "config file",
            str(path),
            f"is larger than {MAX_CONFIG_BYTES >> 20} MiB",
            "a run config is a few hundred lines: check the path",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file", str(path), "does not exist", "check the -c path") from None
    except IsADirectoryError:
        raise ConfigError("config file", str(path), "is a directory", "pass a YAML file") from None
    except PermissionError:
        raise ConfigError(
            "config file", str(path), "cannot be read (permission denied)", "fix its permissions"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError("config file", str(path), "is not UTF-8 text", "save it as UTF-8 YAML") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            "config file",
            str(path),
            "must hold a mapping of keys at the top level",
            "write `key: value` lines, see `dschat-core config show`",
        )
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set dotted.key=value``; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", assignment, "must look like section.key=value", "e.g. --set sft.zero_stage=2")
    value = parse_yaml(raw, assignment, key="--set") if raw.strip() else ""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                ".".join(parts[: i + 1]),
                child,
                "is a value, not a section",
                f"set {'.'.join(parts[: i + 1])}=VALUE instead",
            )
        node = child
    for other in ALIASES.get(parts[-1], ()):  # an override names the key: it replaces the file's other spelling
        node.pop(other, None)
    node[parts[-1]] = value


#: Keys with two spellings (a peer's name and DeepSpeed-Chat's): setting one replaces the other.
ALIASES = {"kl_coef": ("kl_ctl",), "kl_ctl": ("kl_coef",)}


def check_aliases(data: dict[str, Any]) -> None:
    for section, node in data.items():
        if isinstance(node, dict):
            for key, others in ALIASES.items():
                both = [o for o in others if o in node]
                if key in node and both and key < both[0]:
                    raise ConfigError(
                        f"{section}.{key}", node[key], f"is also given as {section}.{both[0]}", "keep one of the two"
                    )


#: Keys that name a model or a dataset, and (``OUTPUTS``) a place to write: relative values in a config file are
#: relative to that file's folder (see :func:`relative_to_file`).
INPUTS = (
    "sft.model_name_or_path",
    "reward.model_name_or_path",
    "dpo.model_name_or_path",
    "dpo.ref_model_name_or_path",
    "ppo.actor_model_name_or_path",
    "ppo.critic_model_name_or_path",
    "ppo.reward_model_name_or_path",
    "data.data_path",
    "data.sft_only_data_path",
    "data.unsupervised_dataset_name",
)
OUTPUTS = (
    "storage.root",
    "output_dir",
    "data.cache_dir",
    "sft.output_dir",
    "reward.output_dir",
    "ppo.output_dir",
    "dpo.output_dir",
)


def relative_to_file(data: dict[str, Any], folder: Path) -> None:
    """A config file's relative paths mean the same wherever it is run from: an input (a model or dataset) is
    taken relative to the file's folder when it is there (else it stays as written: a hub id such as
    ``facebook/opt-1.3b``, or a path relative to the working folder); an output, when it starts with ``./`` or
    ``../``. Values given with ``--set`` are relative to the working folder, as the shell that typed them."""

    def resolve(value: Any, output: bool) -> Any:
        if isinstance(value, list):
            return [resolve(v, output) for v in value]
        if not isinstance(value, str) or not value or Path(value).is_absolute() or value.startswith("~"):
            return value
        candidate = folder / value
        explicit = value.startswith(("./", "../"))
        if explicit or (not output and candidate.exists()):
            return str(candidate.resolve())
        return value

    for key in (*INPUTS, *OUTPUTS):
        section, _, name = key.rpartition(".")
        node = data.get(section) if section else data
        if isinstance(node, dict) and name in node:
            node[name] = resolve(node[name], key in OUTPUTS)


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Load, override and validate a run config."""
    data = read_yaml(path) if path is not None else {}
    if path is not None:
        relative_to_file(data, Path(path).resolve().parent)
    given: dict[str, str] = {}
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        section, _, name = key.rpartition(".")
        for other in ALIASES.get(name, ()):
            if f"{section}.{other}" in given:
                raise ConfigError(
                    key, assignment.partition("=")[2], f"is also set as {section}.{other}", "keep one of the two"
                )
        given[key] = assignment
        apply_override(data, assignment)
    return validate_config(data)


def check_one_line(data: Any, key: str = "") -> None:
    """Every text value is one line: a newline, carriage return or NUL would become a line of its own in a
    rendered script, or cut it."""
    if isinstance(data, dict):
        for name, value in data.items():
            check_one_line(name, key or "key")
            check_one_line(value, f"{key}.{name}" if key else str(name))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            check_one_line(value, f"{key}[{i}]")
    elif isinstance(data, str) and any(ch in data for ch in "\n\r\x00"):
        fix = "remove them"
        if key == "data.chat_template":
            fix = "write a newline as \\n inside the template's string literals ({{ '\\n' }}), which Jinja reads"
        raise ConfigError(key, data, "must be one line (it holds a newline, carriage return or NUL)", fix)


def validate_config(data: dict[str, Any]) -> RunConfig:
    check_one_line(data)
    check_aliases(data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error_from(exc, RunConfig, data) from None


def config_error_from(exc: ValidationError, model: type[BaseModel], data: Any, prefix: str = "") -> ConfigError:
    """Turn pydantic's first error into a one-line ConfigError with a fix."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    kind = err["type"]
    message = err["msg"]
    # Cross-field rules name their key in brackets: "... [key]".
    named = re.search(r"\[([a-z_]+)\]$", message)
    if kind == "value_error" and named:
        loc = loc + [named.group(1)]
        message = message[: named.start()].strip()
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    key = prefix + ".".join(loc)
    value = _lookup(data, loc)
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        valid = _valid_keys(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        fix = f"did you mean '{close[0]}'?" if close else "remove it"
        return ConfigError(key, value, "unknown key", f"{fix} (valid keys here: {', '.join(valid)})")
    if kind == "missing":
        return ConfigError(key, MISSING, "is required", f"set {key}")
    fixes = {
        "greater_than": f"use a value > {ctx.get('gt')}",
        "greater_than_equal": f"use a value >= {ctx.get('ge')}",
        "less_than": f"use a value < {ctx.get('lt')}",
        "less_than_equal": f"use a value <= {ctx.get('le')}",
        "literal_error": f"use one of {ctx.get('expected')}",
        "int_parsing": "use a whole number",
        "int_from_float": "use a whole number",
        "float_parsing": "use a number",
        "finite_number": "use a finite number",
        "bool_parsing": "use true or false",
        "string_type": "use a text value",
        "list_type": "use a list, e.g. [a, b]",
        "model_type": "use a section of `key: value` lines",
        "dict_type": "use a section of `key: value` lines",
    }
    if named:  # a cross-field rule says what to do in its own message
        return ConfigError(key, value, message, "see docs/configuration.md")
    return ConfigError(key, value, message, fixes.get(kind, "see `dschat-core config show` for the schema"))


def _lookup(data: Any, loc: list[str]) -> Any:
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def _valid_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, defaults included."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def encode_config(config: RunConfig) -> str:
    """The config's non-default values as one shell-safe token (URL-safe base64 of JSON), for platforms that
    start the workers with a command line but offer no file the submitting machine can write (T9K). The
    ``backends`` section stays out: workers never read it."""
    data = config.model_dump(mode="json", exclude_defaults=True, exclude={"backends"})
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def decode_config(token: str) -> RunConfig:
    """Inverse of :func:`encode_config`."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"--config-data is not a config encoded by dschat-core ({exc})") from None
    return validate_config(data)


def write_config(config: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(config), encoding="utf-8")
    tmp.replace(path)
    return path
