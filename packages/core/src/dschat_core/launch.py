"""From a validated run config to launch plans, and through a backend to jobs.

Platform-agnostic: what differs per platform is behind :class:`~dschat_core.backend.Backend`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .backend import Backend, JobStatus, LaunchPlan
from .config import DATA_PHASES, PIPELINES, READS, STAGES, RunConfig
from .errors import MISSING, ConfigError, FinishedOutput, UserError, job_failed

ALL_STAGES = ("preflight", *STAGES)
STAGE_CHOICES = (*ALL_STAGES, "all")


def depends_on(config: RunConfig, stage: str) -> tuple[str, ...]:
    """The stages of the run's pipeline that ``stage`` starts from (stage 3: 1 and 2 in rlhf, 1 in rl; DPO: 1)."""
    pipeline = PIPELINES[config.pipeline]
    return tuple(dep for dep in READS.get(stage, ()) if dep in pipeline)


def _required(key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(key, MISSING, problem, fix)


def check_stage(config: RunConfig, stage: str, chained: bool = False, here: bool = True) -> None:
    """Platform-independent checks that a stage can run with this config (raise ConfigError); ``here``: the
    ranks run in this Python environment."""
    if stage == "preflight":
        return
    config = resolved_rewards(config)
    share = config.data.split_shares[DATA_PHASES[stage]]
    if share == 0 and not (stage == "sft" and config.data.sft_only_data_path):
        raise ConfigError(
            "data.data_split",
            config.data.data_split,
            f"gives stage '{stage}' no data",
            "give every stage you run a non-zero share, e.g. 2,4,4",
        )
    if stage in ("sft", "reward") and not getattr(config, stage).model_name_or_path:
        raise _required(
            f"{stage}.model_name_or_path",
            "is required for stage " + stage,
            f"set it to a hub id or a local model folder (--set {stage}.model_name_or_path=...)",
        )
    if stage == "ppo":
        check_rewards(config)
        if config.ppo.rollout_engine == "vllm" and here:
            check_vllm_installed()
        if config.ppo.enable_hybrid_engine and here:
            check_hybrid_engine()
        if config.ppo.environment.name is not None:
            check_environment(config)
    if stage in ("reward", "dpo"):
        check_pairs(config, stage)
    check_chat_template(config, stage)
    check_sinks(config, here)
    from .model_checks import check_models

    check_models(config, stage)
    upstream = set(depends_on(config, stage)) if chained else set()
    for key, value in config.model_inputs(stage).items():
        source = "reward" if key in ("ppo.critic_model_name_or_path", "ppo.reward_model_name_or_path") else "sft"
        if value is None and source not in upstream and not getattr(config, source).model_name_or_path:
            raise _required(
                key,
                f"is not set and stage {source} has no model to train",
                f"set {key} to stage {source}'s output folder, or run --stage all",
            )


def check_vllm_installed() -> None:
    """``ppo.rollout_engine: vllm`` where the ranks run in this environment: vLLM is installed here (on a cluster
    the image decides, and the ranks say it in one line)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from .stages.rl.engines.vllm import INSTALL

        raise ConfigError("ppo.rollout_engine", "vllm", "needs vLLM, which this environment lacks", INSTALL)


def check_environment(config: RunConfig) -> None:
    """``ppo.environment`` names a registered environment, with settings its model accepts."""
    from pydantic import ValidationError

    from .plugins import get_environments

    name, settings = config.ppo.environment.name, config.ppo.environment.settings
    known = get_environments()
    if name not in known:
        raise ConfigError(
            "ppo.environment.name",
            name,
            "is not a registered environment",
            f"use one of {', '.join(sorted(known))} (dschat-core environments), or install its plugin",
        )
    try:
        known[name].resolved(settings)
    except (ValidationError, TypeError) as exc:
        errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": ("settings",), "msg": str(exc)}]
        key = ".".join(str(part) for part in errors[0]["loc"])
        raise ConfigError(
            f"ppo.environment.settings.{key}",
            settings.get(key, MISSING),
            str(errors[0]["msg"]),
            f"see `dschat-core environments` for {name}'s settings",
        ) from None


def check_hybrid_engine() -> None:
    """DeepSpeed's Hybrid Engine swaps the actor's decoder layers for its inference kernels, written for
    transformers 4's layer interface: under transformers 5 the first generate fails inside them (seen on an H200:
    OPT, DeepSpeed 0.19.8, transformers 5.24, "'tuple' object has no attribute 'size'")."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        raise ConfigError(
            "ppo.enable_hybrid_engine",
            True,
            f"DeepSpeed's Hybrid Engine kernels do not run with transformers {transformers.__version__} (written "
            "for transformers 4)",
            "--set ppo.enable_hybrid_engine=false (transformers' generate), or ppo.rollout_engine=vllm on GPUs",
        )


