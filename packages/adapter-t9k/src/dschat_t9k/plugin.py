"""Entry point of the ``t9k`` backend plugin: the backend and ``dschat-core t9k download|debug|samples``."""

from __future__ import annotations

import sys

import click

from dschat_core.cli import CONFIG_OPTION, SET_OPTION
from dschat_core.hookspecs import hookimpl

from .backend import T9kBackend
from .settings import is_dns_label


@hookimpl
def register_backends(register) -> None:
    register(T9kBackend())


def _settings(config_path: str | None, overrides: tuple[str, ...]):
    from dschat_core.config import load_config

    backend = T9kBackend()
    config = load_config(config_path, overrides)
    backend.check_root_on_pvc(config)  # a download or debug job works on the PVC too
    return backend, config, backend.settings(config), backend.storage(config)


def _launch(backend: T9kBackend, manifest: dict, settings, dry_run: bool, kind: str, config=None) -> tuple[str, str]:
    """Print (dry run) or create the job; its (name, namespace), or empty strings for a dry run."""
    from .kube import Kube
    from .manifests import to_yaml

    name = manifest["metadata"]["name"]
    if not is_dns_label(f"{name}-worker-0"):
        raise click.BadParameter(
            f"{name!r} is not a Kubernetes name (lowercase letters, digits, '-')", param_hint="--name"
        )
    if dry_run:
        click.echo(to_yaml(manifest).rstrip("\n"))
        return "", ""
    if not settings.image:
        raise click.UsageError(
            "backends.t9k.image is required: an image with dschat-core installed "
            "(--set backends.t9k.image=REGISTRY/IMAGE:TAG)"
        )
    kube = Kube(backend.target(settings))
    backend.check_pvc(kube, settings, config)
    name = backend.create(kube, manifest, settings, {"stage": kind})
    click.echo(f"{kind}: job {name} in namespace {kube.namespace}", err=True)
    return name, kube.namespace


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.group("t9k")
    def t9k_group() -> None:
        """T9K backend helpers: download and debug jobs, rendered samples."""

    @t9k_group.command("download")
    @click.option("--model", "models", multiple=True, metavar="REPO", help="Hub model to fetch (repeatable).")
    @click.option("--dataset", "datasets", multiple=True, metavar="NAME", help="Dataset to fetch (repeatable).")
    @click.option("--name", default="dschat-download", show_default=True, help="The DeepSpeedJob's name.")
    @CONFIG_OPTION
    @SET_OPTION
    @click.option("--dry-run", is_flag=True, help="Print the DeepSpeedJob; create nothing.")
    @click.option("--detach", is_flag=True, help="Return once the job is created.")
    def download(models, datasets, name, config_path, overrides, dry_run, detach) -> None:
        """Download models and datasets into the PVC with a job on the cluster.

        Runs `dschat-core model download` / `data download` there (retries, resume, only the files training
        needs) into hf-models/<org>_<name> and hf-datasets/<org>_<name> on the PVC, follows the log, and exits
        with the job's outcome. HF_TOKEN comes from backends.t9k.secret_env, HF_ENDPOINT from backends.t9k.env.

        \b
        Example:
          dschat-core t9k download --model facebook/opt-1.3b --model facebook/opt-350m \\
              --dataset Dahoas/rm-static -c run.yaml
        """
        from .manifests import download_job

        if not models and not datasets:
            raise click.UsageError("nothing to download: pass --model REPO and/or --dataset NAME")
        backend, _config, settings, layout = _settings(config_path, overrides)
        job, _namespace = _launch(
            backend, download_job(name, list(models), list(datasets), settings, layout), settings, dry_run, "download"
        )
        if not job:
            return
        for repo in models:
            click.echo(f"  {repo} -> {layout.model_dir(repo)}", err=True)
        for repo in datasets:
            click.echo(f"  {repo} -> {layout.dataset_dir(repo)}", err=True)
        if detach:
            return
        for line in backend.logs(job, follow=True):
            click.echo(line.rstrip("\n"))
        result = backend.wait(job)
        click.echo(f"done: {result.describe()}", err=True)
        if not result.succeeded:
            sys.exit(1)

    @t9k_group.command("debug")
    @click.option("--gpus", type=click.IntRange(min=0), default=1, show_default=True, help="GPUs for the worker.")
    @click.option("--name", default="dschat-debug", show_default=True, help="The DeepSpeedJob's name.")
    @CONFIG_OPTION
    @SET_OPTION
    @click.option("--dry-run", is_flag=True, help="Print the DeepSpeedJob; create nothing.")
    def debug(gpus, name, config_path, overrides, dry_run) -> None:
        """Start a debug-mode job (the environment, the PVC, no training) to work in interactively.

        \b
        Example:
          dschat-core t9k debug --gpus 1 -c run.yaml
          kubectl exec -it dschat-debug-worker-0 -- bash
        """
        from .manifests import debug_job

        backend, _config, settings, layout = _settings(config_path, overrides)
        job, namespace = _launch(backend, debug_job(name, gpus, settings, layout), settings, dry_run, "debug")
        if job:
            click.echo(f"open a shell once it runs: kubectl exec -it -n {namespace} {job}-worker-0 -- bash", err=True)
            click.echo(f"when done: dschat-core cancel {job} -b t9k", err=True)

    @t9k_group.command("samples")
    @click.option("-o", "--output", default="samples/t9k", show_default=True, help="Folder to write to.")
    def samples(output: str) -> None:
        """Render the DeepSpeedJobs of the seed's topologies (actor, reward, rlhf) and the download job.

        \b
        Example:
          dschat-core t9k samples -o samples/t9k
        """
        from .samples import write_samples

        for path in write_samples(output):
            click.echo(f"wrote {path}")
