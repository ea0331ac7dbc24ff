"""The ``t9k`` backend: each stage is a DeepSpeedJob created through the Kubernetes API.

T9K's operator starts the workers, runs the DeepSpeed launcher on worker-0 and reports the job's phase and
conditions; worker-0's log carries every rank's lines. DeepSpeedJobs have no dependencies, so stage 3 is created
by the submitting command once stages 1 and 2 have succeeded. Job ids are the job names; a record per job in
``$DSCHAT_STATE_DIR/t9k`` keeps the namespace and credentials so ``status``/``logs``/``cancel`` need no config.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from dschat_core.plugin import (
    MISSING,
    Backend,
    BackendError,
    ConfigError,
    JobFailed,
    JobRecords,
    JobState,
    JobStatus,
    LaunchPlan,
    RunConfig,
    UserError,
    check_cpu_stage,
)

from .kube import ApiError, Kube, Target
from .manifests import CONTAINER, T9kLayout, error_file, model_size, to_yaml, training_job
from .settings import T9kSettings, is_dns_label

#: The seed's PVC sizes: opt-1.3b >= 20 GiB, opt-13b >= 100 GiB, opt-66b >= 500 GiB (models, checkpoints, outputs).
SEED_PVC_GIB = ((1.3, 20), (13, 100), (66, 500))

_PHASES = {
    "Succeeded": JobState.SUCCEEDED,
    "Failed": JobState.FAILED,
    "Running": JobState.RUNNING,
    "Resuming": JobState.RUNNING,
    "Pending": JobState.PENDING,
    "Creating": JobState.PENDING,
    "Paused": JobState.PENDING,
    "Unknown": JobState.UNKNOWN,
}


def pvc_gib_needed(config: RunConfig) -> tuple[float, str] | None:
    """(GiB, model) the seed asks of the PVC for the largest model the run trains; None if sizes are unknown."""
    billions: list[tuple[float, str]] = []
    actor = config.ppo.actor_model_name_or_path
    actor = None if actor == config.sft.output_dir else actor  # stage 1's output: its model is counted already
    for name in (config.sft.model_name_or_path, config.reward.model_name_or_path, actor):
        size = model_size(name)
        if name and size:
            billions.append((float(size[:-1]) / (1000 if size.endswith("m") else 1), name))
    if not billions:
        return None
    largest, name = max(billions)
    for limit, gib in SEED_PVC_GIB:
        if largest <= limit:
            return gib, name
    return round(largest * 500 / 66), name


def _gib(quantity: str) -> float:
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(quantity)) / 2**30


def status_of(job: dict[str, Any]) -> JobStatus:
    """Our reading of a DeepSpeedJob's status: ``phase`` is the verdict (``Completed`` is True on failure too)."""
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    phase = status.get("phase") or ""
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    details: dict[str, Any] = {"phase": phase or "(none yet)"}
    true = [kind for kind, c in conditions.items() if c.get("status") == "True"]
    if true:
        details["conditions"] = ", ".join(true)
    labels = job["metadata"].get("labels") or {}
    if "dschat/stage" in labels:
        details["stage"] = labels["dschat/stage"]
    replicas = []
    for task in status.get("tasks") or []:
        # The docs name this key three ways; accept them all.
        for entry in task.get("replicas") or task.get("status") or task.get("replicaStatus") or []:
            replicas.append(f"{entry.get('name')}={entry.get('phase')}")
        if task.get("restartCount"):
            details["restarts"] = task["restartCount"]
    if replicas:
        details["replicas"] = ", ".join(replicas)
    if status.get("backoffCount"):
        details["restarts"] = status["backoffCount"]
    failed = conditions.get("Failed") or {}
    if phase == "Failed" or (not phase and failed.get("status") == "True"):
        reason = failed.get("message") or "the job failed"
        return JobStatus(name, JobState.FAILED, f"{reason}; log: dschat-core logs {name} -b t9k", details)
    if not phase:
        return JobStatus(name, JobState.PENDING, "waiting for the T9K operator to start it", details)
    state = _PHASES.get(phase, JobState.RUNNING)
    reason = "paused" if phase == "Paused" else ""
    return JobStatus(name, state, reason, details)


