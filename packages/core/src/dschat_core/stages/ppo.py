"""Stage 3: PPO on the stage-1 actor against the stage-2 reward model (DeepSpeed-Chat's step 3), on the run chassis.

Five DeepSpeed engines: actor and critic train; reference, reward and the optional EMA actor are frozen. Each
step: generate answers for a batch of prompts (sampling, KV-cached, or DeepSpeed's Hybrid Engine), score them in
eval mode (old log-probs, reference log-probs, values, reward), shape rewards and advantages
(:mod:`dschat_core.training.ppo_math`), then ``ppo_epochs`` passes of clipped actor and critic updates over
micro-batches, each followed by a PTX step and an EMA update when enabled.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..config import PPO, RunConfig
from ..models import load_causal_lm, load_reward_model, token_values
from ..plugins import get_dataset_formats
from ..training import ppo_math
from ..training.batching import left_pad, make_loader, to_device
from ..training.checkpoints import work_dir
from ..training.distributed import Dist, all_reduce_sum, info
from ..training.engine import EngineSpec, build_engine
from ..training.run import Stage, StepResult, check_finite, memory_gib, run_stage
from ..training.saving import mark_finished, save_final


@dataclass
class Experience:
    """One generation batch, scored. Per-token tensors cover the answer: [B, T]."""

    input_ids: Any  # [B, P + T]: left-padded prompt, then the answer
    attention_mask: Any
    position_ids: Any
    action_mask: Any
    old_logprobs: Any
    ref_logprobs: Any
    old_values: Any
    rewards: Any
    advantages: Any
    returns: Any
    scores: Any  # [B] raw reward-model scores

    def split(self, size: int) -> list[Experience]:
        count = self.input_ids.shape[0]
        return [
            Experience(**{f.name: getattr(self, f.name)[i : i + size] for f in fields(self)})
            for i in range(0, count, size)
        ]


def total_update_steps(section: PPO, prompt_batches: int) -> int:
    """Optimizer steps for the schedules: DeepSpeed-Chat's formula."""
    micro_per_batch = math.ceil(section.per_device_generation_batch_size / section.per_device_training_batch_size)
    micro = section.num_train_epochs * prompt_batches * micro_per_batch * section.ppo_epochs
    return max(1, micro // section.gradient_accumulation_steps)


def role_specs(section: PPO, total_steps: int, ptx: bool) -> dict[str, EngineSpec]:
    """The five engines of stage 3 as specs. The frozen copies follow their trained twin into ZeRO 3 (as
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


# -- generation and scoring, for the engines of training and the plain models of `dschat-core eval` ----------------
def generate(model, prompt_ids, prompt_mask, section: PPO, tokenizer, greedy: bool, synced: bool = False):
    """Answers for a left-padded prompt batch: [B, P + T]. ``synced`` keeps ranks in step under ZeRO-3
    (``synced_gpus``), which users of DeepSpeed-Chat found hanging without it."""
    import torch

    kwargs: dict[str, Any] = {
        "max_new_tokens": section.max_answer_seq_len,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": section.generation_kv_cache,
        "synced_gpus": synced,
    }
    if greedy or not section.do_sample:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=section.temperature, top_k=section.top_k, top_p=section.top_p)
    with torch.no_grad():
        return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)


def rollout(model, prompt_ids, prompt_mask, section: PPO, tokenizer, greedy: bool, synced: bool = False):
    """(sequences, full attention mask, position ids, answer mask) for a prompt batch."""
    import torch

    sequences = generate(model, prompt_ids, prompt_mask, section, tokenizer, greedy, synced)
    answer = sequences[:, prompt_ids.shape[1] :]
    action_mask = ppo_math.answer_mask(answer, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompt_mask, action_mask], dim=1)
    return sequences, attention_mask, ppo_math.position_ids(attention_mask), action_mask


def reward_scores(reward_model, sequences, attention_mask, positions, action_mask):
    """The reward model's score at each answer's last real token."""
    values = token_values(reward_model, sequences, attention_mask, positions)
    prompt_len = sequences.shape[1] - action_mask.shape[1]
    last = prompt_len + action_mask.sum(dim=1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1).float()


def greedy_eval(
    policy, reward_model, prompts: list[list[int]], section: PPO, tokenizer, dist: Dist, synced: bool = False
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers to held-out prompts, scored by the reward model: (``reward`` and ``response_len`` means over
    all prompts, this rank's answer records)."""
    import torch

    mine = prompts[dist.rank :: dist.world_size]
    records: list[dict[str, Any]] = []
    total = length = 0.0
    size = section.per_device_generation_batch_size
    # Every rank runs the same number of batches: generation under ZeRO-3 is collective.
    batches = math.ceil(math.ceil(len(prompts) / dist.world_size) / size)
    for i in range(batches):
        chunk = mine[i * size : (i + 1) * size]
        ids, mask = left_pad(chunk or prompts[:1], tokenizer.pad_token_id)
        ids, mask = ids.to(dist.device), mask.to(dist.device)
        with torch.no_grad():
            sequences, attention_mask, positions, action_mask = rollout(
                policy, ids, mask, section, tokenizer, greedy=True, synced=synced
            )
            scores = reward_scores(reward_model, sequences, attention_mask, positions, action_mask)
        if not chunk:
            continue
        total += float(scores.sum())
        length += float(action_mask.sum())
        answer_ids = sequences[:, ids.shape[1] :].masked_fill(action_mask == 0, tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
        prompt_texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        records += [
            {"prompt": p, "answer": a, "reward": float(s)}
            for p, a, s in zip(prompt_texts, answers, scores.tolist(), strict=True)
        ]
    total, length = all_reduce_sum([total, length], dist.device)
    return {"reward": total / len(prompts), "response_len": length / len(prompts)}, records


def eval_prompts(data, section: PPO) -> list[list[int]]:
    """The held-out prompts every evaluation uses: the first ``eval_prompts`` of the stage's eval share (its
    train share when it has none)."""
    source = data.eval if data.eval is not None and len(data.eval) else data.train
    return [list(r) for r in source.select(range(min(section.eval_prompts, len(source))))["prompt_input_ids"]]


class PPOStage(Stage):
    name = "ppo"
    section: PPO

    def tokenizer_path(self) -> str:
        assert self.section.actor_model_name_or_path, "ppo.actor_model_name_or_path must be resolved"
        return self.section.actor_model_name_or_path

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self, dist: Dist, tokenizer) -> None:
        import torch

        from ..data.pipeline import load_ptx_data, load_stage_data

        config, section = self.config, self.section
        self.dist, self.tokenizer = dist, tokenizer
        self.data = load_stage_data(config, "ppo", tokenizer, get_dataset_formats())
        self.loader = make_loader(
            self.data.train,
            section.per_device_generation_batch_size,
            lambda rows: left_pad([r["prompt_input_ids"] for r in rows], tokenizer.pad_token_id),
            dist,
            config.seed,
        )
        self.ptx_loader = None
        self.ptx_iter: Any = None
        self.ptx_epoch = self.ptx_position = 0  # PTX batches drawn in this PTX epoch: a resumed run skips them
        if config.data.unsupervised_dataset_name is not None:
            blocks = load_ptx_data(config, tokenizer).with_format("torch")

            def collate_ptx(rows):
                ids = torch.stack([r["input_ids"] for r in rows])
                return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

            self.ptx_loader = make_loader(
                blocks, section.per_device_training_batch_size, collate_ptx, dist, config.seed
            )
        self.eval_prompts = eval_prompts(self.data, section)
        self.reward_ema: float | None = None
        self.buffer: list[Experience] = []
        self.timings = {"generation": 0.0, "scoring": 0.0}
        self.build_engines(total_update_steps(section, len(self.loader)))

    def build_engines(self, total_steps: int) -> None:
        section, trust = self.section, self.config.trust_remote_code
        specs = role_specs(section, total_steps, self.ptx_loader is not None)
        actor_path, critic_path = section.actor_model_name_or_path, section.critic_model_name_or_path
        assert actor_path and critic_path

        def causal_lm(dropout: float | None):
            model = load_causal_lm(actor_path, dropout, trust)
            model.config.pad_token_id = self.tokenizer.pad_token_id
            return model

        def value_model(path: str, dropout: float | None):
            return load_reward_model(path, dropout, trust, pad_token_id=self.tokenizer.pad_token_id)

        self.specs = specs
        self.actor = build_engine(causal_lm(section.actor_dropout), specs["actor"], self.dist)
        self.reference = build_engine(causal_lm(0.0), specs["reference"], self.dist)
        self.ema = None
        if section.enable_ema:
            self.ema = build_engine(causal_lm(0.0), specs["ema"], self.dist)
            self.update_ema(beta=0.0)  # start as a copy of the actor (LoRA weights are random)
        self.critic = build_engine(value_model(critic_path, section.critic_dropout), specs["critic"], self.dist)
        reward_path = section.reward_model_name_or_path or critic_path
        self.reward = build_engine(value_model(reward_path, 0.0), specs["reward"], self.dist)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.loader) / self.section.generation_batches)

    def engines(self) -> dict[str, Any]:
        return {"actor": self.actor, "critic": self.critic}

    def describe(self) -> str:
        s = self.section
        return (
            f"stage ppo: {len(self.data.train)} prompts, world size {self.dist.world_size}, "
            f"{self.steps_per_epoch()} steps/epoch × {s.num_train_epochs} epochs, actor ZeRO {s.actor_zero_stage}, "
            f"critic ZeRO {s.critic_zero_stage}, {s.dtype}, EMA {'on' if s.enable_ema else 'off'}, PTX "
            f"{'on' if self.ptx_loader is not None else 'off'}, sampling {'on' if s.do_sample else 'off'}"
        )

    # -- state -------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"ptx_epoch": self.ptx_epoch, "ptx_position": self.ptx_position, "reward_ema": self.reward_ema}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ptx_epoch = state.get("ptx_epoch", 0)
        self.ptx_position = state.get("ptx_position", 0)
        self.reward_ema = state.get("reward_ema")

    def rank_state(self) -> dict[str, Any]:
        """This rank's EMA tensors (its partitions under ZeRO-3)."""
        if self.ema is None:
            return {}
        return {
            "ema": {
                str(i): getattr(p, "ds_tensor", p).detach().cpu().clone()
                for i, p in enumerate(self.ema.module.parameters())
            }
        }

    def load_rank_state(self, state: dict[str, Any]) -> None:
        import torch

        saved = state.get("ema", {})
        if self.ema is None or not saved:
            return
        with torch.no_grad():
            for i, param in enumerate(self.ema.module.parameters()):
                target = getattr(param, "ds_tensor", param)
                target.data.copy_(saved[str(i)].to(target.device, target.dtype))

    # -- one step ------------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, position: int) -> None:
        self.loader.sampler.set_epoch(epoch)
        self.batches = iter(self.loader)
        for _ in range(position):
            next(self.batches)
        self.position = position

    def train_step(self) -> StepResult | None:
        """Collect ``generation_batches`` experience batches (fewer at the end of the epoch), then update."""
        for prompt_ids, prompt_mask in self.batches:
            self.position += 1
            exp = self.make_experience(prompt_ids.to(self.dist.device), prompt_mask.to(self.dist.device))
            check_finite(
                self.dist.device,
                **{
                    "reward-model scores": exp.scores,
                    "rewards": exp.rewards,
                    "advantages": exp.advantages,
                    "values": exp.old_values,
                },
            )
            self.buffer.append(exp)
            if len(self.buffer) == self.section.generation_batches:
                break
        if not self.buffer:
            return None
        start = time.monotonic()
        losses = self.train_on(self.buffer)
        values = self.step_metrics(self.buffer, time.monotonic() - start, losses)
        self.reward_ema = (
            values["reward"] if self.reward_ema is None else 0.9 * self.reward_ema + 0.1 * values["reward"]
        )
        values["reward_ema"] = self.reward_ema
        self.drop_partial()
        return StepResult(values)

    def drop_partial(self) -> None:
        self.buffer = []
        self.timings = {"generation": 0.0, "scoring": 0.0}

    def progress(self, values: dict[str, Any]) -> str:
        return (
            f"reward {values['reward']:.3f} kl {values['kl']:.4f} actor_loss {values['train/actor_loss']:.4f} "
            f"critic_loss {values['train/critic_loss']:.4f} len {values['response_len']:.1f} "
            f"gen {values['time/generation_s']:.2f}s score {values['time/scoring_s']:.2f}s "
            f"train {values['time/training_s']:.2f}s tok/s {values['time/generated_tokens_per_s']:.0f}"
        )

    # -- experience ------------------------------------------------------------------------------------------
    def answer_logprobs(self, engine, sequences, attention_mask, positions, answer_len: int, fp32: bool):
        logits = engine(
            input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False
        ).logits[:, -answer_len - 1 : -1]
        return ppo_math.gather_logprobs(logits.float() if fp32 else logits, sequences[:, -answer_len:])

    def values(self, sequences, attention_mask, positions, answer_len: int):
        return token_values(self.critic, sequences, attention_mask, positions)[:, -answer_len - 1 : -1]

    def policy(self):
        """What generates: DeepSpeed's Hybrid Engine when enabled, else the actor's module."""
        return self.actor if self.section.enable_hybrid_engine else self.actor.module

    def synced(self) -> bool:
        return self.section.actor_zero_stage == 3 and self.dist.world_size > 1

    def make_experience(self, prompt_ids, prompt_mask) -> Experience:
        """Generate and score in eval mode (DeepSpeed-Chat scores after switching back to train mode, so dropout
        leaked into the old log-probs and values)."""
        import torch

        section = self.section
        self.actor.eval()
        self.critic.eval()
        start = time.monotonic()
        sequences, attention_mask, positions, action_mask = rollout(
            self.policy(), prompt_ids, prompt_mask, section, self.tokenizer, greedy=False, synced=self.synced()
        )
        self.timings["generation"] += time.monotonic() - start
        start = time.monotonic()
        answer_len = action_mask.shape[1]
        fp32 = section.compute_fp32_loss
        with torch.no_grad():
            old_logprobs = self.answer_logprobs(self.actor, sequences, attention_mask, positions, answer_len, fp32)
            ref_logprobs = self.answer_logprobs(self.reference, sequences, attention_mask, positions, answer_len, fp32)
            old_values = self.values(sequences, attention_mask, positions, answer_len).float()
            scores = reward_scores(self.reward, sequences, attention_mask, positions, action_mask)
        old_logprobs, ref_logprobs = old_logprobs.float(), ref_logprobs.float()
        mask = action_mask.float()
        rewards = ppo_math.shaped_rewards(
            old_logprobs, ref_logprobs, scores, mask, section.kl_ctl, section.clip_reward_value
        )
        advantages, returns = ppo_math.gae(rewards, old_values, mask, section.gamma, section.lam)
        self.actor.train()
        self.critic.train()
        self.timings["scoring"] += time.monotonic() - start
        return Experience(
            sequences,
            attention_mask,
            positions,
            mask,
            old_logprobs,
            ref_logprobs,
            old_values * mask,
            rewards,
            advantages,
            returns,
            scores,
        )

    # -- updates ---------------------------------------------------------------------------------------------
    def ppo_step(self, exp: Experience) -> dict[str, float]:
        section = self.section
        answer_len = exp.action_mask.shape[1]
        logprobs = self.answer_logprobs(
            self.actor, exp.input_ids, exp.attention_mask, exp.position_ids, answer_len, fp32=True
        )
        actor_loss, ratio = ppo_math.actor_loss(
            logprobs, exp.old_logprobs, exp.advantages, exp.action_mask, section.cliprange
        )
        check_finite(self.dist.device, **{"actor loss": actor_loss})
        self.actor.backward(actor_loss)
        self.actor.step()
        values = self.values(exp.input_ids, exp.attention_mask, exp.position_ids, answer_len).float()
        critic_loss = ppo_math.critic_loss(
            values, exp.old_values, exp.returns, exp.action_mask, section.cliprange_value
        )
        check_finite(self.dist.device, **{"critic loss": critic_loss})
        self.critic.backward(critic_loss)
        self.critic.step()
        return {"actor_loss": float(actor_loss), "critic_loss": float(critic_loss), "ratio": float(ratio)}

    def next_ptx_batch(self):
        """The PTX loader cycles: a new shuffle each time it runs out."""
        assert self.ptx_loader is not None
        if self.ptx_iter is None:
            self.ptx_loader.sampler.set_epoch(self.ptx_epoch)
            self.ptx_iter = iter(self.ptx_loader)
            for _ in range(self.ptx_position):
                next(self.ptx_iter)
        try:
            batch = next(self.ptx_iter)
        except StopIteration:
            self.ptx_epoch, self.ptx_position, self.ptx_iter = self.ptx_epoch + 1, 0, None
            return self.next_ptx_batch()
        self.ptx_position += 1
        return batch

    def ptx_step(self) -> float:
        """The unsupervised LM loss, scaled by unsup_coef, right after each PPO micro-step (InstructGPT's PPO-ptx)."""
        batch = to_device(self.next_ptx_batch(), self.dist.device)
        loss = self.actor(**batch, use_cache=False).loss
        check_finite(self.dist.device, **{"ptx loss": loss})
        self.actor.backward(self.section.unsup_coef * loss)
        self.actor.step()
        return float(loss)

    def train_on(self, buffer: list[Experience]) -> dict[str, float]:
        """ppo_epochs passes over the buffer's micro-batches, reshuffled after each pass."""
        section = self.section
        micro = [m for exp in buffer for m in exp.split(section.per_device_training_batch_size)]
        totals: dict[str, float] = {}
        if section.actor_gradient_checkpointing:  # on only for updates: generation runs without it
            self.actor.module.gradient_checkpointing_enable()
            if section.actor_lora_dim:
                self.actor.module.enable_input_require_grads()
        for epoch in range(section.ppo_epochs):
            for exp in micro:
                result = self.ppo_step(exp)
                if self.ptx_loader is not None:
                    result["ptx_loss"] = self.ptx_step()
                self.update_ema()
                for key, value in result.items():
                    totals[key] = totals.get(key, 0.0) + value
            if epoch + 1 < section.ppo_epochs:
                random.Random(self.config.seed + epoch).shuffle(micro)
        if section.actor_gradient_checkpointing:
            self.actor.module.gradient_checkpointing_disable()
        count = len(micro) * section.ppo_epochs
        return {f"train/{k}": v / count for k, v in totals.items()}

    def update_ema(self, beta: float | None = None) -> None:
        """ema ← β·ema + (1 − β)·actor on the trained parameters, partition by partition under ZeRO-3 (both
        engines partition alike, so each rank updates its own shard without gathering)."""
        import torch

        if self.ema is None:
            return
        beta = self.section.ema_beta if beta is None else beta
        with torch.no_grad():
            for param, ema_param in zip(self.actor.module.parameters(), self.ema.module.parameters(), strict=True):
                if not param.requires_grad:
                    continue
                source = getattr(param, "ds_tensor", param)
                target = getattr(ema_param, "ds_tensor", ema_param)
                target.data.mul_(beta).add_(source.data.to(target.dtype), alpha=1.0 - beta)

    def step_metrics(self, buffer: list[Experience], training_s: float, losses: dict[str, float]) -> dict[str, float]:
        """Means over all ranks of what the step produced."""
        answers = sum(float(e.action_mask.shape[0]) for e in buffer)
        tokens = sum(float(e.action_mask.sum()) for e in buffer)
        reward = sum(float(e.scores.sum()) for e in buffer)
        kl = sum(float(((e.old_logprobs - e.ref_logprobs) * e.action_mask).sum()) for e in buffer)
        shaped = sum(float(e.rewards.sum()) for e in buffer)
        advantage = sum(float((e.advantages * e.action_mask).sum()) for e in buffer)
        value = sum(float((e.old_values * e.action_mask).sum()) for e in buffer)
        answers, tokens, reward, kl, shaped, advantage, value = all_reduce_sum(
            [answers, tokens, reward, kl, shaped, advantage, value], self.dist.device
        )
        generation_s, scoring_s = self.timings["generation"], self.timings["scoring"]
        return {
            "reward": reward / answers,
            "kl": kl / answers,  # summed over each answer's tokens: KL(π_old ‖ π_ref) per answer, estimated
            "shaped_return": shaped / answers,
            "advantage": advantage / max(tokens, 1.0),
            "value": value / max(tokens, 1.0),
            "response_len": tokens / answers,
            **losses,
            "train/actor_lr": self.actor.get_lr()[0],
            "train/critic_lr": self.critic.get_lr()[0],
            "time/generation_s": generation_s,
            "time/scoring_s": scoring_s,  # old/reference log-probs, values and reward: the experience forwards
            "time/training_s": training_s,
            "time/generated_tokens_per_s": tokens / max(generation_s, 1e-9),  # all ranks generate at once
            "time/samples_per_s": answers / max(generation_s + scoring_s + training_s, 1e-9),  # whole step
            "train/memory_gib": memory_gib(self.dist),
        }

    # -- evaluation and outputs ------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy answers to the held-out prompts, scored by the reward model; the answers go to
        ``work/ppo/samples/step-N.jsonl`` so that a task's own judge can check them."""
        import torch.distributed as tdist

        self.actor.eval()
        result, records = greedy_eval(
            self.policy(), self.reward, self.eval_prompts, self.section, self.tokenizer, self.dist, self.synced()
        )
        self.actor.train()
        gathered: list[Any] = [records]
        if tdist.is_initialized():
            gathered = [None] * self.dist.world_size
            tdist.all_gather_object(gathered, records)
        if self.dist.rank == 0:
            path = self.samples_dir() / f"step-{step}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for part in gathered for r in part))
        return result

    def samples_dir(self) -> Path:
        assert self.section.output_dir
        return work_dir(self.section.output_dir) / "samples"

    def save_final(self, summary: dict[str, Any]) -> None:
        section, specs = self.section, self.specs
        assert section.output_dir
        out = Path(section.output_dir)
        save_final(
            self.actor.module,
            self.tokenizer,
            str(out / "actor"),
            section.actor_zero_stage,
            specs["actor"].lora_scaling,
            summary,
            with_logs=False,
        )
        save_final(
            self.critic.module,
            self.tokenizer,
            str(out / "critic"),
            section.critic_zero_stage,
            specs["critic"].lora_scaling,
            summary,
            with_logs=False,
        )
        if self.ema is not None:
            save_final(
                self.ema.module,
                self.tokenizer,
                str(out / "actor_ema"),
                specs["ema"].zero_stage,
                specs["ema"].lora_scaling,
                summary,
                with_logs=False,
            )
        mark_finished(str(out), summary)
        info(f"[ppo] saved actor{', actor_ema' if self.ema is not None else ''} and critic to {out}")


def run(config: RunConfig) -> int:
    section = config.ppo
    if not (section.actor_model_name_or_path and section.critic_model_name_or_path):
        from ..errors import UserError

        raise UserError("ppo: actor/critic paths must be resolved before the worker runs")
    return run_stage(PPOStage(config))
