"""The Kubernetes API as the T9K backend uses it: DeepSpeedJobs, pod logs and PVCs, with errors for people.

Credentials: a kubeconfig (``backends.t9k.kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``), else the
service account of the pod we run in (a T9K Notebook, as in the seed). Each connection has its own client
configuration, so nothing global is touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dschat_core.errors import BackendError, UserError

from .manifests import GROUP, PLURAL, VERSION

IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
ROLE_HINT = (
    "ask for a Role in that namespace granting deepspeedjobs (create, get, list, watch, delete) and pods/log (get)"
)


def _kubeconfig_file(explicit: str | None) -> str | None:
    if explicit:
        return os.path.expanduser(explicit)
    env = os.environ.get("KUBECONFIG")
    if env:
        return env.split(os.pathsep)[0]
    default = Path.home() / ".kube" / "config"
    return str(default) if default.exists() else None


@dataclass(frozen=True)
class Target:
    """Where to reach the cluster; kept in job records so ``status`` and ``logs`` need no run config."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


class Kube:
    def __init__(self, target: Target) -> None:
        from kubernetes import client, config

        kubeconfig = _kubeconfig_file(target.kubeconfig)
        namespace = target.namespace
        if kubeconfig:
            if not Path(kubeconfig).exists():
                raise UserError(
                    f"backends.t9k.kubeconfig = {kubeconfig!r} does not exist; fix: point it at your "
                    "kubeconfig, or run from a T9K Notebook"
                )
            try:
                api_client = config.new_client_from_config(
                    config_file=kubeconfig, context=target.context, persist_config=False
                )
                if namespace is None:
                    contexts, active = config.list_kube_config_contexts(kubeconfig)
                    chosen = (
                        next((c for c in contexts if c["name"] == target.context), active) if target.context else active
                    )
                    namespace = (chosen or {}).get("context", {}).get("namespace")
            except config.ConfigException as exc:
                raise UserError(f"kubeconfig {kubeconfig}: {exc}; fix: check backends.t9k.context") from None
            self.server = api_client.configuration.host
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
            self.server = configuration.host
            if namespace is None and Path(IN_CLUSTER_NAMESPACE).exists():
                namespace = Path(IN_CLUSTER_NAMESPACE).read_text().strip()
        else:
            raise UserError(
                "no Kubernetes credentials: no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a "
                "pod; fix: set backends.t9k.kubeconfig, or run from a T9K Notebook"
            )
        self.namespace = namespace or "default"
        self.jobs = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    # -- error translation ----------------------------------------------------------------------------------
    def _call(self, doing: str, fn, *args, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise self.explain(exc, doing) from None
        except HTTPError as exc:
            raise BackendError(
                f"cannot reach the Kubernetes API server at {self.server} ({doing}): {type(exc).__name__}"
            ) from None

    def explain(self, exc, doing: str) -> Exception:
        """One line for an API error: what we tried, what the server said, what to do."""
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except (ValueError, TypeError):
            message = exc.reason
        if exc.status == 401:
            return BackendError(
                f"the API server at {self.server} rejected the credentials while {doing}; fix: "
                "refresh your kubeconfig's token"
            )
        if exc.status == 403:
            return BackendError(f"not allowed to {doing} in namespace {self.namespace}: {message}; fix: {ROLE_HINT}")
        if exc.status == 404 and "could not find the requested resource" in str(message):
            return BackendError(
                f"this cluster has no DeepSpeedJob resource ({GROUP}/{VERSION} {PLURAL}) while "
                f"{doing}; fix: use a T9K cluster (or install the T9K job operator)"
            )
        if exc.status == 422:
            return UserError(f"the API server refused the job while {doing}: {message}")
        return ApiError(exc.status, f"{doing}: {message}")

    # -- DeepSpeedJobs ----------------------------------------------------------------------------------------
    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "metadata": {**body["metadata"], "namespace": self.namespace}}
        return self._call(
            f"create deepspeedjob {body['metadata']['name']}",
            self.jobs.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            body,
        )

    def get_job(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                f"get deepspeedjob {name}",
                self.jobs.get_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
            )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def delete_job(self, name: str) -> None:
        self._call(
            f"delete deepspeedjob {name}",
            self.jobs.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            propagation_policy="Background",
        )

    def watch_job(self, name: str, resource_version: str, seconds: int) -> Iterator[dict[str, Any]]:
        """Events on one job after ``resource_version``, for at most ``seconds``."""
        from kubernetes import watch

        stream = watch.Watch().stream(
            self.jobs.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=seconds,
        )
        try:
            yield from stream
        except Exception as exc:  # an expired resourceVersion (410) or a dropped connection: the caller re-reads
            if getattr(exc, "status", None) == 403:
                raise self.explain(exc, f"watch deepspeedjob {name}") from None

    # -- pods and PVCs --------------------------------------------------------------------------------------
    def pod_log(self, pod: str, container: str, follow: bool):
        """The raw log response (iterate it for lines)."""
        return self._call(
            f"get pods/log of {pod}",
            self.core.read_namespaced_pod_log,
            pod,
            self.namespace,
            container=container,
            follow=follow,
            _preload_content=False,
        )

    def pvc(self, name: str) -> dict[str, Any] | None:
        """The PVC as a dict, None if absent; raises UserError (403) when we may not look."""
        try:
            found = self._call(
                f"get persistentvolumeclaim {name}",
                self.core.read_namespaced_persistent_volume_claim,
                name,
                self.namespace,
            )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return found.to_dict()


class ApiError(BackendError):
    """Any other API error, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
