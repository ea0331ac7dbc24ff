"""The t9k backend against a real Kubernetes API server with the project's DeepSpeedJob CRD: samples accepted,
submit / status / watch / cancel / logs, the stage chain, PVC checks, RBAC, and the download job's commands."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dschat_core.cli import build_cli, cli
from dschat_core.config import decode_config, load_config
from dschat_core.testing import BackendContract
from dschat_t9k.manifests import GROUP, PLURAL, VERSION
from dschat_t9k.samples import write_samples

from .conftest import _free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "t9k"
SMALL = [
    "--set",
    "sft.model_name_or_path=/t9k/mnt/hf-models/facebook_opt_1.3b",
    "--set",
    "reward.model_name_or_path=/t9k/mnt/hf-models/facebook_opt_350m",
    "--set",
    "backends.t9k.image=dschat:test",
]


def run_cli(*args: str) -> subprocess.Popen:
    """The CLI in its own process (it waits while the test plays the operator)."""
    env = {**os.environ, "DSCHAT_PLUGINS": "t9k"}
    return subprocess.Popen(
        [sys.executable, "-c", "from dschat_core.cli import main; main()", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def config_of(job: dict):
    args = job["spec"]["config"]["run"]["module"]
    return decode_config(args[args.index("--config-data") + 1])


def test_samples_are_current(tmp_path):
    written = write_samples(tmp_path)
    for path in written:
        relative = path.relative_to(tmp_path)
        assert (SAMPLES / relative).read_text() == path.read_text(), f"run: dschat-core t9k samples ({relative})"
    assert sorted(p.relative_to(SAMPLES) for p in SAMPLES.rglob("*.yaml")) == sorted(
        p.relative_to(tmp_path) for p in written
    )


def test_dry_run_of_the_multi_node_sample_is_the_seeds_actor_job(register):
    from dschat_t9k import plugin

    register(plugin, "t9k")
    result = CliRunner().invoke(
        cli, ["train", "--backend", "t9k", "--stage", "sft", "-c", str(SAMPLES / "multi-node.yaml"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.output)
    # The seed's actor-multi-node.yaml: 2 workers x 8 GPUs, 8 slots each, the PVC at /t9k/mnt, shm, IPC_LOCK.
    assert (job["apiVersion"], job["kind"]) == ("batch.tensorstack.dev/v1beta1", "DeepSpeedJob")
    assert job["spec"]["config"]["slotsPerWorker"] == 8 and job["spec"]["worker"]["replicas"] == 2
    pod = job["spec"]["worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "worker" and container["workingDir"] == "/t9k/mnt/"
    assert container["resources"]["requests"] == {"cpu": 16, "memory": "256Gi", "nvidia.com/gpu": 8}
    assert container["resources"]["limits"] == {"cpu": 32, "memory": "512Gi", "nvidia.com/gpu": 8}
    assert container["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
    assert {"name": "data", "mountPath": "/t9k/mnt"} in container["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "dschat"}} in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    # Its arguments: OPT-66B, batch 8/8, seq 512, lr 1e-4, wd 0.1, 2 epochs, grad ckpt, ZeRO 2, LoRA 128.
    assert job["spec"]["config"]["run"]["module"][:2] == ["dschat_core.worker", "sft"]
    config = config_of(job)
    sft = config.sft
    assert sft.model_name_or_path == "/t9k/mnt/hf-models/facebook_opt_66b"
    assert (sft.per_device_train_batch_size, sft.per_device_eval_batch_size, sft.max_seq_len) == (8, 8, 512)
    assert (sft.learning_rate, sft.weight_decay, sft.num_train_epochs) == (1e-4, 0.1, 2)
    assert sft.gradient_checkpointing and sft.zero_stage == 2 and sft.lora_dim == 128
    assert sft.lora_module_name == "decoder.layers." and sft.lr_scheduler_type == "cosine" and config.seed == 1234
    assert config.data.data_split == "2,4,4" and len(config.data.data_path) == 3
    assert sft.output_dir == "/t9k/mnt/output/multi-node/actor-models/66b"
    assert "learning_rate: 0.0001" in job["metadata"]["annotations"]["dschat/config"]


def test_the_seed_walkthrough_sample_has_the_seeds_own_shape():
    """The seed's text walks through actor-multi-node.yaml as 2 workers x 2 GPUs on OPT-1.3B with the PVC `gpt`,
    the model landing in /t9k/mnt/output/multi-node/actor-models/1.3b: a T9K user recognises it."""
    job = yaml.safe_load((SAMPLES / "seed-walkthrough" / "actor.yaml").read_text())
    assert job["spec"]["worker"]["replicas"] == 2 and job["spec"]["config"]["slotsPerWorker"] == 2
    pod = job["spec"]["worker"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "gpt"}} in pod["volumes"]
    config = config_of(job)
    assert config.sft.model_name_or_path == "/t9k/mnt/hf-models/facebook_opt_1.3b"
    assert config.sft.output_dir == "/t9k/mnt/output/multi-node/actor-models/1.3b"


def test_every_sample_is_accepted_by_the_api_server(k8s_cluster, operator):
    """Created for real (the CRD's schema would prune unknown fields: nothing may be lost) and each pod template
    checked by the API server's full Pod validation (dry run)."""
    samples = sorted(SAMPLES.rglob("*.yaml"))
    jobs = [(p, yaml.safe_load(p.read_text())) for p in samples]
    jobs = [(p, j) for p, j in jobs if j.get("kind") == "DeepSpeedJob"]
    assert len(jobs) == 18  # 4 topologies x 4 stages (sft, reward, ppo, dpo), download, debug
    for path, job in jobs:
        created = operator.jobs.create_namespaced_custom_object(GROUP, VERSION, operator.namespace, PLURAL, job)
        assert created["spec"] == job["spec"], f"{path}: the API server dropped or changed fields"
        spec = yaml.safe_load(yaml.safe_dump(job["spec"]["worker"]["template"]["spec"]))
        for container in spec["containers"]:  # this client types quantities as strings; the server takes both
            for bucket in container["resources"].values():
                bucket.update({k: str(v) for k, v in bucket.items()})
        pod = {
            "metadata": {"name": f"{job['metadata']['name']}-worker-0"},
            "spec": {**spec, "automountServiceAccountToken": False},
        }
        operator.core.create_namespaced_pod(operator.namespace, pod, dry_run="All")


def test_the_crd_refuses_what_the_reference_forbids(operator):
    from kubernetes.client.exceptions import ApiException

    job = yaml.safe_load((SAMPLES / "single-gpu" / "actor.yaml").read_text())
    job["spec"]["config"]["run"]["python"] = ["main.py"]  # run takes exactly one of python / module / exec
    with pytest.raises(ApiException) as refused:
        operator.jobs.create_namespaced_custom_object(GROUP, VERSION, operator.namespace, PLURAL, job)
    assert refused.value.status == 422


def test_submit_status_watch_cancel(t9k, operator):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "-b",
            "t9k",
            "--stage",
            "sft",
            "--detach",
            "-c",
            str(SAMPLES / "single-gpu.yaml"),
            "--set",
            f"backends.t9k.namespace={t9k}",
        ],
    )
    assert result.exit_code == 0, result.output
    name = "opt-1-3b-single-gpu-sft"
    job = operator.wait_for_job(name)
    assert config_of(job).sft.output_dir == "/t9k/mnt/output/single-gpu/actor-models/1.3b"
    shown = CliRunner().invoke(cli, ["status", name, "-b", "t9k"])
    assert shown.exit_code == 0 and "PENDING" in shown.output and "T9K operator" in shown.output
    operator.set_phase(name, "Running")
    shown = CliRunner().invoke(cli, ["status", name, "-b", "t9k"])
    assert "RUNNING" in shown.output and f"{name}-worker-0=Running" in shown.output
    assert "conditions: Initialized, Running" in shown.output
    # A second submission of a running job is refused, not duplicated.
    again = CliRunner().invoke(
        cli,
        [
            "train",
            "-b",
            "t9k",
            "--stage",
            "sft",
            "--detach",
            "-c",
            str(SAMPLES / "single-gpu.yaml"),
            "--set",
            f"backends.t9k.namespace={t9k}",
        ],
    )
    assert again.exit_code == 2 and "already exists" in again.output
    cancelled = CliRunner().invoke(cli, ["cancel", name, "-b", "t9k"])
    assert cancelled.exit_code == 0, cancelled.output
    assert operator.job(name) is None
    shown = CliRunner().invoke(cli, ["status", name, "-b", "t9k"])
    assert shown.exit_code == 1 and "CANCELLED" in shown.output