class T9kBackend(Backend):
    name = "t9k"
    config_model = T9kSettings

    def __init__(self) -> None:
        self._pvc_checked: set[tuple[str, str]] = set()

    # -- storage and validation -----------------------------------------------------------------------------
    def storage(self, config: RunConfig) -> T9kLayout:
        settings: T9kSettings = self.settings(config)
        return T9kLayout(config.storage.root or settings.mount_path, settings.layout)

    def validate(self, plan: LaunchPlan, upcoming: frozenset[str] = frozenset()) -> None:
        config, stage = plan.config, plan.stage
        settings: T9kSettings = self.settings(config)
        if not settings.image:
            raise ConfigError(
                "backends.t9k.image",
                MISSING,
                "is required: the workers' container image",
                "build one with dschat-core installed (docs/backends/t9k.md) and set "
                "--set backends.t9k.image=REGISTRY/IMAGE:TAG",
            )
        if config.topology.accelerator == "cpu":
            check_cpu_stage(config, stage)
        gpus = config.topology.gpus_per_node
        slots = settings.slots_per_worker or gpus
        if config.topology.accelerator != "cpu":
            if slots > gpus:
                raise ConfigError(
                    "backends.t9k.slots_per_worker",
                    slots,
                    f"exceeds the {gpus} GPU(s) per worker (T9K's rule: slotsPerWorker <= {settings.gpu_resource})",
                    "lower it or raise topology.gpus_per_node",
                )
            for key in ("requests", "limits"):
                asked = (getattr(settings, key) or {}).get(settings.gpu_resource)
                if asked is not None and str(asked) != str(gpus):
                    raise ConfigError(
                        f"backends.t9k.{key}",
                        {settings.gpu_resource: asked},
                        f"differs from topology.gpus_per_node = {gpus}",
                        f"leave {settings.gpu_resource} out: it follows topology.gpus_per_node",
                    )
        job = f"{config.run_name}-{stage}"
        if not is_dns_label(f"{job}-worker-{config.topology.nodes - 1}"):
            raise ConfigError(
                "run_name", config.run_name, "makes pod names longer than Kubernetes allows", "use a shorter run_name"
            )
        self.check_root_on_pvc(config)

    def check_root_on_pvc(self, config: RunConfig) -> None:
        """storage.root must be on a mounted PVC: what a job writes anywhere else is lost with its pod."""
        settings: T9kSettings = self.settings(config)
        root = PurePosixPath(self.storage(config).root)
        mounts = [PurePosixPath(settings.mount_path)] + [PurePosixPath(v.mount_path) for v in settings.volumes]
        if not any(root == m or m in root.parents for m in mounts):
            raise ConfigError(
                "storage.root",
                str(root),
                f"is not on the PVC mounted at {settings.mount_path}",
                f"put it under {settings.mount_path} (or leave it unset)",
            )

    # -- rendering ---------------------------------------------------------------------------------------------
    def manifest(self, plan: LaunchPlan) -> dict[str, Any]:
        return training_job(plan, self.settings(plan.config), self.storage(plan.config))

    def render(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        head = f"# created once {' and '.join(after)} succeeded\n" if after else ""
        return head + to_yaml(self.manifest(plan))

    # -- connections and records -------------------------------------------------------------------------------
    records = JobRecords("t9k")

    def _record(self, job_id: str) -> dict[str, Any]:
        if not is_dns_label(job_id):
            raise UserError(f"'{job_id}' is not a DeepSpeedJob name; fix: use the name printed by dschat-core")
        return self.records.read(job_id)

    def _kube_for(self, job_id: str) -> Kube:
        record = self._record(job_id)
        if not record:
            raise UserError(
                f"no T9K job '{job_id}' was submitted from this machine (records in "
                f"{self.records.folder}); fix: check the name, or `kubectl get dj -n NAMESPACE`"
            )
        return Kube(Target(record.get("kubeconfig"), record.get("context"), record.get("namespace")))

    @staticmethod
    def target(settings: T9kSettings) -> Target:
        return Target(settings.kubeconfig, settings.context, settings.namespace)

    def check_pvc(self, kube: Kube, settings: T9kSettings, config: RunConfig | None) -> None:
        """Refuse a missing PVC, or one smaller than the seed asks for the model; say so when we may not look."""
        if not settings.check_pvc or (kube.namespace, settings.pvc) in self._pvc_checked:
            return
        names = [settings.pvc] + [v.claim_name for v in settings.volumes]
        for name in names:
            try:
                pvc = kube.pvc(name)
            except BackendError as exc:  # e.g. a Role without persistentvolumeclaims: not fatal
                reason = exc.format_message().split("; fix:")[0]
                print(
                    f"warning: could not check PVC {name}: {reason}; to have it checked, ask for a Role granting "
                    "persistentvolumeclaims (get) in that namespace, or set backends.t9k.check_pvc=false",
                    file=sys.stderr,
                )
                continue
            if pvc is None:
                raise UserError(
                    f"backends.t9k.pvc: there is no PVC '{name}' in namespace {kube.namespace}; fix: "
                    "create it (seed: >= 20 GiB for opt-1.3b, 100 GiB for 13b, 500 GiB for 66b) or "
                    "name an existing one"
                )
            if name != settings.pvc or config is None:
                continue
            capacity = ((pvc.get("status") or {}).get("capacity") or {}).get("storage") or (
                ((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}
            ).get("storage")
            needed = pvc_gib_needed(config)
            if capacity and needed and _gib(capacity) < needed[0]:
                raise UserError(
                    f"backends.t9k.pvc: PVC '{name}' holds {capacity}, but a run with {needed[1]} needs "
                    f"at least {needed[0]} GiB (the seed's sizes: 20/100/500 GiB for opt-1.3b/13b/66b); "
                    "fix: use a larger PVC, or set backends.t9k.check_pvc=false to submit anyway"
                )
        self._pvc_checked.add((kube.namespace, settings.pvc))

    def create(self, kube: Kube, manifest: dict[str, Any], settings: T9kSettings, extra: dict[str, Any]) -> str:
        """Create a job (replacing a failed one of the same name, so that a rerun resumes) and record it."""
        name = manifest["metadata"]["name"]
        existing = kube.get_job(name)
        if existing is not None:
            current = status_of(existing)
            if not current.finished:
                raise UserError(
                    f"DeepSpeedJob {name} already exists in {kube.namespace} ({current.state.value}); "
                    f"fix: wait for it, `dschat-core cancel {name} -b t9k`, or choose another run_name"
                )
            if current.succeeded:
                raise UserError(
                    f"DeepSpeedJob {name} in {kube.namespace} has already succeeded; fix: delete it "
                    f"(`dschat-core cancel {name} -b t9k`) to run it again, or choose another run_name"
                )
            print(f"replacing {current.describe()}; the new job resumes from its last checkpoint", file=sys.stderr)
            kube.delete_job(name)
            for _ in range(300):
                if kube.get_job(name) is None:
                    break
                time.sleep(0.2)
        kube.create_job(manifest)
        record = {
            "job_id": name,
            "namespace": kube.namespace,
            "kubeconfig": settings.kubeconfig,
            "context": settings.context,
            "submitted": time.time(),
            "storage_root": settings.mount_path,
            **extra,
        }
        self.records.write(name, record)
        return name

    # -- scheduling ----------------------------------------------------------------------------------------
    def submit(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        settings: T9kSettings = self.settings(plan.config)
        kube = Kube(self.target(settings))
        if after:  # DeepSpeedJobs cannot wait for each other: this command does
            print(f"{plan.job_name}: waiting for {', '.join(after)} to succeed before creating it", file=sys.stderr)
            for job_id in after:
                done = self.wait(job_id)
                if not done.succeeded:
                    raise JobFailed(
                        f"stage {done.details.get('stage', job_id)} did not succeed "
                        f"({done.describe()}); {plan.job_name} was not created"
                    )
        self.check_pvc(kube, settings, plan.config)
        extra = {
            "stage": plan.stage,
            "output_dir": plan.output_dir,
            "storage_root": self.storage(plan.config).root,
            "error_file": error_file(plan, self.storage(plan.config)),
        }
        return self.create(kube, self.manifest(plan), settings, extra)

    def status(self, job_id: str) -> JobStatus:
        record = self._record(job_id)
        kube = self._kube_for(job_id)
        job = kube.get_job(job_id)
        if job is None:
            if record:
                return JobStatus(
                    job_id,
                    JobState.CANCELLED,
                    f"the DeepSpeedJob was deleted from {kube.namespace}",
                    {"stage": record.get("stage")},
                )
            raise UserError(
                f"no DeepSpeedJob named {job_id} in namespace {kube.namespace}; fix: check the name "
                "(`kubectl get dj`) or set backends.t9k.namespace"
            )
        result = status_of(job)
        if "output_dir" in record:
            result.details["output_dir"] = record["output_dir"]
        return result.with_error_of_ranks(record.get("error_file"))  # where the PVC is mounted here

    def wait(self, job_id: str, poll_seconds: float = 2.0, timeout: float | None = None) -> JobStatus:
        """Until the job has finished: watch it (each change wakes us), re-reading after every event."""
        kube = self._kube_for(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = kube.get_job(job_id)
            current = status_of(job) if job is not None else self.status(job_id)
            if current.finished or (deadline is not None and time.monotonic() >= deadline):
                stage = self._record(job_id).get("stage")
                if stage and "stage" not in current.details:
                    current.details["stage"] = stage
                return current
            seconds = 60 if deadline is None else max(1, min(60, int(deadline - time.monotonic())))
            started = time.monotonic()
            assert job is not None  # a deleted job has finished: CANCELLED
            for _event in kube.watch_job(job_id, job["metadata"]["resourceVersion"], seconds):
                break
            if time.monotonic() - started < 0.05:  # the watch ended at once (expired version): do not spin
                time.sleep(poll_seconds)

    def cancel(self, job_id: str) -> None:
        kube = self._kube_for(job_id)
        if kube.get_job(job_id) is None:
            raise UserError(f"no DeepSpeedJob named {job_id} in namespace {kube.namespace}; nothing to cancel")
        kube.delete_job(job_id)

    # -- logs --------------------------------------------------------------------------------------------------
    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """worker-0's log, which carries every worker's lines; with ``follow``, wait for the pod to start."""
        kube = self._kube_for(job_id)
        pod = f"{job_id}-worker-0"
        while True:
            try:
                response = kube.pod_log(pod, CONTAINER, follow)
                break
            except ApiError as exc:
                if exc.status not in (400, 404):
                    raise
                current = self.status(job_id)
                if not follow or current.finished:
                    gone = " (its pods are deleted: see backends.t9k.clean_up_policy)" if current.finished else ""
                    raise BackendError(f"no log from {pod} yet{gone}: {exc}; job {current.describe()}") from None
                time.sleep(1.0)
        try:
            for line in response:
                yield line.decode("utf-8", errors="replace")
        finally:
            response.release_conn()
