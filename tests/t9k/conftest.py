"""A real Kubernetes API server (kube-apiserver 1.20 + etcd, no controllers, no kubelet) with the project's
DeepSpeedJob CRD, and helpers by which a test plays T9K's operator (status through the status subresource) and
a node's kubelet (serving worker-0's log, which the API server proxies as it would on a cluster)."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from dschat_t9k import plugin as t9k_plugin
from dschat_t9k.manifests import GROUP, PLURAL, VERSION

HERE = Path(__file__).resolve().parent
CLUSTER = HERE / "cluster"
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dschat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _apiserver_binary(state: Path) -> None:
    """Put kube-apiserver where up.sh looks first: from the cache, the shared folder beside the repository, or
    built from Debian's source package (about 4 minutes, once per machine)."""
    target = state / "bin" / "kube-apiserver"
    target.parent.mkdir(parents=True, exist_ok=True)
    cached = CACHE / "kube-apiserver-v1.20.2"
    if not cached.exists():
        candidates = [Path(p) / "kube-apiserver.xz" for p in (os.environ.get("DSCHAT_K8S_DIR"),) if p]
        candidates += [REPO.parent / "shared" / "k8s" / "kube-apiserver.xz", CACHE / "kube-apiserver.xz"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            CACHE.mkdir(parents=True, exist_ok=True)
            built = subprocess.run(
                ["bash", str(CLUSTER / "build-kube-apiserver.sh"), str(CACHE)],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            assert built.returncode == 0, f"could not build kube-apiserver:\n{built.stderr[-3000:]}"
            found = CACHE / "kube-apiserver.xz"
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(cached.with_suffix(".tmp"), "wb") as out:
            subprocess.run(["xz", "-dc", str(found)], stdout=out, check=True)
        cached.with_suffix(".tmp").chmod(0o755)
        cached.with_suffix(".tmp").replace(cached)
    shutil.copy2(cached, target)


def _etcd() -> None:
    if shutil.which("etcd"):
        return
    if os.geteuid() != 0:
        pytest.skip("etcd is missing and installing it needs root: apt-get install -y etcd-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "etcd-server"], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"apt-get install etcd-server failed:\n{done.stderr[-2000:]}"


@pytest.fixture(scope="session")
def k8s_cluster():
    """(kubeconfig path, state folder) of a fresh API server with the DeepSpeedJob CRD installed."""
    from kubernetes import client, config

    _etcd()
    state = Path(tempfile.mkdtemp(prefix="dschat-k8s-"))
    _apiserver_binary(state)
    env = {**os.environ, "K8S_PORT": str(_free_port()), "ETCD_PORT": str(_free_port())}
    started = subprocess.run(
        ["bash", str(CLUSTER / "up.sh"), str(state)], env=env, capture_output=True, text=True, timeout=300
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(CLUSTER / "down.sh"), str(state)], capture_output=True, timeout=60)
    assert started.returncode == 0, f"could not start the API server:\n{started.stdout}\n{started.stderr}"
    kubeconfig = started.stdout.strip().splitlines()[-1]
    api = config.new_client_from_config(kubeconfig)
    crd = yaml.safe_load((HERE / "deepspeedjob-crd.yaml").read_text())
    client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
    jobs = client.CustomObjectsApi(api)
    for _ in range(100):  # the CRD is served a moment after it is created
        try:
            jobs.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
            break
        except client.exceptions.ApiException:
            time.sleep(0.1)
    yield kubeconfig, state
    subprocess.run(["bash", str(CLUSTER / "down.sh"), str(state)], capture_output=True, timeout=60)
    shutil.rmtree(state, ignore_errors=True)


class Operator:
    """What T9K's operator and a kubelet would do, done by the test through the same API server."""

    def __init__(self, kubeconfig: str, namespace: str) -> None:
        from kubernetes import client, config

        api = config.new_client_from_config(kubeconfig)
        self.jobs = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.namespace = namespace
        self.kubelet_lines: dict[str, list[str]] = {}

    def job(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.jobs.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def wait_for_job(self, name: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.job(name)
            if found is not None:
                return found
            time.sleep(0.1)
        raise AssertionError(f"DeepSpeedJob {name} was never created")

    def set_phase(self, name: str, phase: str, message: str = "", replicas: int = 1) -> None:
        """Status as the operator writes it (conditions as in the reference's real dumps)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        finished = phase in ("Succeeded", "Failed")
        message = message or {"Succeeded": "The job has finished successfully."}.get(phase, "")

        def cond(kind: str, value: bool, reason: str = "-") -> dict:
            return {
                "type": kind,
                "status": "True" if value else "False",
                "reason": reason,
                "message": message or "-",
                "lastTransitionTime": now,
            }

        conditions = [
            {
                "type": "Initialized",
                "status": "True",
                "reason": "-",
                "lastTransitionTime": now,
                "message": "The job has been initialized successfully.",
            },
            cond("Running", phase == "Running", phase),
            cond("Failed", phase == "Failed", phase),
            cond("Completed", finished, phase),
            cond("ReplicaFailure", phase == "Failed", phase),
        ]
        pod_phase = {"Running": "Running", "Succeeded": "Succeeded", "Failed": "Failed"}.get(phase, "Pending")
        tasks = [
            {
                "type": "worker",
                "restartCount": 0,
                "replicas": [
                    {"name": f"{name}-worker-{i}", "uid": f"uid-{i}", "phase": pod_phase} for i in range(replicas)
                ],
            }
        ]
        self.jobs.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            {"status": {"phase": phase, "conditions": conditions, "tasks": tasks}},
        )

    # -- a kubelet that serves logs ---------------------------------------------------------------------------
    def start_kubelet(self, cert_dir: Path) -> None:
        """A node whose kubelet endpoint is a local HTTPS server returning ``kubelet_lines[pod]``."""
        cert, key = cert_dir / "kubelet.crt", cert_dir / "kubelet.key"
        if not cert.exists():
            subprocess.run(
                [
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    str(key),
                    "-out",
                    str(cert),
                    "-days",
                    "2",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
                capture_output=True,
                check=True,
            )
        lines = self.kubelet_lines

        class Kubelet(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # /containerLogs/<namespace>/<pod>/<container>?follow=true
                pod = self.path.split("?")[0].split("/")[3]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                for line in lines.get(pod, []):
                    self.wfile.write(line.encode() + b"\n")
                    self.wfile.flush()
                    time.sleep(0.05)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Kubelet)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._kubelet = server
        node = "node-1"
        with contextlib.suppress(Exception):  # another test made it: only the port changes
            self.core.create_node({"metadata": {"name": node}})
        self.core.patch_node_status(
            node,
            {
                "status": {
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": server.server_address[1]}},
                }
            },
        )

    def stop_kubelet(self) -> None:
        if getattr(self, "_kubelet", None):
            self._kubelet.shutdown()

    def create_worker_pod(self, job: str, index: int = 0) -> None:
        """The pod the operator makes for a worker, bound to our node."""
        body = {
            "metadata": {"name": f"{job}-worker-{index}"},
            "spec": {
                "nodeName": "node-1",
                "automountServiceAccountToken": False,
                "containers": [{"name": "worker", "image": "dschat"}],
            },
        }
        self.core.create_namespaced_pod(self.namespace, body)


@pytest.fixture
def namespace(k8s_cluster, request):
    """A fresh namespace per test (with the PVC the samples use), deleted afterwards."""
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(k8s_cluster[0]))
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{int(time.time() * 1000) % 100000}"
    api.create_namespace({"metadata": {"name": name}})
    api.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
    pvc = {
        "metadata": {"name": "dschat"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "600Gi"}}},
    }
    api.create_namespaced_persistent_volume_claim(name, pvc)
    yield name
    api.delete_namespace(name)


@pytest.fixture
def operator(k8s_cluster, namespace, tmp_path):
    op = Operator(k8s_cluster[0], namespace)
    yield op
    op.stop_kubelet()


@pytest.fixture
def t9k(register, k8s_cluster, namespace, monkeypatch):
    """The t9k backend registered, KUBECONFIG pointing at the test API server, the test's namespace."""
    monkeypatch.setenv("KUBECONFIG", k8s_cluster[0])
    register(t9k_plugin, "t9k")
    return namespace
