"""Stage 3: PPO on the stage-1 actor against the stage-2 reward model (DeepSpeed-Chat's step 3).

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
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import PPO, RunConfig
from ..errors import EXIT_STOPPED, TrainingStopped, UserError
from ..launch import check_cpu_stage
from ..models import load_causal_lm, load_reward_model, load_tokenizer, token_values
from ..plugins import get_dataset_formats
from ..training import ppo_math
from ..training.batching import all_reduce_sum
from ..training.engine import Dist, apply_lora, init_distributed, make_engine, make_eval_engine, set_seed
from ..training.loop import make_loader, memory_gib, to_device
from ..training.outputs import (
    Checkpointer,
    Metrics,
    acknowledge_stop,
    check_not_finished,
    info,
    mark_finished,
    save_final,
    stop_requested,
    work_dir,
)


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


def left_pad(prompts: list[list[int]], pad_id: int):
    """Left-padded prompt batch (DeepSpeed-Chat's PPO collator), padded to the batch's longest prompt."""
    import torch

    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt) :] = 1
    return ids, mask


def total_update_steps(section: PPO, prompt_batches: int) -> int:
    """Optimizer steps for the schedules: DeepSpeed-Chat's formula."""
    micro_per_batch = math.ceil(section.per_device_generation_batch_size / section.per_device_training_batch_size)
    micro = section.num_train_epochs * prompt_batches * micro_per_batch * section.ppo_epochs
    return max(1, micro // section.gradient_accumulation_steps)


class RLHFEngines:
    """Builds and holds the five models, and does generation and EMA."""

    def __init__(self, config: RunConfig, dist: Dist, tokenizer, total_steps: int, ptx: bool) -> None:
        section = config.ppo
        self.section, self.dist, self.tokenizer = section, dist, tokenizer
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        trust = config.trust_remote_code
        micro = section.per_device_training_batch_size
        frozen_zero = section.actor_zero_stage if section.actor_zero_stage == 3 else 0
        reward_zero = section.critic_zero_stage if section.critic_zero_stage == 3 else 0

        actor = self._causal_lm(section.actor_model_name_or_path, section.actor_dropout, trust)
        if section.actor_lora_dim:
            actor = apply_lora(
                actor, section.actor_lora_dim, section.actor_lora_module_name, section.only_optimize_lora
            )
        hybrid = {}
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
        # With PTX each micro-batch backpropagates twice before one optimizer update (DeepSpeed-Chat).
        actor_accum = section.gradient_accumulation_steps * (2 if ptx else 1)
        self.actor = make_engine(
            actor,
            lr=section.actor_learning_rate,
            weight_decay=section.actor_weight_decay,
            lora_lr=section.actor_lora_learning_rate,
            scheduler_type=section.lr_scheduler_type,
            warmup=section.num_warmup_steps,
            total_steps=total_steps,
            micro_batch=micro,
            grad_accum=actor_accum,
            zero_stage=section.actor_zero_stage,
            dtype=section.dtype,
            offload=section.offload,
            dist=dist,
            extra_config=hybrid,
        )
        self.ref = make_eval_engine(
            self._causal_lm(section.actor_model_name_or_path, 0.0, trust),
            micro_batch=micro,
            zero_stage=frozen_zero,
            dtype=section.dtype,
            offload=section.offload_reference_model,
            dist=dist,
        )
        self.ema = None
        if section.enable_ema:
            ema = self._causal_lm(section.actor_model_name_or_path, 0.0, trust)
            if section.actor_lora_dim:  # the same adapters, so that parameters line up one to one
                ema = apply_lora(
                    ema, section.actor_lora_dim, section.actor_lora_module_name, section.only_optimize_lora
                )
            self.ema = make_eval_engine(
                ema,
                micro_batch=micro,
                zero_stage=frozen_zero,
                dtype=section.dtype,
                offload=section.offload_reference_model,
                dist=dist,
            )
            self.update_ema(beta=0.0)  # start as a copy of the actor (LoRA weights are random)

        critic = load_reward_model(
            section.critic_model_name_or_path, section.critic_dropout, trust, pad_token_id=self.pad_id
        )
        if section.critic_gradient_checkpointing:
            critic.gradient_checkpointing_enable()
        if section.critic_lora_dim:
            critic = apply_lora(
                critic,
                section.critic_lora_dim,
                section.critic_lora_module_name,
                section.only_optimize_lora,
                always_trainable=("score",),
            )
            if section.critic_gradient_checkpointing:
                critic.enable_input_require_grads()
        self.critic = make_engine(
            critic,
            lr=section.critic_learning_rate,
            weight_decay=section.critic_weight_decay,
            lora_lr=section.critic_lora_learning_rate,
            scheduler_type=section.lr_scheduler_type,
            warmup=section.num_warmup_steps,
            total_steps=total_steps,
            micro_batch=micro,
            grad_accum=section.gradient_accumulation_steps,
            zero_stage=section.critic_zero_stage,
            dtype=section.dtype,
            offload=section.offload,
            dist=dist,
        )
        self.reward = make_eval_engine(
            load_reward_model(section.critic_model_name_or_path, 0.0, trust, pad_token_id=self.pad_id),
            micro_batch=micro,
            zero_stage=reward_zero,
            dtype=section.dtype,
            offload=section.offload_reward_model,
            dist=dist,
        )

    def _causal_lm(self, path: str, dropout: float | None, trust: bool):
        model = load_causal_lm(path, dropout, trust)
        model.config.pad_token_id = self.pad_id
        return model

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, prompt_ids, prompt_mask, greedy: bool):
        """Answers for a left-padded prompt batch: [B, P + T]. Ranks stay in step under ZeRO-3 (synced_gpus),
        which users of DeepSpeed-Chat found hanging without it."""
        import torch

        section = self.section
        kwargs: dict[str, Any] = {
            "max_new_tokens": section.max_answer_seq_len,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_id,
            "use_cache": section.generation_kv_cache,
            "synced_gpus": section.actor_zero_stage == 3 and self.dist.world_size > 1,
        }
        if greedy or not section.do_sample:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=section.temperature, top_k=section.top_k, top_p=section.top_p)
        generator = self.actor if section.enable_hybrid_engine else self.actor.module
        with torch.no_grad():
            return generator.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)

    def rollout(self, prompt_ids, prompt_mask, greedy: bool = False):
        """(sequences, full attention mask, position ids, answer mask)."""
        import torch

        sequences = self.generate(prompt_ids, prompt_mask, greedy)
        answer = sequences[:, prompt_ids.shape[1] :]
        action_mask = ppo_math.answer_mask(answer, self.eos_id)
        attention_mask = torch.cat([prompt_mask, action_mask], dim=1)
        return sequences, attention_mask, ppo_math.position_ids(attention_mask), action_mask

    def score(self, sequences, attention_mask, positions, action_mask):
        """The reward model's score at each answer's last real token."""
        values = token_values(self.reward, sequences, attention_mask, positions)
        prompt_len = sequences.shape[1] - action_mask.shape[1]
        last = prompt_len + action_mask.sum(dim=1) - 1
        return values.gather(1, last.unsqueeze(1)).squeeze(1).float()

    def answer_logprobs(self, engine, sequences, attention_mask, positions, answer_len: int, fp32: bool):
        logits = engine(
            input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False
        ).logits[:, -answer_len - 1 : -1]
        return ppo_math.gather_logprobs(logits.float() if fp32 else logits, sequences[:, -answer_len:])

    def values(self, sequences, attention_mask, positions, answer_len: int):
        return token_values(self.critic, sequences, attention_mask, positions)[:, -answer_len - 1 : -1]

    # -- EMA -------------------------------------------------------------------------------------------------
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

    def ema_state(self) -> dict[str, Any]:
        """This rank's EMA tensors (its partitions under ZeRO-3), for checkpoints."""
        if self.ema is None:
            return {}
        return {
            str(i): getattr(p, "ds_tensor", p).detach().cpu().clone()
            for i, p in enumerate(self.ema.module.parameters())
        }

    def load_ema_state(self, state: dict[str, Any]) -> None:
        import torch

        if self.ema is None or not state:
            return
        with torch.no_grad():
            for i, param in enumerate(self.ema.module.parameters()):
                target = getattr(param, "ds_tensor", param)
                target.data.copy_(state[str(i)].to(target.device, target.dtype))