def check_pairs(config: RunConfig, stage: str) -> None:
    """Stages 2 and DPO compare a chosen with a rejected answer: a dataset whose format has none (prompt/answer,
    demonstrations) is refused before launch, where its format can be told without loading it."""
    from .data.loading import peek_format
    from .plugins import get_dataset_formats

    formats = get_dataset_formats()
    for source in config.data.data_path:
        fmt = peek_format(source, formats)
        if fmt is not None and not fmt.pairwise:
            raise ConfigError(
                "data.data_path",
                source,
                f"is {fmt.name} data, with no rejected answers, so it cannot train stage {stage}",
                "give pairs (prompt/chosen/rejected), or list it under data.sft_only_data_path for stage 1",
            )


def has_chat_template(folder: Path) -> bool:
    """Whether a local model folder's tokenizer has a chat template (in its config, or as its own file)."""
    import json

    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return True  # no readable tokenizer config: the ranks load the tokenizer and say what is wrong


def check_chat_template(config: RunConfig, stage: str) -> None:
    """Conversational data needs a chat template: ``data.chat_template``, or the stage's tokenizer's own, where
    that tokenizer is a local folder (a hub tokenizer is checked when the ranks load it)."""
    from .data.loading import peek_format
    from .data.pipeline import TEMPLATE_FIX
    from .plugins import get_dataset_formats

    if config.data.chat_template is not None:
        return
    formats = get_dataset_formats()
    sources = [*config.data.data_path, *(config.data.sft_only_data_path if stage == "sft" else [])]
    conversational = [s for s in sources if (fmt := peek_format(s, formats)) is not None and fmt.conversational]
    section = config.stage(stage)
    model = (
        getattr(section, "model_name_or_path", None)
        or getattr(section, "actor_model_name_or_path", None)
        or config.sft.model_name_or_path  # stages after stage 1 use its tokenizer, which it saves with its model
    )
    if conversational and model and Path(model).is_dir() and not has_chat_template(Path(model)):
        raise ConfigError(
            "data.chat_template",
            None,
            f"dataset {conversational[0]} is conversational and the tokenizer in {model} has no chat template",
            TEMPLATE_FIX,
        )


def check_sinks(config: RunConfig, here: bool = True) -> None:
    """Every tracking sink is registered, and (``here``: the ranks run in this environment) has its package; on
    a cluster the image decides, and a sink that cannot start there stops the job in one line."""
    from .plugins import get_metric_sinks
    from .tracking import missing_package

    known = get_metric_sinks()
    for name in config.tracking.sinks:
        if name not in known:
            raise ConfigError(
                "tracking.sinks",
                config.tracking.sinks,
                f"{name!r} is not a registered metric sink",
                f"use some of {', '.join(sorted(known))} (dschat-core sinks), or install its plugin",
            )
        problem = missing_package(known[name]) if here else ""
        if problem:
            raise UserError(problem)