def test_train_waits_and_exits_with_the_jobs_outcome(t9k, operator, k8s_cluster):
    process = run_cli(
        "train",
        "-b",
        "t9k",
        "--stage",
        "reward",
        "-c",
        str(SAMPLES / "single-gpu.yaml"),
        "--set",
        f"backends.t9k.namespace={t9k}",
    )
    name = "opt-1-3b-single-gpu-reward"
    operator.wait_for_job(name)
    operator.set_phase(name, "Running")
    time.sleep(1)
    assert process.poll() is None  # still watching
    operator.set_phase(name, "Failed", f"DeepSpeedJob {name} has failed: {name}-worker-0 failed with exit code 137")
    code, output = finish(process)
    assert code == 1, output
    assert "stage reward did not succeed" in output and "exit code 137" in output
    # A rerun replaces the failed job (it will resume from its checkpoint).
    rerun = run_cli(
        "train",
        "-b",
        "t9k",
        "--stage",
        "reward",
        "--detach",
        "-c",
        str(SAMPLES / "single-gpu.yaml"),
        "--set",
        f"backends.t9k.namespace={t9k}",
    )
    code, output = finish(rerun)
    assert code == 0 and "replacing" in output, output
    assert "status" not in operator.job(name) or not operator.job(name)["status"]