class NonFinite(Exception):
    """A quantity that must be finite is not; carries what and where."""


class PPOTrainer:
    """Experience, updates, evaluation and logging over the engines."""

    def __init__(self, config: RunConfig, dist: Dist, engines: RLHFEngines, ptx_loader) -> None:
        self.config, self.section, self.dist, self.engines = config, config.ppo, dist, engines
        self.ptx_loader = ptx_loader
        self.ptx_iter = None
        self.ptx_epoch = 0
        self.ptx_position = 0  # batches drawn in this PTX epoch: a resumed run skips them

    # -- checks ----------------------------------------------------------------------------------------------
    def all_finite(self, **tensors) -> None:
        """Raise :class:`NonFinite` on every rank when any rank holds a NaN or inf in any of ``tensors``."""
        import torch

        bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
        flags = all_reduce_sum([1.0 if name in bad else 0.0 for name in tensors], self.dist.device)
        names = [name for name, flag in zip(tensors, flags, strict=True) if flag > 0]
        if names:
            raise NonFinite(", ".join(names))

    # -- experience ------------------------------------------------------------------------------------------
    def make_experience(self, prompt_ids, prompt_mask) -> tuple[Experience, float, float]:
        """Generate and score in eval mode (DeepSpeed-Chat scores after switching back to train mode, so dropout
        leaked into the old log-probs and values)."""
        import torch

        engines, section = self.engines, self.section
        engines.actor.eval()
        engines.critic.eval()
        start = time.monotonic()
        sequences, attention_mask, positions, action_mask = engines.rollout(prompt_ids, prompt_mask)
        generation_s = time.monotonic() - start
        start = time.monotonic()
        answer_len = action_mask.shape[1]
        with torch.no_grad():
            old_logprobs = engines.answer_logprobs(
                engines.actor, sequences, attention_mask, positions, answer_len, section.compute_fp32_loss
            )
            ref_logprobs = engines.answer_logprobs(
                engines.ref, sequences, attention_mask, positions, answer_len, section.compute_fp32_loss
            )
            old_values = engines.values(sequences, attention_mask, positions, answer_len).float()
            scores = engines.score(sequences, attention_mask, positions, action_mask)
        old_logprobs, ref_logprobs = old_logprobs.float(), ref_logprobs.float()
        mask = action_mask.float()
        rewards = ppo_math.shaped_rewards(
            old_logprobs, ref_logprobs, scores, mask, section.kl_ctl, section.clip_reward_value
        )
        advantages, returns = ppo_math.gae(rewards, old_values, mask, section.gamma, section.lam)
        engines.actor.train()
        engines.critic.train()
        experience = Experience(
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
        return experience, generation_s, time.monotonic() - start

    # -- updates ---------------------------------------------------------------------------------------------
    def ppo_step(self, exp: Experience) -> dict[str, float]:
        engines, section = self.engines, self.section
        answer_len = exp.action_mask.shape[1]
        logprobs = engines.answer_logprobs(
            engines.actor, exp.input_ids, exp.attention_mask, exp.position_ids, answer_len, fp32=True
        )
        actor_loss, ratio = ppo_math.actor_loss(
            logprobs, exp.old_logprobs, exp.advantages, exp.action_mask, section.cliprange
        )
        self.all_finite(**{"actor loss": actor_loss})
        engines.actor.backward(actor_loss)
        engines.actor.step()
        values = engines.values(exp.input_ids, exp.attention_mask, exp.position_ids, answer_len).float()
        critic_loss = ppo_math.critic_loss(
            values, exp.old_values, exp.returns, exp.action_mask, section.cliprange_value
        )
        self.all_finite(**{"critic loss": critic_loss})
        engines.critic.backward(critic_loss)
        engines.critic.step()
        return {"actor_loss": float(actor_loss), "critic_loss": float(critic_loss), "ratio": float(ratio)}

    def next_ptx_batch(self):
        """The PTX loader cycles: a new shuffle each time it runs out."""
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
        loss = self.engines.actor(**batch, use_cache=False).loss
        self.all_finite(**{"ptx loss": loss})
        self.engines.actor.backward(self.section.unsup_coef * loss)
        self.engines.actor.step()
        return float(loss)

    def train_on(self, buffer: list[Experience]) -> dict[str, float]:
        """ppo_epochs passes over the buffer's micro-batches, reshuffled after each pass."""
        section, engines = self.section, self.engines
        micro = [m for exp in buffer for m in exp.split(section.per_device_training_batch_size)]
        totals: dict[str, float] = {}
        if section.actor_gradient_checkpointing:  # on only for updates: generation runs without it
            engines.actor.module.gradient_checkpointing_enable()
            if section.actor_lora_dim:
                engines.actor.module.enable_input_require_grads()
        for epoch in range(section.ppo_epochs):
            for exp in micro:
                result = self.ppo_step(exp)
                if self.ptx_loader is not None:
                    result["ptx_loss"] = self.ptx_step()
                engines.update_ema()
                for key, value in result.items():
                    totals[key] = totals.get(key, 0.0) + value
            if epoch + 1 < section.ppo_epochs:
                random.Random(self.config.seed + epoch).shuffle(micro)
        if section.actor_gradient_checkpointing:
            engines.actor.module.gradient_checkpointing_disable()
        count = len(micro) * section.ppo_epochs
        return {f"train/{k}": v / count for k, v in totals.items()}

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, prompts: list[list[int]], texts_out: Path | None) -> dict[str, float]:
        """Greedy answers to held-out prompts, scored by the reward model: ``eval/reward``. The answers go to
        ``texts_out`` (JSONL on rank 0) so that a task's own judge can check them."""
        import torch
        import torch.distributed as tdist

        engines, dist = self.engines, self.dist
        mine = prompts[dist.rank :: dist.world_size]
        records, total, length = [], 0.0, 0.0
        engines.actor.eval()
        size = self.section.per_device_generation_batch_size
        # Every rank runs the same number of batches: generation under ZeRO-3 is collective.
        batches = math.ceil(math.ceil(len(prompts) / dist.world_size) / size)
        for i in range(batches):
            chunk = mine[i * size : (i + 1) * size] or prompts[:1]
            count_it = bool(mine[i * size : (i + 1) * size])
            ids, mask = left_pad(chunk, engines.pad_id)
            ids, mask = ids.to(dist.device), mask.to(dist.device)
            with torch.no_grad():
                sequences, attention_mask, positions, action_mask = engines.rollout(ids, mask, greedy=True)
                scores = engines.score(sequences, attention_mask, positions, action_mask)
            if not count_it:
                continue
            total += float(scores.sum())
            length += float(action_mask.sum())
            answer_ids = sequences[:, ids.shape[1] :].masked_fill(action_mask == 0, engines.pad_id)
            answers = engines.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
            prompt_texts = engines.tokenizer.batch_decode(ids, skip_special_tokens=True)
            records += [
                {"prompt": p, "answer": a, "reward": float(s)}
                for p, a, s in zip(prompt_texts, answers, scores.tolist(), strict=True)
            ]
        engines.actor.train()
        total, length = all_reduce_sum([total, length], dist.device)
        if texts_out is not None:
            gathered: list[Any] = [None] * dist.world_size
            tdist.all_gather_object(gathered, records)
            if dist.rank == 0:
                texts_out.parent.mkdir(parents=True, exist_ok=True)
                texts_out.write_text("".join(json.dumps(r) + "\n" for part in gathered for r in part))
        return {"eval/reward": total / len(prompts), "eval/response_len": length / len(prompts)}


