"""DeepSpeedJob manifests: training stages, download jobs and debug jobs, and the seed's storage layout.

Shapes follow the seed's sample jobs (one container ``worker``, the PVC at /t9k/mnt, /dev/shm as a memory
volume, ``IPC_LOCK``); the DeepSpeed launcher that T9K starts on worker-0 runs ``python -m dschat_core.worker`` on
every slot. The resolved config travels in the job itself (``--config-data``, one shell-safe token, because pdsh
re-parses arguments on the other workers) and, readable, in the ``dschat/config`` annotation.
"""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath
from typing import Any

import yaml

from dschat_core.config import STAGES
from dschat_core.plugin import ERROR_FILE_ENV, LaunchPlan, RunConfig, StorageLayout, rank_environment

from .settings import T9kSettings

API_VERSION = "batch.tensorstack.dev/v1beta1"
GROUP, VERSION, PLURAL, KIND = "batch.tensorstack.dev", "v1beta1", "deepspeedjobs", "DeepSpeedJob"
CONTAINER = "worker"

#: The seed's folder per stage under output/<topology>/.
SEED_OUTPUT_FOLDERS = {"sft": "actor-models", "reward": "reward-models", "ppo": "step3-models", "dpo": "dpo-models"}
_SIZE = re.compile(r"(?<![0-9.])(\d+(?:\.\d+)?[bBmM])(?![A-Za-z0-9])")


def topology_name(config: RunConfig) -> str:
    """The seed's names for the three topologies."""
    if config.topology.nodes > 1:
        return "multi-node"
    return "single-node" if config.topology.gpus_per_node > 1 else "single-gpu"


def model_size(name_or_path: str | None) -> str | None:
    """'facebook/opt-1.3b' -> '1.3b', './output/x/actor-models/66b' -> '66b', 'Llama-2-7b-hf' -> '7b'."""
    if not name_or_path:
        return None
    found = _SIZE.findall(PurePosixPath(name_or_path).name)
    return found[-1].lower() if found else None


def hub_folder_name(repo_id: str) -> str:
    """The seed's folder names for downloads: facebook/opt-1.3b -> facebook_opt_1.3b."""
    return re.sub(r"[/-]", "_", repo_id)


class T9kLayout(StorageLayout):
    """The PVC as the seed lays it out: hf-models/, hf-datasets/, hf-cache/, output/<topology>/..."""

    def __init__(self, root: str, layout: str = "seed") -> None:
        super().__init__(root)
        self.layout = layout

    @property
    def models(self) -> str:
        return self._join("hf-models")

    @property
    def datasets(self) -> str:
        return self._join("hf-datasets")

    @property
    def hf_cache(self) -> str:
        return self._join("hf-cache")

    @property
    def cache(self) -> str:
        return self._join("hf-cache", "dschat")

    def model_dir(self, repo_id: str) -> str:
        return self._join("hf-models", hub_folder_name(repo_id))

    def dataset_dir(self, repo_id: str) -> str:
        return self._join("hf-datasets", hub_folder_name(repo_id))

    def run_dir(self, config: RunConfig) -> str:
        if config.output_dir:
            return config.output_dir
        if self.layout == "seed":
            return self._join("output", topology_name(config), "runs", config.run_name)
        return self._join("output", "runs", config.run_name)

    def stage_output(self, config: RunConfig, stage: str) -> str:
        explicit = getattr(config.stage(stage), "output_dir", None) if stage in STAGES else None
        if explicit or self.layout != "seed" or stage not in STAGES:
            return super().stage_output(config, stage)
        size = model_size(config.base_model(stage)) or config.run_name
        return self._join("output", topology_name(config), SEED_OUTPUT_FOLDERS[stage], size)


# -- pieces of every job ------------------------------------------------------------------------------------------
def _env(settings: T9kSettings, layout: T9kLayout, offline: bool, extra: dict[str, str]) -> list[dict[str, Any]]:
    values = {
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": layout.hf_cache,
        "HF_HUB_CACHE": str(PurePosixPath(layout.hf_cache, "hub")),
        "HF_DATASETS_CACHE": str(PurePosixPath(layout.hf_cache, "dataset")),
    }
    if offline:
        values.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    values.update(extra)
    values.update(settings.env)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in values.items()]
    for name, ref in settings.secret_env.items():  # by reference only: the value never appears in the job
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}})
    return env


