"""The ``dschat-core`` command line."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import click

from . import __version__, plugins
from .config import STAGES, dump_config, load_config
from .errors import UserError
from .launch import (
    STAGE_CHOICES,
    check_backend_settings,
    depends_on,
    final_status,
    plan_stages,
    stages_of,
    submit_stages,
)
from .plugins import choose_backend, get_backend, get_backends, get_dataset_formats

CONFIG_OPTION = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=True),
    default=None,
    help="Run-config YAML file (defaults apply to everything it leaves out).",
)
SET_OPTION = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set sft.zero_stage=3 (repeatable; values are YAML).",
)


def _backend_option(required: bool):
    return click.option(
        "-b",
        "--backend",
        "backend_name",
        required=required,
        default=None,
        help="Launch backend: local, slurm, t9k (see `dschat-core backends`).",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dschat-core")
def cli() -> None:
    """Three-stage RLHF (SFT, reward model, PPO) on DeepSpeed, launched locally, on Slurm or on T9K.

    \b
    Examples:
      dschat-core backends
      dschat-core train --backend local --stage preflight --set topology.gpus_per_node=2
      dschat-core train --backend local --stage all -c samples/tiny-cpu.yaml
      dschat-core config show -c run.yaml
    """


def quiet_libraries() -> None:
    """No progress bars from `datasets` and transformers where a command prints its own answer, and none of
    transformers' notes that say nothing to a user here (a tensor-parallel plan unused on one process)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.get_logger("transformers.distributed.tensor_parallel").setLevel(hf_logging.ERROR)


def _distribution_of(obj: object) -> tuple[str, str]:
    """The installed package (name, version) whose module defines ``obj`` (a function, or an object's class)."""
    module = obj.__module__ if callable(obj) and hasattr(obj, "__code__") else type(obj).__module__
    top = module.split(".")[0]
    for dist in packages_distributions().get(top, []):
        try:
            return dist, version(dist)
        except PackageNotFoundError:
            continue
    return top, "unknown"


@cli.command()
def backends() -> None:
    """List the installed launch backends and the packages that provide them.

    \b
    Example:
      dschat-core backends
    """
    found = get_backends()
    if not found:
        click.echo("no backends installed; fix: pip install dschat-adapter-local (or -slurm, -t9k)")
        return
    for name, backend in sorted(found.items()):
        dist, ver = _distribution_of(backend)
        click.echo(f"{name}\t{dist} {ver}")


@cli.command()
@_backend_option(required=False)
@click.option(
    "-s",
    "--stage",
    type=click.Choice(STAGE_CHOICES),
    default="all",
    show_default=True,
    help="preflight checks the cluster; all runs sft and reward, then ppo on their outputs.",
)
@CONFIG_OPTION
@SET_OPTION
@click.option("--dry-run", is_flag=True, help="Print exactly what would be submitted; submit nothing.")
@click.option("--detach", is_flag=True, help="Return after submitting instead of waiting for the jobs.")
def train(
    backend_name: str | None,
    stage: str,
    config_path: str | None,
    overrides: tuple[str, ...],
    dry_run: bool,
    detach: bool,
) -> None:
    """Validate the run config, then launch STAGE on the backend.

    Every check (config keys and values, topology, paths the platform can see) runs before anything is
    submitted; bad input exits with code 2. Without --detach the command waits, and its exit code is the
    job's outcome. Without --backend: the config's `backend:`, else the only installed backend.

    \b
    Examples:
      dschat-core train -b local --stage preflight --set topology.gpus_per_node=2
      dschat-core train -b local --stage sft -c run.yaml --set sft.zero_stage=2
      dschat-core train -b slurm --stage all -c run.yaml --dry-run
    """
    config = load_config(config_path, overrides)
    backend = choose_backend(backend_name, config.backend)
    if dry_run:
        names = stages_of(stage, config)
        plans, finished = plan_stages(config, backend, names)
        for index, plan_ in enumerate(plans):
            after = [f"<{dep} job>" for dep in depends_on(config, plan_.stage) if dep in names]
            if index:  # several documents: a YAML stream (T9K's manifests) reads them apart
                click.echo("---")
            click.echo(f"# --- stage {plan_.stage}: {plan_.job_name} ---")
            click.echo(backend.render(plan_, after).rstrip("\n"))
        for exc in finished:  # what would run, and that it would not, yet
            click.echo(f"# would refuse: {exc.format_message()}")
        return
    submitted = submit_stages(
        config,
        backend,
        stage,
        on_submit=lambda rec: click.echo(f"stage {rec.stage}: job {rec.job_id}", err=True),
        detach=detach,
    )
    if detach:
        click.echo(f"detached; follow with: dschat-core logs {submitted[-1].job_id} -b {backend.name} -f", err=True)
        return
    status = final_status(backend, submitted)
    click.echo(f"done: {status.describe()}", err=True)
    from .report import summary_line

    storage = backend.storage(config)
    for record in submitted:  # what each stage achieved and where its model is, where this machine can see it
        if record.stage in STAGES:
            output = Path(storage.stage_output(config, record.stage))
            if output.exists():
                click.echo(summary_line(record.stage, output), err=True)