def test_stage_all_submits_ppo_only_after_sft_and_reward_succeed(t9k, operator):
    process = run_cli(
        "train",
        "-b",
        "t9k",
        "--stage",
        "all",
        "-c",
        str(SAMPLES / "single-node.yaml"),
        "--set",
        f"backends.t9k.namespace={t9k}",
    )
    run = "opt-13b-single-node"
    operator.wait_for_job(f"{run}-sft")
    operator.wait_for_job(f"{run}-reward")
    time.sleep(1)
    assert operator.job(f"{run}-ppo") is None
    operator.set_phase(f"{run}-sft", "Succeeded")
    time.sleep(1.5)
    assert operator.job(f"{run}-ppo") is None  # the reward model is not done yet
    operator.set_phase(f"{run}-reward", "Succeeded")
    ppo = operator.wait_for_job(f"{run}-ppo", timeout=30)
    config = config_of(ppo)
    assert config.ppo.actor_model_name_or_path == "/t9k/mnt/output/single-node/actor-models/13b"
    assert config.ppo.critic_model_name_or_path == "/t9k/mnt/output/single-node/reward-models/350m"
    assert config.ppo.output_dir == "/t9k/mnt/output/single-node/step3-models/13b"
    assert ppo["spec"]["config"]["otherArgs"] == ["--master_port=12346"]
    operator.set_phase(f"{run}-ppo", "Succeeded")
    code, output = finish(process)
    assert code == 0, output
    assert f"stage ppo: job {run}-ppo" in output and "SUCCEEDED" in output


def test_stage_all_stops_when_a_stage_fails(t9k, operator):
    process = run_cli(
        "train",
        "-b",
        "t9k",
        "--stage",
        "all",
        "-c",
        str(SAMPLES / "single-gpu.yaml"),
        "--set",
        f"backends.t9k.namespace={t9k}",
    )
    run = "opt-1-3b-single-gpu"
    operator.wait_for_job(f"{run}-reward")
    time.sleep(1)  # the command is now watching sft and reward
    operator.set_phase(f"{run}-sft", "Succeeded")
    operator.set_phase(f"{run}-reward", "Failed", f"{run}-reward-worker-0 failed with exit code 1")
    code, output = finish(process)
    assert code == 1, output
    assert "stage reward did not succeed" in output and "was not created" in output
    assert operator.job(f"{run}-ppo") is None