def _resources(settings: T9kSettings, gpus: int, cpu_ranks: int) -> dict[str, Any]:
    if gpus:
        requests: dict[str, Any] = {"cpu": 2 * gpus, "memory": f"{32 * gpus}Gi"}
        limits: dict[str, Any] = {"cpu": 4 * gpus, "memory": f"{64 * gpus}Gi"}
    else:  # CPU ranks: a core and a few GiB each
        requests = {"cpu": cpu_ranks, "memory": f"{4 * cpu_ranks}Gi"}
        limits = {"cpu": cpu_ranks, "memory": f"{8 * cpu_ranks}Gi"}
    requests = dict(settings.requests) if settings.requests is not None else requests
    limits = dict(settings.limits) if settings.limits is not None else limits
    for bucket in (requests, limits):
        if gpus:
            bucket[settings.gpu_resource] = gpus
        if settings.rdma:
            bucket["rdma/rdma_shared_device_a"] = 1
    return {"requests": requests, "limits": limits}


def error_file(plan: LaunchPlan, layout: StorageLayout) -> str:
    """Where the ranks leave their one-line error, on the PVC (readable where the PVC is mounted too)."""
    return str(PurePosixPath(layout.logs(plan.config), f"{plan.job_name}.error"))


def _whole_cpus(quantity) -> int | None:
    """The whole CPUs a resource quantity asks for (``4``, ``"8"``, ``"500m"`` → 0), None when unknown."""
    if quantity is None:
        return None
    from kubernetes.utils import parse_quantity

    return int(parse_quantity(str(quantity)))


def _pod_template(
    settings: T9kSettings, layout: T9kLayout, resources: dict[str, Any], env: list[dict[str, Any]]
) -> dict[str, Any]:
    mounts = [{"name": "data", "mountPath": settings.mount_path}, {"name": "dshm", "mountPath": "/dev/shm"}]
    shm: dict[str, Any] = {"medium": "Memory"}
    if settings.shm_size:
        shm["sizeLimit"] = settings.shm_size
    volumes = [
        {"name": "data", "persistentVolumeClaim": {"claimName": settings.pvc}},
        {"name": "dshm", "emptyDir": shm},
    ]
    for index, extra in enumerate(settings.volumes, 1):
        name = f"extra-{index}"
        mount: dict[str, Any] = {"name": name, "mountPath": extra.mount_path}
        if extra.read_only:
            mount["readOnly"] = True
        mounts.append(mount)
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": extra.claim_name}})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.image or "<backends.t9k.image>",
        "workingDir": settings.mount_path + "/",
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    container.update(
        {
            "env": env,
            "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
            "resources": resources,
            "volumeMounts": mounts,
        }
    )
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if settings.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    return {"spec": spec}