@cli.command()
@click.argument("job_id", required=False)
@_backend_option(required=False)
@click.option("-n", "--last", default=10, show_default=True, help="Without JOB_ID: how many jobs per backend.")
@click.option("--all", "every", is_flag=True, help="Without JOB_ID: jobs of every storage root, not just this one's.")
@CONFIG_OPTION
@SET_OPTION
def status(
    job_id: str | None,
    backend_name: str | None,
    last: int,
    every: bool,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Show a job's state; the exit code is 0 while it runs or after success, 1 after failure. Without JOB_ID,
    list the latest jobs of every installed backend (or of --backend) submitted with this storage root (the
    config's storage.root, by default the backend's: this folder for local and Slurm), or of every root (--all).
    The backend of JOB_ID is found from its job record. UNKNOWN: the job's supervisor or scheduler is gone
    without recording an outcome (the machine restarted, or it was killed by hand); its log tells how far it got.

    \b
    Examples:
      dschat-core status
      dschat-core status --all -n 20
      dschat-core status dschat-sft-20261127-120000-ab12
    """
    if job_id is None:
        config = load_config(config_path, overrides)
        backends = [get_backend(backend_name)] if backend_name else list(get_backends().values())
        for backend in backends:
            root = None if every else backend.storage(config).root
            listed = backend.recent_jobs(last, root)
            for recent in listed:
                try:
                    found = backend.status(recent)
                except click.ClickException as exc:  # a job the platform forgot, a cluster out of reach
                    click.echo(f"{backend.name}\t{recent}: {exc.format_message()}")
                    continue
                click.echo(f"{backend.name}\t{found.describe()}  [{found.details.get('stage', '')}]")
            if root is not None:
                others = len(backend.recent_jobs(1 << 30)) - len(backend.recent_jobs(1 << 30, root))
                if others:
                    click.echo(f"{backend.name}\t({others} job(s) of other storage roots than {root}: status --all)")
        return
    result = choose_backend(backend_name, job_id=job_id).status(job_id)
    click.echo(result.describe())
    for key, value in result.details.items():
        click.echo(f"  {key}: {value}")
    if result.finished and not result.succeeded:
        sys.exit(1)


@cli.command()
@click.argument("job_id")
@_backend_option(required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
def logs(job_id: str, backend_name: str | None, follow: bool) -> None:
    """Print a job's training log.

    \b
    Example:
      dschat-core logs dschat-sft-20261127-120000-ab12 -f
    """
    for line in choose_backend(backend_name, job_id=job_id).logs(job_id, follow=follow):
        click.echo(line.rstrip("\n"))


@cli.command()
@click.argument("job_id")
@_backend_option(required=False)
def cancel(job_id: str, backend_name: str | None) -> None:
    """Stop a job and every process it started.

    \b
    Example:
      dschat-core cancel dschat-sft-20261127-120000-ab12
    """
    choose_backend(backend_name, job_id=job_id).cancel(job_id)
    click.echo(f"cancelled {job_id}")


@cli.command()
def rewards() -> None:
    """List the registered reward functions for stage 3 (ppo.reward_functions): name, verifier or reward, the
    package that provides it, its settings with their defaults, and what it rewards.

    \b
    Example:
      dschat-core rewards
    """
    from .plugins import get_reward_functions
    from .rewards import REQUIRED, settings_of

    for name, function in sorted(get_reward_functions().items()):
        dist, ver = _distribution_of(function.fn)
        shown = [f"{k} (required)" if v == REQUIRED else f"{k}={v!r}" for k, v in settings_of(function).items()]
        settings = ", ".join(shown) or "none"
        kind = "verifier" if function.verifier else "reward"
        click.echo(f"{name}\t{kind}\t{dist} {ver}\tsettings: {settings}\t{function.description}")


@cli.command("environments")
def environments() -> None:
    """List the registered environments for multi-turn stage 3 (ppo.environment.name): name, the package that
    provides it, the strings that end a model turn, its settings with their defaults, and what it does.

    \b
    Example:
      dschat-core environments
    """
    from .plugins import get_environments

    for name, environment in sorted(get_environments().items()):
        dist, ver = _distribution_of(environment.start)
        settings = ", ".join(f"{k}={v!r}" for k, v in environment.defaults().items()) or "none"
        stops = " ".join(environment.stop)
        click.echo(f"{name}\t{dist} {ver}\tstops: {stops}\tsettings: {settings}\t{environment.description}")


@cli.group("config")
def config_group() -> None:
    """Inspect run configs."""


@config_group.command("show")
@CONFIG_OPTION
@SET_OPTION
def config_show(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved config, defaults included, after validation.

    \b
    Examples:
      dschat-core config show
      dschat-core config show -c run.yaml --set ppo.kl_ctl=0.05
    """
    config = load_config(config_path, overrides)
    check_backend_settings(config)
    click.echo(dump_config(config), nl=False)


@config_group.command("reference")
def config_reference_command() -> None:
    """Print the configuration reference (Markdown) generated from the schema.

    \b
    Example:
      dschat-core config reference > docs/configuration.md
    """
    from .reference import config_reference

    click.echo(config_reference(), nl=False)


@cli.group("model")
def model_group() -> None:
    """Prepare models."""


@model_group.command("init-tiny")
@click.option("--arch", type=click.Choice(["opt", "llama", "gpt2"]), default="opt", show_default=True)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write the Hugging Face model and tokenizer to.",
)
@click.option("--hidden", default=64, show_default=True, help="Hidden size.")
@click.option("--layers", default=2, show_default=True, help="Transformer layers.")
@click.option("--heads", default=4, show_default=True, help="Attention heads.")
@click.option("--vocab-size", default=512, show_default=True, help="BPE vocabulary trained on the shipped text.")
@click.option("--seed", default=0, show_default=True, help="Initialisation seed.")
@click.option(
    "--tools",
    is_flag=True,
    help="The tiny tools task's model: its tokenizer with the calculator's markup as tokens, and its own shape "
    "(hidden 128, 3 layers, 4 heads).",
)
def model_init_tiny(
    arch: str, output: str, hidden: int, layers: int, heads: int, vocab_size: int, seed: int, tools: bool
) -> None:
    """Write a randomly initialised small model of a real architecture plus a tokenizer trained on shipped
    text — an ordinary Hugging Face folder, for tests and the CPU default.

    \b
    Example:
      dschat-core model init-tiny --arch llama -o models/tiny-llama
    """
    from . import tiny_tools
    from .models import init_tiny

    if tools:
        path = tiny_tools.init_model(output, arch, vocab_size=vocab_size, seed=seed)
    else:
        path = init_tiny(arch, output, hidden=hidden, layers=layers, heads=heads, vocab_size=vocab_size, seed=seed)
    click.echo(f"wrote a tiny {arch} model to {path}")


