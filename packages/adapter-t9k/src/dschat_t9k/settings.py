"""The run config's ``backends.t9k`` section."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from dschat_core.plugin import looks_secret

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESOURCE_NAME = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")

Quantity = str | int | float


def _k8s_name(value: str) -> str:
    if not _DNS_SUBDOMAIN.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes name (lowercase letters, digits, '-', '.')")
    return value


#: The name of a Secret, PVC or namespace.
K8sName = Annotated[str, AfterValidator(_k8s_name)]


def _check_quantities(value: dict[str, Quantity] | None) -> dict[str, Quantity] | None:
    for name, amount in (value or {}).items():
        if not _RESOURCE_NAME.match(name):
            raise ValueError(f"{name!r} is not a Kubernetes resource name such as cpu, memory or nvidia.com/gpu")
        if not _QUANTITY.match(str(amount)):
            raise ValueError(f"{name}: {amount!r} is not a Kubernetes quantity such as 4, 500m or 64Gi")
    return value


class SecretRef(BaseModel):
    """A key of a Kubernetes Secret in the job's namespace; only the reference reaches the job."""

    model_config = ConfigDict(extra="forbid")
    secret: K8sName = Field(description="Secret name.")
    key: str = Field(description="Key inside the Secret.")


class ExtraVolume(BaseModel):
    """Another PVC mounted into the workers (the seed mounts a model PVC at /t9k/mnt/models/llama-7b)."""

    model_config = ConfigDict(extra="forbid")
    claim_name: K8sName
    mount_path: str
    read_only: bool = False

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return _mount_path(value)


class T9kSettings(BaseModel):
    """The run config's ``backends.t9k`` section."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(
        None, description="Worker image with dschat-core, DeepSpeed, sshd and pdsh (see docs/backends/t9k.md)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[K8sName] = Field(default_factory=list, description="Secrets for a private registry.")
    namespace: K8sName | None = Field(
        None, description="Project (namespace); default: the kubeconfig context's, or the Notebook's own."
    )
    kubeconfig: str | None = Field(
        None, description="Kubeconfig file; default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account."
    )
    context: str | None = Field(None, description="Kubeconfig context; default: the current one.")
    pvc: K8sName = Field("dschat", description="The PVC mounted at `mount_path` (models, datasets, outputs).")
    mount_path: str = Field("/t9k/mnt", description="Where the PVC is mounted; also the working directory.")
    layout: Literal["seed", "run"] = Field(
        "seed",
        description="seed: outputs in output/<topology>/{actor,reward,step3}-models/<size> as the seed; "
        "run: output/runs/<run_name>/{actor,reward,ppo}.",
    )
    slots_per_worker: int | None = Field(
        None, ge=1, description="Processes per worker; default `topology.gpus_per_node`; at most the GPUs."
    )
    requests: dict[str, Quantity] | None = Field(
        None, description="Worker resource requests; default per GPU: cpu 2, memory 32Gi (the seed's)."
    )
    limits: dict[str, Quantity] | None = Field(
        None, description="Worker resource limits; default per GPU: cpu 4, memory 64Gi (the seed's)."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    rdma: bool = Field(False, description="Request `rdma/rdma_shared_device_a: 1` for multi-node jobs.")
    shm_size: str | None = Field(None, description="sizeLimit of the /dev/shm memory volume (default: none).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment (no secrets: see secret_env).")
    secret_env: dict[str, SecretRef] = Field(
        default_factory=dict,
        description="Environment taken from Secrets by reference, e.g. `{HF_TOKEN: {secret: hf, key: token}}`.",
    )
    offline: bool = Field(True, description="Training jobs read models and data from the PVC only (HF_*_OFFLINE).")
    queue: str | None = Field(None, description="T9K scheduler queue (`spec.scheduler.t9kScheduler`).")
    priority: int | None = Field(None, ge=0, le=100, description="T9K scheduler priority.")
    restart_policy: Literal["Always", "OnFailure", "Never", "ExitCode"] | None = Field(
        None, description="`spec.worker.restartPolicy`; a restarted job resumes from its last checkpoint."
    )
    backoff_limit: int | None = Field(None, ge=0, description="`runPolicy.backoffLimit`: restarts before Failed.")
    active_deadline_seconds: int | None = Field(None, gt=0, description="`runPolicy.activeDeadlineSeconds`.")
    clean_up_policy: Literal["None", "All", "Unfinished"] | None = Field(
        None, description="`runPolicy.cleanUpPolicy`; All deletes the pods, and with them the logs."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    volumes: list[ExtraVolume] = Field(default_factory=list, description="More PVCs to mount.")
    check_pvc: bool = Field(True, description="Check before submitting that the PVC exists and is large enough.")
    termination_grace_seconds: int = Field(
        600,
        ge=0,
        description="A stopped worker's time to checkpoint (SIGTERM, then SIGKILL): pod deletion, "
        "preemption, T9K's pause.",
    )

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, value: dict, info: ValidationInfo) -> dict:
        for key in value:
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not an environment variable name")
            if info.field_name == "env" and looks_secret(key):
                raise ValueError(
                    f"{key} looks like a secret, and env is written into the DeepSpeedJob; put it in a Secret "
                    f"and use secret_env: {{{key}: {{secret: NAME, key: KEY}}}}"
                )
        return value

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value):
        return _check_quantities(value)

    @field_validator("mount_path")
    @classmethod
    def _mount(cls, value: str) -> str:
        if value.rstrip("/") in ("", "/root", "/t9k"):
            raise ValueError(f"{value!r}: use an absolute path that hides no controller path, e.g. /t9k/mnt")
        return _mount_path(value).rstrip("/")

    @field_validator("shm_size")
    @classmethod
    def _shm(cls, value: str | None) -> str | None:
        if value is not None and not _QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity such as 16Gi")
        return value

    @field_validator("gpu_resource")
    @classmethod
    def _gpu_resource(cls, value: str) -> str:
        if not _RESOURCE_NAME.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes resource name such as nvidia.com/gpu")
        return value

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            prefix, _, name = key.rpartition("/")
            if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))) or not _LABEL.match(name):
                raise ValueError(f"{key!r} is not a Kubernetes label key such as kubernetes.io/hostname")
            if label and not _LABEL.match(label):
                raise ValueError(f"{key}: {label!r} is not a Kubernetes label value (63 letters, digits, -_. at most)")
        return value


_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def _mount_path(value: str) -> str:
    if not value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r} must be an absolute path without '..'")
    return value


def is_dns_label(name: str) -> bool:
    return bool(_DNS_LABEL.match(name))