def test_logs_follow_worker_0(t9k, operator, tmp_path):
    operator.start_kubelet(tmp_path)
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "-b",
            "t9k",
            "--stage",
            "sft",
            "--detach",
            "-c",
            str(SAMPLES / "multi-node.yaml"),
            "--set",
            f"backends.t9k.namespace={t9k}",
        ],
    )
    assert result.exit_code == 0, result.output
    name = "opt-66b-multi-node-sft"
    early = CliRunner().invoke(cli, ["logs", name, "-b", "t9k"])
    assert early.exit_code == 1 and f"no log from {name}-worker-0 yet" in early.output
    operator.kubelet_lines[f"{name}-worker-0"] = [f"{name}-worker-1: step {i} loss 2.{i}" for i in range(5)]
    operator.create_worker_pod(name)
    operator.set_phase(name, "Running", replicas=2)
    followed = CliRunner().invoke(cli, ["logs", name, "-b", "t9k", "-f"])
    assert followed.exit_code == 0, followed.output
    assert followed.output.splitlines() == operator.kubelet_lines[f"{name}-worker-0"]


def test_pvc_missing_or_too_small_is_refused_before_submitting(t9k, operator):
    missing = CliRunner().invoke(
        cli,
        [
            "train",
            "-b",
            "t9k",
            "--stage",
            "sft",
            "--detach",
            "-c",
            str(SAMPLES / "single-gpu.yaml"),
            "--set",
            f"backends.t9k.namespace={t9k}",
            "--set",
            "backends.t9k.pvc=nope",
        ],
    )
    assert missing.exit_code == 2 and "no PVC 'nope'" in missing.output
    operator.core.create_namespaced_persistent_volume_claim(
        t9k,
        {
            "metadata": {"name": "small"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "50Gi"}}},
        },
    )
    small = CliRunner().invoke(
        cli,
        [
            "train",
            "-b",
            "t9k",
            "--stage",
            "all",
            "--detach",
            "-c",
            str(SAMPLES / "single-node.yaml"),
            "--set",
            f"backends.t9k.namespace={t9k}",
            "--set",
            "backends.t9k.pvc=small",
        ],
    )
    assert small.exit_code == 2
    assert "holds 50Gi" in small.output and "at least 100 GiB" in small.output
    assert operator.jobs.list_namespaced_custom_object(GROUP, VERSION, t9k, PLURAL)["items"] == []