@model_group.command("download")
@click.argument("name")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write the model to (e.g. storage.root/models/NAME).",
)
@click.option("--revision", default=None, help="Branch, tag or commit; default: main.")
@click.option("--attempts", default=5, show_default=True, help="Tries per step on network errors (resuming).")
def model_download(name: str, output: str, revision: str | None, attempts: int) -> None:
    """Download what training needs of a hub model — config, tokenizer files and one set of PyTorch weights
    (safetensors, else pytorch_model.bin; no Flax or TF copies) — resuming after a dropped connection.
    HF_ENDPOINT selects a mirror; HF_TOKEN (from your secret store) a private or gated model.

    \b
    Example:
      dschat-core model download facebook/opt-1.3b -o /shared/models/opt-1.3b
    """
    from .hub import download_model

    click.echo(f"downloaded {name} to {download_model(name, output, revision, attempts)}")


@cli.group("data")
def data_group() -> None:
    """Prepare datasets."""


@data_group.command("list")
def data_list() -> None:
    """List the dataset names training knows (data.data_path) and the columns each format reads; a local file or
    folder with those columns is recognised by them.

    \b
    Example:
      dschat-core data list
    """
    for name, fmt in sorted(get_dataset_formats().items()):
        kind = "pairwise" if fmt.pairwise else "demonstrations"
        extra = ", with reference answers" if fmt.to_reference else ""
        click.echo(f"{name}\t{kind}{extra}\tcolumns: {', '.join(fmt.columns)}")