def check_rewards(config: RunConfig) -> None:
    """Stage 3 has something to score with, and every reward function it names is registered (``config`` with
    :func:`resolved_rewards` applied)."""
    from .plugins import get_reward_functions
    from .rewards import SettingError, parse_spec

    section = config.ppo
    known = get_reward_functions()
    for name, spec in section.reward_functions.items():
        if name not in known:
            raise ConfigError(
                f"ppo.reward_functions.{name}",
                spec,
                "is not a registered reward function",
                f"use one of {', '.join(sorted(known))} (dschat-core rewards), or install its plugin",
            )
        weight, settings = parse_spec(spec)
        if not math.isfinite(weight):
            raise ConfigError(f"ppo.reward_functions.{name}.weight", weight, "is not a finite number", "use a number")
        try:
            known[name].check_settings(settings)
        except SettingError as exc:
            raise ConfigError(
                f"ppo.reward_functions.{name}.{exc.key}",
                settings.get(exc.key, MISSING),
                exc.problem,
                f"see `dschat-core rewards` for {name}'s settings",
            ) from None
    if not section.uses_reward_model and not section.reward_functions:
        raise ConfigError(
            "ppo.reward_functions",
            {},
            "stage 3 has no reward: no reward model and no function",
            "name functions (e.g. {gsm8k: 1.0}) or give a reward model weight above 0",
        )
    if section.uses_reward_model and config.pipeline == "rl" and not section.reward_model_name_or_path:
        raise _required(
            "ppo.reward_model_name_or_path",
            "the rl pipeline trains no reward model",
            "set ppo.reward_model_weight=0 to score with functions only, or point at a reward model",
        )


def resolved_rewards(config: RunConfig) -> RunConfig:
    """``reward_model_weight`` null means a reward model only where the pipeline trains one."""
    if config.ppo.reward_model_weight is not None:
        return config
    weight = 1.0 if "reward" in PIPELINES[config.pipeline] or config.ppo.reward_model_name_or_path else 0.0
    resolved = config.model_copy(deep=True)
    resolved.ppo.reward_model_weight = weight
    return resolved


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


#: The processor flags of bf16 matrix units (Linux's /proc/cpuinfo): Intel AMX, and AVX-512's bf16 dot products.
BF16_UNITS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This processor's feature flags, where the system says (None elsewhere)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_bf16_warning(config: RunConfig, stage: str, flags: set[str] | None) -> str:
    """A warning line for ``dtype: bf16`` on CPU ranks whose processor has no bf16 matrix units: PyTorch then
    runs bf16 matmuls without them, far slower than fp32 (measured on an AVX2 EPYC: 0.01-0.02x, benchmarks/
    results/matmul.md); empty where the units are there or the flags are unknown."""
    if stage not in STAGES or config.stage(stage).dtype != "bf16" or flags is None:
        return ""
    if any(unit in flags for unit in BF16_UNITS):
        return ""
    return (
        f"warning: {stage}.dtype = bf16 on a processor without bf16 matrix units (no {' or '.join(BF16_UNITS)}): "
        "its bf16 matmuls run far slower than fp32 (python -m benchmarks matmul measures both); "
        f"--set {stage}.dtype=fp32 is faster here"
    )


def resolve(config: RunConfig, backend: Backend) -> RunConfig:
    """Fill every path the workers need from the backend's storage layout: later stages find the earlier ones'
    outputs (stage 3's actor and DPO's policy: stage 1's; stage 3's critic and reward model: stage 2's in the
    rlhf pipeline; in rl the critic starts from the actor, with a new value head)."""
    storage = backend.storage(config)
    resolved = resolved_rewards(config).model_copy(deep=True)
    resolved.output_dir = storage.run_dir(config)
    resolved.data.cache_dir = config.data.cache_dir or storage.cache
    for stage in STAGES:
        resolved.stage(stage).output_dir = storage.stage_output(resolved, stage)
    ppo, dpo = resolved.ppo, resolved.dpo
    if ppo.actor_model_name_or_path is None:
        ppo.actor_model_name_or_path = resolved.sft.output_dir
    trains_reward = "reward" in PIPELINES[resolved.pipeline]
    if ppo.critic_model_name_or_path is None:
        ppo.critic_model_name_or_path = resolved.reward.output_dir if trains_reward else ppo.actor_model_name_or_path
    if ppo.reward_model_name_or_path is None and ppo.uses_reward_model and trains_reward:
        ppo.reward_model_name_or_path = ppo.critic_model_name_or_path  # DeepSpeed-Chat: one folder for both
    if dpo.model_name_or_path is None:
        dpo.model_name_or_path = resolved.sft.output_dir
    if dpo.ref_model_name_or_path is None:
        dpo.ref_model_name_or_path = dpo.model_name_or_path
    return resolved


def check_backend_sections(config: RunConfig) -> None:
    """A ``backends.<name>`` section names an installed backend (or one the project ships): a typo would be
    ignored otherwise."""
    import difflib

    from .plugins import KNOWN_BACKEND_PACKAGES, get_backends

    known = sorted(set(get_backends()) | set(KNOWN_BACKEND_PACKAGES))
    for name in config.backends:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(
                f"backends.{name}",
                config.backends[name],
                "names no backend",
                f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(known)}",
            )


