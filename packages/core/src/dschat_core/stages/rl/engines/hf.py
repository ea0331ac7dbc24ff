"""Rollouts with Hugging Face ``generate`` on the trained model itself (or DeepSpeed's Hybrid Engine wrapping
it): nothing to sync, and the log-probs are the trainer's own."""

from __future__ import annotations

import warnings
from typing import Any

from ....config import PPO
from ....training.distributed import Dist
from ..tokens import answer_mask, step_logprobs
from . import Rollout, Sampling


class HFEngine:
    same_model = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        kv_cache: bool = True,
        static_cache: bool = False,
        compile_decode: bool = False,
        synced: bool = False,
        fp32_logprobs: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.kv_cache, self.compile_decode, self.synced, self.fp32 = kv_cache, compile_decode, synced, fp32_logprobs
        self.static_cache = kv_cache and static_cache and supports_static_cache(model)

    @classmethod
    def for_stage(cls, section: PPO, policy: Any, tokenizer: Any, dist: Dist) -> HFEngine:
        return cls(
            policy,
            tokenizer,
            kv_cache=section.generation_kv_cache,
            static_cache=section.generation_cache == "static",
            compile_decode=section.compile_generation,
            # Ranks in step under ZeRO-3 (``synced_gpus``): users of DeepSpeed-Chat found it hanging without.
            synced=section.actor_zero_stage == 3 and dist.world_size > 1,
            fp32_logprobs=section.compute_fp32_loss,
        )

    def sync(self, module: Any) -> None:
        """Nothing to do: generation runs on the trained weights."""

    def generate(self, prompt_ids, prompt_mask, sampling: Sampling, logprobs: bool = False) -> Rollout:
        """``logprobs`` reads them off the raw logits ``generate`` computed for each new token (before
        temperature, top-k and top-p), which saves the actor a forward over the whole rollout."""
        import torch
        import torch.nn.functional as F

        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": [self.tokenizer.eos_token_id, *sampling.stop_token_ids]
            if sampling.stop_token_ids
            else self.tokenizer.eos_token_id,
            "use_cache": self.kv_cache,
            "synced_gpus": self.synced,
        }
        if sampling.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        if logprobs:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
            if self.compile_decode:
                kwargs["compile_config"] = compile_config()
                # A compiled decode step is specialised to the cache's length: prompt widths in steps of 32 keep
                # the shapes (and recompilations) few. Left padding changes no real token's position or attention.
                width = -(-prompt_ids.shape[1] // 32) * 32
                prompt_ids = F.pad(prompt_ids, (width - prompt_ids.shape[1], 0), value=self.tokenizer.pad_token_id)
                prompt_mask = F.pad(prompt_mask, (width - prompt_mask.shape[1], 0), value=0)
        answer_logprobs = None
        with torch.no_grad():
            sequences = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
            if logprobs:
                step_logits, sequences = sequences.logits, sequences.sequences
                answer_logprobs = step_logprobs(step_logits, sequences[:, prompt_ids.shape[1] :], self.fp32).float()
        answer = sequences[:, prompt_ids.shape[1] :]
        action_mask = answer_mask(answer, [self.tokenizer.eos_token_id, *sampling.stop_token_ids])
        return Rollout.joined(prompt_ids, prompt_mask, answer, action_mask, action_mask, answer_logprobs)


def supports_static_cache(model) -> bool:
    """Whether ``model`` (a module, or an engine wrapping one) can generate with transformers' static cache; a
    model that cannot falls back to the dynamic cache, with one warning."""
    module = getattr(model, "module", model)
    if getattr(module, "_can_compile_fullgraph", False):
        return True
    warnings.warn(
        f"ppo.generation_cache: static is not supported by {type(module).__name__}; generating with the dynamic "
        "cache instead",
        stacklevel=2,
    )
    return False


def compile_config():
    """transformers' compile settings for the decode step, on every device (it compiles on GPUs only by default):
    inductor, dynamic shapes off (the static cache fixes them), CUDA graphs where there is CUDA."""
    import torch
    from transformers import CompileConfig

    mode = "reduce-overhead" if torch.cuda.is_available() else "default"
    config = CompileConfig(fullgraph=False, dynamic=False, mode=mode)
    config._compile_all_devices = True  # type: ignore[assignment]  # transformers declares it None
    return config