def _job(
    name: str,
    labels: dict[str, str],
    spec: dict[str, Any],
    settings: T9kSettings,
    annotations: dict[str, str] | None = None,
    retries: int = 0,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/managed-by": "dschat", **labels}}
    if settings.namespace:
        metadata["namespace"] = settings.namespace
    if annotations:
        metadata["annotations"] = annotations
    if settings.queue:
        scheduler: dict[str, Any] = {"queue": settings.queue}
        if settings.priority is not None:
            scheduler["priority"] = settings.priority
        spec = {"scheduler": {"t9kScheduler": scheduler}, **spec}
    run_policy = {
        # The operator restarts a failed job this often; each restart resumes from the last checkpoint.
        "backoffLimit": settings.backoff_limit if settings.backoff_limit is not None else (retries or None),
        "activeDeadlineSeconds": settings.active_deadline_seconds,
        "cleanUpPolicy": settings.clean_up_policy,
    }
    run_policy = {k: v for k, v in run_policy.items() if v is not None}
    if run_policy:
        spec["runPolicy"] = run_policy
    if settings.restart_policy:
        spec["worker"]["restartPolicy"] = settings.restart_policy
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


# -- the three kinds of job ------------------------------------------------------------------------------------
def training_job(plan: LaunchPlan, settings: T9kSettings, layout: T9kLayout) -> dict[str, Any]:
    """One stage (or preflight) on ``nodes`` workers of ``procs_per_node`` slots."""
    config = plan.config
    on_gpu = config.topology.accelerator != "cpu"
    slots = settings.slots_per_worker or plan.procs_per_node
    # The DeepSpeed launcher on worker-0 starts `python -u -m <module> <args>` on every slot.
    args = plan.worker_args(inline_config=True)[1:]
    annotations = None
    if plan.trains:
        readable = config.model_dump(mode="json", exclude_defaults=True, exclude={"backends"})
        annotations = {"dschat/config": yaml.safe_dump(readable, sort_keys=False, width=120)}
    launch: dict[str, Any] = {"slotsPerWorker": slots, "run": {"module": args}}
    if config.topology.master_port:
        launch["otherArgs"] = [f"--master_port={config.topology.master_port}"]
    resources = _resources(settings, plan.procs_per_node if on_gpu else 0, slots)
    extra_env = rank_environment(slots, not on_gpu, _whole_cpus(resources["requests"].get("cpu")))
    extra_env["DSCHAT_JOB_ID"] = plan.job_name  # the job's own id: a restarted job takes over its output lock
    extra_env[ERROR_FILE_ENV] = error_file(plan, layout)
    template = _pod_template(settings, layout, resources, _env(settings, layout, settings.offline, extra_env))
    if plan.trains:  # a deleted, preempted or paused pod gets SIGTERM: the time to checkpoint before SIGKILL
        template["spec"]["terminationGracePeriodSeconds"] = settings.termination_grace_seconds
    spec = {"config": launch, "worker": {"replicas": plan.nodes, "template": template}}
    labels = {"dschat/run": config.run_name, "dschat/stage": plan.stage}
    retries = config.stage(plan.stage).retries if plan.trains else 0
    return _job(plan.job_name, labels, spec, settings, annotations, retries)


def download_script(models: list[str], datasets: list[str], layout: T9kLayout, python: str = "dschat-core") -> str:
    """Our download commands, every value quoted, stopping at the first failure."""
    commands = [shlex.join([python, "model", "download", name, "-o", layout.model_dir(name)]) for name in models]
    commands += [shlex.join([python, "data", "download", name, "-o", layout.dataset_dir(name)]) for name in datasets]
    return "\n".join(["set -euo pipefail", *commands]) + "\n"


def download_job(
    name: str, models: list[str], datasets: list[str], settings: T9kSettings, layout: T9kLayout
) -> dict[str, Any]:
    """One CPU worker that downloads into the PVC (the seed's debug job + ``kubectl exec``, without the exec)."""
    launch = {
        "slotsPerWorker": 1,
        "localRank": False,
        "run": {"exec": ["bash", "-c", download_script(models, datasets, layout)]},
    }
    resources = {"requests": {"cpu": 2, "memory": "8Gi"}, "limits": {"cpu": 4, "memory": "16Gi"}}
    template = _pod_template(settings, layout, resources, _env(settings, layout, offline=False, extra={}))
    spec = {"config": launch, "worker": {"replicas": 1, "template": template}}
    return _job(name, {"dschat/kind": "download"}, spec, settings)


def debug_job(name: str, gpus: int, settings: T9kSettings, layout: T9kLayout) -> dict[str, Any]:
    """A worker that only waits, with the environment in place, for ``kubectl exec`` (the seed's deploy job)."""
    template = _pod_template(
        settings, layout, _resources(settings, gpus, 1), _env(settings, layout, offline=False, extra={})
    )
    spec = {"runMode": {"debug": {"enabled": True}}, "worker": {"replicas": 1, "template": template}}
    return _job(name, {"dschat/kind": "debug"}, spec, settings)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the readable config) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)