@data_group.command("download")
@click.argument("name")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write the dataset to; point data.data_path at it.",
)
@click.option("--revision", default=None, help="Branch, tag or commit; default: main.")
@click.option("--attempts", default=5, show_default=True, help="Tries per step on network errors (resuming).")
def data_download(name: str, output: str, revision: str | None, attempts: int) -> None:
    """Download a dataset's files from the hub into a folder that training reads offline, with its format and
    source recorded in dschat-dataset.json; resumes after a dropped connection.

    \b
    Example:
      dschat-core data download Dahoas/rm-static -o /shared/datasets/Dahoas_rm_static
    """
    quiet_libraries()
    from .hub import download_dataset

    raw = download_dataset(name, output, get_dataset_formats(), revision, attempts)
    click.echo(
        f"downloaded {name} to {output}: format {raw.fmt.name}, {len(raw.train)} train / {len(raw.eval)} eval rows"
    )


@data_group.command("import")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False))
@click.option("--format", "format_name", default=None, help="The dataset's format; default: from its columns.")
def data_import(source: str, output: str, format_name: str | None) -> None:
    """Import a folder of files downloaded by hand (dataset_infos.json, data/train-*.parquet,
    data/test-*.parquet, or JSON/JSONL) into a dataset folder with its format recorded.

    \b
    Example:
      dschat-core data import ~/Downloads/rm-static -o /shared/datasets/Dahoas_rm_static
    """
    quiet_libraries()
    from .hub import import_dataset

    raw = import_dataset(source, output, get_dataset_formats(), format_name)
    click.echo(
        f"imported {source} to {output}: format {raw.fmt.name}, {len(raw.train)} train / {len(raw.eval)} eval rows"
    )


@data_group.command("inspect")
@click.argument("source")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Run config whose data_split, lengths, seed and strictness to apply.",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--tokenizer", default=None, help="A model folder or hub id whose tokenizer measures lengths.")
def data_inspect(source: str, config_path: str | None, overrides: tuple[str, ...], tokenizer: str | None) -> None:
    """Schema, rows per split and per stage, token-length percentiles and what each stage would drop — checked
    exactly as training checks (bad data fails here with the same message and exit code 2).

    \b
    Example:
      dschat-core data inspect /shared/datasets/Dahoas_rm_static --tokenizer facebook/opt-1.3b
    """
    from .data.inspect import format_report, inspect_dataset, position_warnings
    from .model_checks import _local_config, positions

    quiet_libraries()
    config = load_config(config_path, overrides)
    tok, limit = None, None
    if tokenizer:
        from .models import load_tokenizer

        tok = load_tokenizer(tokenizer, config.trust_remote_code)
        model_config = _local_config(tokenizer, config.trust_remote_code)
        limit = positions(model_config) if model_config is not None else None
    report = inspect_dataset(source, get_dataset_formats(), config, tok)
    click.echo(format_report(report))
    for line in position_warnings(report, limit):
        click.echo(line, err=True)


@data_group.command("make-tiny")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=1234, show_default=True)
def data_make_tiny(output: str, seed: int) -> None:
    """Write the tiny preference task: tiny-prefs (pairwise, rm-static schema) and tiny-sft (mixed demos),
    tiny-qa (questions and reference answers), tiny-text (PTX), the same task as conversations (tiny-chat-prefs,
    -sft, -qa) and the tiny tools task (tiny-tools-qa, -sft).

    \b
    Example:
      dschat-core data make-tiny -o samples/data
    """
    from . import tiny_tools
    from .tiny_task import write_sample

    tiny_tools.write_sample(output, seed)
    click.echo(f"wrote the tiny task to {write_sample(output, seed)}")


@cli.command("chat")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--max-new-tokens", default=128, show_default=True, help="Longest answer, in tokens.")
@click.option("--temperature", default=0.0, show_default=True, help="0 decodes greedily; above 0 samples.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repository to run its own code.")
def chat_command(model_dir: str, max_new_tokens: int, temperature: float, trust_remote_code: bool) -> None:
    """Talk to a trained model (stage 1 or stage 3 actor) in DeepSpeed-Chat's prompt format; tokens are printed
    as they are generated. Type `clear` to start over, `quit` to leave.

    \b
    Example:
      dschat-core chat runs/tiny-cpu/ppo/actor
    """
    from .chat import chat

    quiet_libraries()
    chat(
        model_dir,
        max_new_tokens,
        temperature,
        trust_remote_code,
        read=lambda prompt: click.prompt(prompt, prompt_suffix="", default="", show_default=False),
        write=lambda text: click.echo(text, nl=False),
    )