def run(config: RunConfig) -> int:
    import torch

    from ..data.pipeline import load_ptx_data, load_stage_data

    section = config.ppo
    dist = init_distributed()
    set_seed(config.seed)
    if dist.accelerator == "cpu":  # what only the worker sees: the accelerator it actually got
        check_cpu_stage(config, "ppo")
    if not (section.actor_model_name_or_path and section.critic_model_name_or_path and section.output_dir):
        raise UserError("ppo: actor/critic paths and output_dir must be resolved before the worker runs")
    check_not_finished("ppo", section.output_dir, section.overwrite)
    tokenizer = load_tokenizer(section.actor_model_name_or_path, config.trust_remote_code)
    data = load_stage_data(config, "ppo", tokenizer, get_dataset_formats())
    ptx = config.data.unsupervised_dataset_name is not None

    pad_id = tokenizer.pad_token_id

    def collate(rows):
        return left_pad([r["prompt_input_ids"] for r in rows], pad_id)

    loader = make_loader(data.train, section.per_device_generation_batch_size, collate, dist, config.seed)
    sampler = loader.sampler
    ptx_loader = None
    if ptx:
        blocks = load_ptx_data(config, tokenizer).with_format("torch")

        def collate_ptx(rows):
            ids = torch.stack([r["input_ids"] for r in rows])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

        ptx_loader = make_loader(blocks, section.per_device_training_batch_size, collate_ptx, dist, config.seed)
    eval_source = data.eval if data.eval is not None and len(data.eval) else data.train
    eval_prompts = [
        list(r) for r in eval_source.select(range(min(section.eval_prompts, len(eval_source))))["prompt_input_ids"]
    ]

    total_steps = total_update_steps(section, len(loader))
    engines = RLHFEngines(config, dist, tokenizer, total_steps, ptx)
    trainer = PPOTrainer(config, dist, engines, ptx_loader)

    checkpointer = Checkpointer(section.output_dir, section.keep_last)
    state: dict[str, Any] = {
        "epoch": 0,
        "batch": 0,
        "global_step": 0,
        "ptx_epoch": 0,
        "ptx_position": 0,
        "reward_ema": None,
    }
    if section.resume == "auto":
        restored = checkpointer.load({"actor": engines.actor, "critic": engines.critic})
        if restored:
            engines.load_ema_state(restored.pop("rank_state", {}).get("ema", {}))
            state = restored
            info(f"resumed ppo from {checkpointer.latest()} (epoch {state['epoch'] + 1}, step {state['global_step']})")
    trainer.ptx_epoch, trainer.ptx_position = state["ptx_epoch"], state["ptx_position"]
    metrics = Metrics(section.output_dir, section.enable_tensorboard, resume_step=state["global_step"])
    samples_dir = work_dir(section.output_dir) / "samples"
    steps_per_epoch = len(loader)
    total_gen_steps = steps_per_epoch * section.num_train_epochs
    info(
        f"stage ppo: {len(data.train)} prompts, world size {dist.world_size}, {steps_per_epoch} generation "
        f"steps/epoch × {section.num_train_epochs} epochs, actor ZeRO {section.actor_zero_stage}, critic ZeRO "
        f"{section.critic_zero_stage}, {section.dtype}, EMA {'on' if section.enable_ema else 'off'}, PTX "
        f"{'on' if ptx else 'off'}, sampling {'on' if section.do_sample else 'off'}"
    )

    def evaluate(label: str) -> dict[str, float]:
        step = state["global_step"]
        result = trainer.evaluate(eval_prompts, samples_dir / f"step-{step}.jsonl")
        metrics.log(
            step,
            result,
            echo=f"[ppo] eval {label}: reward {result['eval/reward']:.4f} "
            f"response_len {result['eval/response_len']:.1f}",
        )
        return result

    def save() -> None:
        checkpointer.save(
            {"actor": engines.actor, "critic": engines.critic},
            {**state, "ptx_epoch": trainer.ptx_epoch, "ptx_position": trainer.ptx_position},
            rank_state={"ema": engines.ema_state()},
        )

    if state["global_step"] == 0:
        state["eval_reward_before"] = evaluate("before training")["eval/reward"]
    last_eval: dict[str, float] = {}
    bar = tqdm(
        total=total_gen_steps,
        initial=state["global_step"],
        desc="ppo",
        unit="step",
        disable=dist.rank != 0 or not sys.stderr.isatty(),
    )
    buffer: list[Experience] = []
    generation_s = scoring_s = 0.0
    run_start, start_step = time.monotonic(), state["global_step"]
    for epoch in range(state["epoch"], section.num_train_epochs):
        sampler.set_epoch(epoch)
        skip = state["batch"] if epoch == state["epoch"] else 0
        for index, (prompt_ids, prompt_mask) in enumerate(loader):
            if index < skip:
                continue
            step = state["global_step"] + 1
            try:
                exp, seconds, scoring = trainer.make_experience(prompt_ids.to(dist.device), prompt_mask.to(dist.device))
                generation_s += seconds
                scoring_s += scoring
                trainer.all_finite(
                    **{
                        "reward-model scores": exp.scores,
                        "rewards": exp.rewards,
                        "advantages": exp.advantages,
                        "values": exp.old_values,
                    }
                )
                buffer.append(exp)
                if len(buffer) < section.generation_batches and index + 1 < len(loader):
                    state.update(epoch=epoch, batch=index + 1)
                    continue
                start = time.monotonic()
                losses = trainer.train_on(buffer)
                training_s = time.monotonic() - start
            except NonFinite as exc:
                where = f"step {step} (epoch {epoch + 1}, batch {index + 1})"
                if section.on_nonfinite == "stop":
                    raise TrainingStopped(
                        f"non-finite {exc} at {where}; fix: lower the learning rates, use bf16 or fp32 instead "
                        "of fp16, or set ppo.on_nonfinite=skip to drop such batches"
                    ) from None
                info(f"warning: skipped the batch at {where}: non-finite {exc}")
                buffer, generation_s, scoring_s = [], 0.0, 0.0
                state.update(epoch=epoch, batch=index + 1, global_step=step)
                continue
            values = step_metrics(buffer, generation_s, scoring_s, training_s, losses, engines, dist)
            ema = state["reward_ema"]
            state["reward_ema"] = values["reward"] if ema is None else 0.9 * ema + 0.1 * values["reward"]
            values["reward_ema"] = state["reward_ema"]
            buffer, generation_s, scoring_s = [], 0.0, 0.0
            state.update(epoch=epoch, batch=index + 1, global_step=step)
            bar.update(1)
            if step % section.print_interval == 0 or step == total_gen_steps:
                done = step - start_step
                eta = (time.monotonic() - run_start) / max(1, done) * (total_gen_steps - step)
                metrics.log(
                    step,
                    values,
                    echo=(
                        f"[ppo] epoch {epoch + 1}/{section.num_train_epochs} step {step}/{total_gen_steps} "
                        f"reward {values['reward']:.3f} kl {values['kl']:.4f} "
                        f"actor_loss {values['train/actor_loss']:.4f} "
                        f"critic_loss {values['train/critic_loss']:.4f} len {values['response_len']:.1f} "
                        f"gen {values['time/generation_s']:.2f}s score {values['time/scoring_s']:.2f}s "
                        f"train {values['time/training_s']:.2f}s "
                        f"tok/s {values['time/generated_tokens_per_s']:.0f} eta {eta:.0f}s"
                    ),
                )
            if section.eval_interval and step % section.eval_interval == 0:
                last_eval = evaluate(f"step {step}")
            if section.save_interval and step % section.save_interval == 0:
                save()
            if stop_requested(dist.device):
                save()
                acknowledge_stop("ppo", step)
                return EXIT_STOPPED
        state.update(epoch=epoch + 1, batch=0)
        save()
    bar.close()
    if not last_eval or state["global_step"] % max(1, section.eval_interval):
        last_eval = evaluate("end")
    metrics.close()
    summary = {
        "stage": "ppo",
        "global_step": state["global_step"],
        **last_eval,
        "eval/reward_before": state.get("eval_reward_before"),
    }
    out = Path(section.output_dir)
    lora_scaling = 1.0 / section.actor_lora_dim if section.actor_lora_dim else None
    save_final(
        engines.actor.module,
        tokenizer,
        str(out / "actor"),
        section.actor_zero_stage,
        lora_scaling,
        summary,
        with_logs=False,
    )
    save_final(
        engines.critic.module,
        tokenizer,
        str(out / "critic"),
        section.critic_zero_stage,
        1.0 / section.critic_lora_dim if section.critic_lora_dim else None,
        summary,
        with_logs=False,
    )
    if engines.ema is not None:
        ema_zero = section.actor_zero_stage if section.actor_zero_stage == 3 else 0
        save_final(
            engines.ema.module, tokenizer, str(out / "actor_ema"), ema_zero, lora_scaling, summary, with_logs=False
        )
    mark_finished(str(out), summary, work_dir(section.output_dir))
    info(f"[ppo] saved actor{', actor_ema' if engines.ema is not None else ''} and critic to {out}")
    return 0