def check_backend_settings(config: RunConfig) -> None:
    """Every ``backends.<name>`` section names an installed (or known) backend, and each installed one's section
    is valid: what `config show` prints was checked as `train` would check it."""
    from .plugins import get_backends

    check_backend_sections(config)
    for name, backend in get_backends().items():
        if name in config.backends:
            backend.settings(config)


def plan(config: RunConfig, backend: Backend, stage: str, chained: bool = False) -> LaunchPlan:
    """Validate and build the launch plan of one stage (``chained``: the stages it starts from run first)."""
    check_backend_sections(config)
    backend.settings(config)
    check_stage(config, stage, chained, here=backend.runs_here)
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
    deps = depends_on(config, stage) if chained else ()
    upcoming = frozenset(str(resolved.stage(dep).output_dir) for dep in deps)
    backend.validate(plan_, upcoming)
    return plan_


def stages_of(stage: str, config: RunConfig) -> tuple[str, ...]:
    """The stages ``--stage`` names: ``all`` is the run's pipeline."""
    if stage == "all":
        return PIPELINES[config.pipeline]
    if stage not in ALL_STAGES:
        raise UserError(f"unknown stage '{stage}'; fix: use one of {', '.join(STAGE_CHOICES)}")
    return (stage,)


@dataclass
class Submitted:
    stage: str
    job_id: str


def plan_stages(
    config: RunConfig, backend: Backend, names: tuple[str, ...]
) -> tuple[list[LaunchPlan], list[FinishedOutput]]:
    """Every stage's plan, and the finished outputs the run would replace (planned as if told to, so that every
    other problem still shows): all of them at once, not one per attempt."""
    plans, finished = [], []
    for name in names:
        try:
            plans.append(plan(config, backend, name, chained=len(names) > 1))
        except FinishedOutput as exc:
            finished.append(exc)
            told = config.model_copy(deep=True)
            told.stage(name).overwrite = True
            plans.append(plan(told, backend, name, chained=len(names) > 1))
    return plans, finished


def refuse_finished(finished: list[FinishedOutput]) -> None:
    if len(finished) == 1:
        raise finished[0]
    if finished:
        raise UserError(
            "config error: " + "; ".join(f"{e.key} = {e.value!r}" for e in finished) + " hold finished models "
            "already; fix: choose another run_name or storage.root, or "
            + " ".join(f"--set {e.stage}.overwrite=true" for e in finished)
        )


def submit_stages(
    config: RunConfig,
    backend: Backend,
    stage: str,
    on_submit: Callable[[Submitted], None] | None = None,
    detach: bool = False,
) -> list[Submitted]:
    """Plan every stage first (so a bad config launches nothing), then submit in order, chaining stage 3
    after stages 1 and 2. A job that has already failed when control returns stops the chain."""
    names = stages_of(stage, config)
    chained = len(names) > 1
    plans, finished = plan_stages(config, backend, names)
    refuse_finished(finished)
    for plan_ in plans:
        plan_.detach = detach
    submitted: dict[str, Submitted] = {}
    for plan_ in plans:
        after = [submitted[dep].job_id for dep in depends_on(config, plan_.stage) if dep in submitted]
        job_id = backend.submit(plan_, after=after)
        record = submitted[plan_.stage] = Submitted(plan_.stage, job_id)
        if on_submit:
            on_submit(record)
        status = backend.status(job_id)
        if status.finished and not status.succeeded and chained:
            raise job_failed(f"stage {plan_.stage} ({status.describe()}); the chain stops here", status.exit_code)
    return list(submitted.values())


def final_status(backend: Backend, submitted: list[Submitted], poll_seconds: float = 5.0) -> JobStatus:
    """Wait for every submitted job; raise JobFailed naming the first stage that did not succeed."""
    last = None
    for record in submitted:
        last = backend.wait(record.job_id, poll_seconds=poll_seconds)
        if not last.succeeded:
            raise job_failed(f"stage {record.stage} did not succeed: {last.describe()}", last.exit_code)
    assert last is not None
    return last