def _service_account_kubeconfig(operator, k8s_cluster, tmp_path, account: str) -> Path:
    operator.core.create_namespaced_service_account(operator.namespace, {"metadata": {"name": account}})
    token = operator.core.create_namespaced_service_account_token(
        account, operator.namespace, {"spec": {"audiences": [], "expirationSeconds": 3600}}
    ).status.token
    config = yaml.safe_load(Path(k8s_cluster[0]).read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    config["contexts"][0]["context"].update(user=account, namespace=operator.namespace)
    path = tmp_path / f"{account}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_role_with_only_deepspeedjobs_and_pod_logs_is_enough(t9k, operator, k8s_cluster, tmp_path, monkeypatch):
    ns = operator.namespace
    operator.rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "dschat"},
            "rules": [
                {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["create", "get", "list", "watch", "delete"]},
                {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
            ],
        },
    )
    operator.rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "dschat"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dschat"},
            "subjects": [{"kind": "ServiceAccount", "name": "trainer", "namespace": ns}],
        },
    )
    monkeypatch.setenv("KUBECONFIG", str(_service_account_kubeconfig(operator, k8s_cluster, tmp_path, "trainer")))
    result = CliRunner().invoke(
        cli, ["train", "-b", "t9k", "--stage", "sft", "--detach", "-c", str(SAMPLES / "single-gpu.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "could not check PVC dschat" in result.output  # no permission to read PVCs: a warning, not a failure
    assert "persistentvolumeclaims (get)" in result.output and "deepspeedjobs (create" not in result.output
    name = "opt-1-3b-single-gpu-sft"
    operator.set_phase(name, "Running")
    assert "RUNNING" in CliRunner().invoke(cli, ["status", name, "-b", "t9k"]).output
    assert CliRunner().invoke(cli, ["cancel", name, "-b", "t9k"]).exit_code == 0

    # From inside a pod (a T9K Notebook, as the seed does): the service account's files, no kubeconfig at all.
    import kubernetes.config.incluster_config as incluster

    from dschat_t9k import kube

    account = yaml.safe_load((tmp_path / "trainer.kubeconfig").read_text())
    pod_files = tmp_path / "serviceaccount"
    pod_files.mkdir()
    (pod_files / "token").write_text(account["users"][0]["user"]["token"])
    (pod_files / "namespace").write_text(ns)
    shutil.copy(account["clusters"][0]["cluster"]["certificate-authority"], pod_files / "ca.crt")
    server = account["clusters"][0]["cluster"]["server"].removeprefix("https://")
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", server.split(":")[0])
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", server.split(":")[1])
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(pod_files / "token"))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(pod_files / "ca.crt"))
    monkeypatch.setattr(kube, "IN_CLUSTER_NAMESPACE", str(pod_files / "namespace"))
    inside = CliRunner().invoke(
        cli, ["train", "-b", "t9k", "--stage", "reward", "--detach", "-c", str(SAMPLES / "single-gpu.yaml")]
    )
    assert inside.exit_code == 0, inside.output
    assert operator.job("opt-1-3b-single-gpu-reward") is not None

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    monkeypatch.setenv("KUBECONFIG", str(_service_account_kubeconfig(operator, k8s_cluster, tmp_path, "nobody")))
    refused = CliRunner().invoke(
        cli, ["train", "-b", "t9k", "--stage", "sft", "--detach", "-c", str(SAMPLES / "single-gpu.yaml")]
    )
    assert refused.exit_code == 1
    message = refused.output.strip().splitlines()[-1]
    assert f"not allowed to get deepspeedjob {name} in namespace {ns}" in message and "pods/log (get)" in message


def test_bad_topology_and_settings_are_refused_before_anything(register):
    from dschat_t9k import plugin

    register(plugin, "t9k")
    cases = {
        ("backends.t9k.slots_per_worker=2", "topology.gpus_per_node=1"): "slotsPerWorker <= nvidia.com/gpu",
        ("backends.t9k.image=null",): "backends.t9k.image",
        ("storage.root=/data/elsewhere",): "is not on the PVC mounted at /t9k/mnt",
        ("backends.t9k.limits={nvidia.com/gpu: 2}",): "differs from topology.gpus_per_node",
        ("backends.t9k.env={'A B': x}",): "not an environment variable name",
        ("backends.t9k.pvc=Not_A_Name",): "not a Kubernetes name",
    }
    for overrides, expected in cases.items():
        args = [a for o in overrides for a in ("--set", o)]
        result = CliRunner().invoke(
            cli, ["train", "-b", "t9k", "--stage", "sft", "--dry-run", "-c", str(SAMPLES / "single-gpu.yaml"), *args]
        )
        assert result.exit_code == 2, (overrides, result.output)
        assert expected in result.output, (overrides, result.output)


def test_secrets_are_referenced_never_written(register):
    from dschat_t9k import plugin

    register(plugin, "t9k")
    result = CliRunner().invoke(
        build_cli(),
        [
            "t9k",
            "download",
            "--model",
            "facebook/opt-1.3b",
            "--dry-run",
            "--set",
            "backends.t9k.secret_env={HF_TOKEN: {secret: hf, key: token}}",
            "--set",
            "backends.t9k.image=dschat:test",
        ],
    )
    assert result.exit_code == 0, result.output
    env = yaml.safe_load(result.output)["spec"]["worker"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env
    assert not any(e["name"].endswith("OFFLINE") for e in env)  # downloads need the network; training does not


def test_download_job_runs_our_download_commands(tmp_path):
    """The job's command, run here against a local hub with the PVC root at a temporary folder, fetches what
    training then reads."""
    from dschat_core.models import init_tiny
    from dschat_core.tiny_task import make_rows
    from dschat_t9k.manifests import T9kLayout, download_job
    from dschat_t9k.settings import T9kSettings

    from ..data.hub_server import Hub, serve
    from ..data.test_hub import parquet_bytes

    model = init_tiny("opt", tmp_path / "src-model")
    hub = Hub(
        {
            ("model", "facebook/opt-tiny"): {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()},
            ("dataset", "Dahoas/rm-static"): {
                "data/train-00000-of-00001.parquet": parquet_bytes(make_rows(50, 1), tmp_path, "t.parquet")
            },
        }
    )
    server = serve(hub)
    try:
        root = tmp_path / "pvc"
        settings = T9kSettings(mount_path=str(root), env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
        job = download_job("dl", ["facebook/opt-tiny"], ["Dahoas/rm-static"], settings, T9kLayout(str(root)))
        container = job["spec"]["worker"]["template"]["spec"]["containers"][0]
        env = {
            **os.environ,
            "DSCHAT_PLUGINS": "",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            **{e["name"]: e["value"] for e in container["env"] if "value" in e},
        }
        done = subprocess.run(
            job["spec"]["config"]["run"]["exec"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.shutdown()
    assert (root / "hf-models" / "facebook_opt_tiny" / "config.json").exists()
    assert (root / "hf-datasets" / "Dahoas_rm_static" / "dschat-dataset.json").exists()
    assert (root / "hf-cache").is_dir()  # caches land on the PVC too


def test_status_reads_the_operators_real_dumps():
    from dschat_t9k.backend import status_of

    failed = {
        "metadata": {"name": "baichuan2-sft"},
        "status": {
            "phase": "Failed",
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "message": "DeepSpeedJob baichuan2-sft has failed: "
                    "baichuan2-sft-worker-0 failed with exit code 137",
                },
                {"type": "Completed", "status": "True"},
            ],
        },
    }
    result = status_of(failed)
    assert result.state.value == "FAILED" and "exit code 137" in result.reason
    # Completed=True alone is not success; the guide's `status` key for replicas is read too.
    running = {
        "metadata": {"name": "j"},
        "status": {
            "phase": "Running",
            "tasks": [{"type": "worker", "restartCount": 2, "status": [{"name": "j-worker-0", "phase": "Running"}]}],
        },
    }
    result = status_of(running)
    assert result.state.value == "RUNNING" and result.details["replicas"] == "j-worker-0=Running"
    assert result.details["restarts"] == 2


def test_encoded_config_is_one_shell_safe_token():
    from dschat_core.config import encode_config, load_config

    config = load_config(SAMPLES / "multi-node.yaml", ["run_name=x-y", "data.data_path=['/a b/$(id)', \"c'd\"]"])
    token = encode_config(config)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    assert decode_config(token).data.data_path == ["/a b/$(id)", "c'd"]
    assert b"backends" not in base64.urlsafe_b64decode(token)


def test_backend_doc_lists_every_setting():
    from dschat_core.reference import section_table
    from dschat_t9k.settings import T9kSettings

    doc = (REPO / "docs" / "backends" / "t9k.md").read_text()
    for line in section_table(T9kSettings, "backends.t9k")[2:]:
        assert line in doc


@pytest.mark.ranks
def test_a_rendered_job_trains_when_run_as_worker_0_would(tmp_path):
    """Run a rendered stage-1 job's launch on this machine as T9K's worker-0 does (the DeepSpeed launcher,
    ``slotsPerWorker`` processes, ``run.module``, the container's environment, the PVC as working directory):
    the config arrives through --config-data and the model lands where the seed's layout says."""
    from dschat_core.config import load_config
    from dschat_core.launch import plan
    from dschat_t9k.backend import T9kBackend

    pvc = tmp_path / "pvc"
    for part in ("models/tiny-opt", "data/tiny-prefs", "data/tiny-sft"):  # relative paths resolve on the PVC
        shutil.copytree(REPO / "samples" / part, pvc / "samples" / part)
    config = load_config(
        REPO / "samples" / "tiny-cpu.yaml",
        [
            f"backends.t9k.mount_path={pvc}",
            "backends.t9k.image=dschat:test",
            "sft.num_train_epochs=2",
            f"topology.master_port={_free_port()}",
        ],
    )
    backend = T9kBackend()
    job = backend.manifest(plan(config, backend, "sft"))
    launch = job["spec"]["config"]
    container = job["spec"]["worker"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and launch["slotsPerWorker"] == 2
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}}
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--num_gpus={launch['slotsPerWorker']}",
        *launch["otherArgs"],
        "--module",
        *launch["run"]["module"],
    ]
    done = subprocess.run(command, env=env, cwd=container["workingDir"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    output = pvc / "output" / "single-node" / "actor-models" / "tiny-cpu"
    assert (output / "dschat-finished.json").exists() and (output / "config.json").exists()
    assert (pvc / "hf-cache" / "dschat").is_dir()  # the tokenized data is cached on the PVC


@pytest.mark.ranks
class TestT9kContract(BackendContract):
    """The backend contract kit against the real API server; the test plays T9K's operator and a kubelet: it
    runs each created job's launch as worker-0 would (the DeepSpeed launcher, ``run.module``, the container's
    environment, the PVC as working directory), serves its output as worker-0's log, writes the job's phase,
    and on deletion gives the worker process SIGTERM, as a deleted pod's container gets."""

    @pytest.fixture(autouse=True)
    def _play_the_operator(self, operator, tmp_path):
        operator.start_kubelet(tmp_path)
        self.operator = operator
        self.pvc = tmp_path / "pvc"
        self.pvc.mkdir()

    @pytest.fixture
    def backend(self, t9k):
        from dschat_t9k.backend import T9kBackend

        self.namespace = t9k
        return T9kBackend()

    def config(self, tmp_path, *more):
        return load_config(
            None,
            [
                "topology.accelerator=cpu",
                "topology.gpus_per_node=1",
                f"backends.t9k.namespace={self.namespace}",
                "backends.t9k.image=dschat:test",
                f"backends.t9k.mount_path={self.pvc}",
                f"topology.master_port={_free_port()}",
                *more,
            ],
        )

    def drive(self, backend, job_id, plan_):
        threading.Thread(target=play_worker_0, args=(self.operator, job_id), daemon=True).start()


def play_worker_0(operator, name: str) -> None:
    job = operator.wait_for_job(name)
    launch = job["spec"]["config"]
    container = job["spec"]["worker"]["template"]["spec"]["containers"][0]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--num_gpus={launch['slotsPerWorker']}",
        *launch.get("otherArgs", []),
        "--module",
        *launch["run"]["module"],
    ]
    pod = f"{name}-worker-0"
    lines = operator.kubelet_lines.setdefault(pod, [])
    operator.create_worker_pod(name)
    operator.set_phase(name, "Running")
    worker = subprocess.Popen(
        command,
        env=env,
        cwd=container["workingDir"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in worker.stdout), daemon=True)
    reader.start()
    while worker.poll() is None:
        if operator.job(name) is None:  # deleted: the container gets SIGTERM, then SIGKILL after its grace
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
            return
        time.sleep(0.2)
    reader.join(timeout=10)
    if operator.job(name) is not None:
        ok = worker.returncode == 0
        operator.set_phase(
            name, "Succeeded" if ok else "Failed", "" if ok else f"{pod} failed with exit code {worker.returncode}"
        )