def step_metrics(
    buffer: list[Experience],
    generation_s: float,
    scoring_s: float,
    training_s: float,
    losses: dict[str, float],
    engines: RLHFEngines,
    dist: Dist,
) -> dict[str, float]:
    """Means over all ranks of what the step produced."""
    answers = sum(float(e.action_mask.shape[0]) for e in buffer)
    tokens = sum(float(e.action_mask.sum()) for e in buffer)
    reward = sum(float(e.scores.sum()) for e in buffer)
    kl = sum(float(((e.old_logprobs - e.ref_logprobs) * e.action_mask).sum()) for e in buffer)
    shaped = sum(float(e.rewards.sum()) for e in buffer)
    advantage = sum(float((e.advantages * e.action_mask).sum()) for e in buffer)
    value = sum(float((e.old_values * e.action_mask).sum()) for e in buffer)
    answers, tokens, reward, kl, shaped, advantage, value = all_reduce_sum(
        [answers, tokens, reward, kl, shaped, advantage, value], dist.device
    )
    return {
        "reward": reward / answers,
        "kl": kl / answers,  # summed over each answer's tokens: KL(π_old ‖ π_ref) per answer, estimated
        "shaped_return": shaped / answers,
        "advantage": advantage / max(tokens, 1.0),
        "value": value / max(tokens, 1.0),
        "response_len": tokens / answers,
        **losses,
        "train/actor_lr": engines.actor.get_lr()[0],
        "train/critic_lr": engines.critic.get_lr()[0],
        "time/generation_s": generation_s,
        "time/scoring_s": scoring_s,  # old/reference log-probs, values and reward: the experience forwards
        "time/training_s": training_s,
        "time/generated_tokens_per_s": tokens / max(generation_s, 1e-9),  # all ranks generate at once
        "time/samples_per_s": answers / max(generation_s + scoring_s + training_s, 1e-9),  # prompts, whole step
        "train/memory_gib": memory_gib(dist),
    }