@cli.command("eval")
@click.option(
    "--stage",
    type=click.Choice(["sft", "reward", "ppo", "rl", "dpo"]),
    required=True,
    help="rl: stage 3 scored by the run's reward functions (its verifiers' accuracy too).",
)
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--baseline",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Compare with this model (sft: the pretrained model; ppo: the stage-1 actor).",
)
@click.option(
    "--reward-model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Stage 3: the reward model that scores the answers.",
)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Run config: which data, split and seed give the held-out prompts.",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Use only the first N held-out rows or prompts (default: what training evaluates).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Longest answer (default: ppo.max_answer_seq_len; 64 for sft).",
)
def eval_command(
    stage: str,
    model: str,
    baseline: str | None,
    reward_model: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    count: int | None,
    max_new_tokens: int | None,
) -> None:
    """Evaluate a trained model on held-out data, beside its baseline: stage 1 perplexity and answers, stage 2
    pair accuracy with the value head loaded, stage 3 reward of greedy answers (and, with reward functions, the
    verifiers' accuracy), DPO's implicit-reward accuracy and margins.

    \b
    Examples:
      dschat-core eval --stage sft runs/tiny-cpu/actor --baseline samples/models/tiny-opt -c samples/tiny-cpu.yaml
      dschat-core eval --stage reward runs/tiny-cpu/reward -c samples/tiny-cpu.yaml
      dschat-core eval --stage ppo runs/tiny-cpu/ppo/actor --baseline runs/tiny-cpu/actor \\
          --reward-model runs/tiny-cpu/reward -c samples/tiny-cpu.yaml
      dschat-core eval --stage rl runs/tiny-cpu-grpo/ppo/actor --baseline runs/tiny-cpu-grpo/actor \\
          -c samples/tiny-cpu-grpo.yaml
    """
    quiet_libraries()
    from .evaluate import evaluate, find_run_config, format_result
    from .models import check_model_folder

    stage = "ppo" if stage == "rl" else stage
    check_model_folder(model, "the model to evaluate", reward=stage == "reward")
    for other in (baseline, reward_model):
        if other:
            check_model_folder(other, "the baseline or reward model", reward=other == reward_model)
    if config_path is None:
        config_path = find_run_config(model, stage)
        click.echo(f"using the run's config: {config_path}", err=True)
    config = load_config(config_path, overrides)
    click.echo(format_result(stage, evaluate(stage, config, model, baseline, reward_model, count, max_new_tokens)))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", default=None, help="Folder for a comparison (default: report-A-vs-B here).")
def report(run_dirs: tuple[str, ...], output: str | None) -> None:
    """Plot a run's curves (loss, accuracy, reward, KL, losses, lengths, time split, throughput) to
    RUN_DIR/report/*.png, with a Markdown summary and sample answers beside them. With several runs, overlay
    their curves and tabulate their final figures and the settings they differ in.

    \b
    Examples:
      dschat-core report runs/tiny-cpu
      dschat-core report runs/lr-3e-3 runs/lr-1e-3 -o report-lr
    """
    from .report import compare_runs, write_report

    try:
        if len(run_dirs) == 1:
            written = write_report(run_dirs[0])
        else:
            default = "report-" + "-vs-".join(Path(r).name for r in run_dirs)
            written = compare_runs(list(run_dirs), output or default)
    except FileNotFoundError as exc:
        raise UserError(f"{exc}; fix: point at run folders (storage.root/runs/RUN_NAME)") from None
    for path in written:
        click.echo(f"wrote {path}")


@cli.command()
def sinks() -> None:
    """List the registered metric sinks (tracking.sinks) and whether each can start here.

    \b
    Example:
      dschat-core sinks
    """
    from .plugins import get_metric_sinks
    from .tracking import missing_package

    for name, sink in sorted(get_metric_sinks().items()):
        problem = missing_package(sink)
        click.echo(f"{name}\t{'ready' if not problem else 'not installed'}\t{sink.description}")


def build_cli() -> click.Group:
    """The CLI with every plugin's commands added (``register_commands``)."""
    plugins.get_plugin_manager().hook.register_commands(cli=cli)
    return cli


def main() -> None:
    build_cli()(prog_name="dschat-core")


if __name__ == "__main__":
    main()
