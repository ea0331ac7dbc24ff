"""From a validated run config to launch plans, and through a backend to jobs.

Platform-agnostic: what differs per platform is behind :class:`~dschat_core.backend.Backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backend import Backend, JobStatus, LaunchPlan
from .config import STAGES, RunConfig
from .errors import MISSING, ConfigError, JobFailed, UserError

ALL_STAGES = ("preflight", *STAGES)
STAGE_CHOICES = (*ALL_STAGES, "all")

#: Stage 3 runs on the outputs of stages 1 and 2.
DEPENDS_ON = {"ppo": ("sft", "reward")}


def check_stage(config: RunConfig, stage: str, chained: bool = False) -> None:
    """Platform-independent checks that a stage can run with this config (raise ConfigError)."""
    if stage == "preflight":
        return
    share = config.data.split_shares[STAGES.index(stage)]
    if share == 0 and not (stage == "sft" and config.data.sft_only_data_path):
        raise ConfigError(
            "data.data_split",
            config.data.data_split,
            f"gives stage '{stage}' no data",
            "give every stage you run a non-zero share, e.g. 2,4,4",
        )
    if stage in ("sft", "reward") and not getattr(config, stage).model_name_or_path:
        raise ConfigError(
            f"{stage}.model_name_or_path",
            MISSING,
            "is required for stage " + stage,
            f"set it to a hub id or a local model folder (--set {stage}.model_name_or_path=...)",
        )
    if stage == "ppo" and not chained:
        for key, source in (("actor_model_name_or_path", "sft"), ("critic_model_name_or_path", "reward")):
            if getattr(config.ppo, key) is None and not getattr(config, source).model_name_or_path:
                raise ConfigError(
                    f"ppo.{key}",
                    MISSING,
                    f"is not set and stage {source} has no model to train",
                    f"set ppo.{key} to stage {source}'s output folder",
                )


#: Stage 3 features that need DeepSpeed's CUDA kernels.
GPU_ONLY_PPO = ("enable_hybrid_engine", "enable_mixed_precision_lora")


def check_cpu_stage(config: RunConfig, stage: str) -> None:
    """What a stage cannot do on CPU ranks; for backends (and the worker) once they know the ranks are CPUs."""
    if stage in STAGES and config.stage(stage).dtype == "fp16":
        raise ConfigError(
            f"{stage}.dtype",
            "fp16",
            "DeepSpeed cannot train in fp16 on the CPU",
            f"set {stage}.dtype to bf16 or fp32 (--set {stage}.dtype=fp32)",
        )
    if stage == "ppo":
        for key in GPU_ONLY_PPO:
            if getattr(config.ppo, key):
                raise ConfigError(
                    f"ppo.{key}",
                    True,
                    "needs a GPU (DeepSpeed's inference kernels)",
                    f"--set ppo.{key}=false on CPU ranks",
                )


def resolve(config: RunConfig, backend: Backend) -> RunConfig:
    """Fill every path the workers need from the backend's storage layout; stage 3 finds stages 1 and 2."""
    storage = backend.storage(config)
    resolved = config.model_copy(deep=True)
    resolved.output_dir = storage.run_dir(config)
    resolved.data.cache_dir = config.data.cache_dir or storage.cache
    for stage in STAGES:
        resolved.stage(stage).output_dir = storage.stage_output(resolved, stage)
    if resolved.ppo.actor_model_name_or_path is None:
        resolved.ppo.actor_model_name_or_path = resolved.sft.output_dir
    if resolved.ppo.critic_model_name_or_path is None:
        resolved.ppo.critic_model_name_or_path = resolved.reward.output_dir
    if resolved.ppo.reward_model_name_or_path is None:
        resolved.ppo.reward_model_name_or_path = resolved.ppo.critic_model_name_or_path
    return resolved


def plan(config: RunConfig, backend: Backend, stage: str, chained: bool = False) -> LaunchPlan:
    """Validate and build the launch plan of one stage (``chained``: stages 1 and 2 run first)."""
    backend.settings(config)
    check_stage(config, stage, chained)
    resolved = resolve(config, backend)
    storage = backend.storage(resolved)
    plan_ = LaunchPlan(
        stage=stage,
        job_name=f"{config.run_name}-{stage}",
        config=resolved,
        nodes=config.topology.nodes,
        procs_per_node=config.topology.gpus_per_node,
        output_dir=storage.stage_output(resolved, stage) if stage in STAGES else storage.run_dir(resolved),
        config_path=storage.config_file(resolved, stage),
    )
    deps = DEPENDS_ON.get(stage, ()) if chained else ()
    upcoming = frozenset(str(resolved.stage(dep).output_dir) for dep in deps)
    backend.validate(plan_, upcoming)
    return plan_


def stages_of(stage: str) -> tuple[str, ...]:
    if stage == "all":
        return STAGES
    if stage not in ALL_STAGES:
        raise UserError(f"unknown stage '{stage}'; fix: use one of {', '.join(STAGE_CHOICES)}")
    return (stage,)


@dataclass
class Submitted:
    stage: str
    job_id: str


def submit_stages(
    config: RunConfig,
    backend: Backend,
    stage: str,
    on_submit: Callable[[Submitted], None] | None = None,
    detach: bool = False,
) -> list[Submitted]:
    """Plan every stage first (so a bad config launches nothing), then submit in order, chaining stage 3
    after stages 1 and 2. A job that has already failed when control returns stops the chain."""
    names = stages_of(stage)
    chained = len(names) > 1
    plans = [plan(config, backend, name, chained) for name in names]
    for plan_ in plans:
        plan_.detach = detach
    submitted: dict[str, Submitted] = {}
    for plan_ in plans:
        after = [submitted[dep].job_id for dep in DEPENDS_ON.get(plan_.stage, ()) if dep in submitted]
        job_id = backend.submit(plan_, after=after)
        record = submitted[plan_.stage] = Submitted(plan_.stage, job_id)
        if on_submit:
            on_submit(record)
        status = backend.status(job_id)
        if status.finished and not status.succeeded and chained:
            raise JobFailed(f"stage {plan_.stage} ({status.describe()}); the chain stops here")
    return list(submitted.values())


def final_status(backend: Backend, submitted: list[Submitted], poll_seconds: float = 5.0) -> JobStatus:
    """Wait for every submitted job; raise JobFailed naming the first stage that did not succeed."""
    last = None
    for record in submitted:
        last = backend.wait(record.job_id, poll_seconds=poll_seconds)
        if not last.succeeded:
            raise JobFailed(f"stage {record.stage} did not succeed: {last.describe()}")
    assert last is not None
    return last
