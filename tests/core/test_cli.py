"""The dschat-core CLI: backends, train (dry-run, chains, failures), status/logs/cancel, config show."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from dschat_core.backend import JobState
from dschat_core.cli import cli
from dschat_core.errors import EXIT_BAD_INPUT

from .fake_backend import FakeBackend, FakePlugin

MODEL_SETS = [
    "--set",
    "sft.model_name_or_path=facebook/opt-1.3b",
    "--set",
    "reward.model_name_or_path=facebook/opt-350m",
]


@pytest.fixture
def fake(register):
    backend = FakeBackend()
    register(FakePlugin(backend), "fake")
    return backend


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_backends_lists_none_with_core_only():
    result = run("backends")
    assert result.exit_code == 0
    assert "no backends installed" in result.output


def test_backends_lists_registered(fake):
    result = run("backends")
    assert result.exit_code == 0
    assert result.output.startswith("fake\t")


@pytest.mark.parametrize(
    ("name", "package"),
    [("t9k", "dschat-adapter-t9k"), ("slurm", "dschat-adapter-slurm"), ("local", "dschat-adapter-local")],
)
def test_missing_backend_says_what_to_install(name, package):
    result = run("train", "--backend", name, "--stage", "sft")
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"pip install {package}" in result.output


def test_dry_run_renders_and_submits_nothing(fake):
    result = run("train", "-b", "fake", "--stage", "all", "--dry-run", *MODEL_SETS)
    assert result.exit_code == 0, result.output
    assert fake.submitted == []
    for stage in ("sft", "reward", "ppo"):
        assert f"# --- stage {stage}: dschat-{stage} ---" in result.output
        assert f"fake-run {stage} nodes=1 procs=1" in result.output


def test_all_chains_ppo_after_sft_and_reward(fake):
    result = run("train", "-b", "fake", "--stage", "all", *MODEL_SETS)
    assert result.exit_code == 0, result.output
    stages = [(plan.stage, after) for plan, after in fake.submitted]
    assert stages == [("sft", []), ("reward", []), ("ppo", ["job-1-sft", "job-2-reward"])]
    ppo_plan = fake.submitted[2][0]
    # Stage 3 finds the outputs of stages 1 and 2 on its own.
    assert ppo_plan.config.ppo.actor_model_name_or_path == fake.submitted[0][0].output_dir
    assert ppo_plan.config.ppo.critic_model_name_or_path == fake.submitted[1][0].output_dir


def test_failed_stage_stops_the_chain(register):
    backend = FakeBackend(fail_stages=("sft",))
    register(FakePlugin(backend), "fake")
    result = run("train", "-b", "fake", "--stage", "all", *MODEL_SETS)
    assert result.exit_code == 1
    assert "stage sft" in result.output and "FAILED" in result.output
    assert [plan.stage for plan, _ in backend.submitted] == ["sft"]


def test_failed_job_sets_exit_code(register):
    register(FakePlugin(FakeBackend(fail_stages=("preflight",))), "fake")
    result = run("train", "-b", "fake", "--stage", "preflight")
    assert result.exit_code == 1
    assert "did not succeed" in result.output


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "no_such_key=1"], "no_such_key"),
        (["--set", "topology.nodes=0"], "topology.nodes"),
        (["--set", "backends.fake.queue=[1]"], "backends.fake.queue"),
        (["--set", "backends.fake.qeue=x"], "backends.fake.qeue"),
        ([], "sft.model_name_or_path"),
        (["--set", "data.data_split=10,0,0", "--set", "reward.model_name_or_path=m"], "data.data_split"),
        (["-c", "/nonexistent/run.yaml"], "config file"),
    ],
)
def test_bad_input_exits_2_before_anything_is_submitted(fake, args, key):
    stage = "reward" if key == "data.data_split" else "sft"
    result = run("train", "-b", "fake", "--stage", stage, *args)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0]
    assert fake.submitted == []


def test_all_stages_are_validated_before_the_first_is_submitted(fake):
    result = run("train", "-b", "fake", "--stage", "all", "--set", "sft.model_name_or_path=m")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "reward.model_name_or_path" in result.output
    assert fake.submitted == []


def test_status_logs_cancel(fake):
    fake.states["job-7"] = JobState.RUNNING
    result = run("status", "job-7", "-b", "fake")
    assert result.exit_code == 0 and "job-7: RUNNING" in result.output and "seen: yes" in result.output
    result = run("logs", "job-7", "-f")  # the only backend needs no --backend
    assert result.output == "log of job-7\nfollowed to the end\n"
    result = run("cancel", "job-7")
    assert result.exit_code == 0 and fake.cancelled == ["job-7"]


def test_status_of_failed_job_exits_1(register):
    backend = FakeBackend(fail_stages=("sft",))
    register(FakePlugin(backend), "fake")
    job = backend.submit(type("P", (), {"stage": "sft"})())
    result = run("status", job)
    assert result.exit_code == 1 and "FAILED" in result.output


def test_status_needs_a_backend_when_none_installed():
    result = run("status", "x")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "no backend is installed; fix: pip install ./packages/adapter-local" in result.output


class Other(FakeBackend):
    name = "other"


def test_train_without_backend_uses_the_config_then_the_only_one_else_lists_them(fake, register, tmp_path):
    result = run("train", "--stage", "sft", "--dry-run", *MODEL_SETS)  # the only one installed
    assert result.exit_code == 0 and "fake-run sft" in result.output, result.output
    register(FakePlugin(Other()), "other")
    several = run("train", "--stage", "sft", "--dry-run", *MODEL_SETS)
    assert several.exit_code == EXIT_BAD_INPUT and len(several.output.strip().splitlines()) == 1
    assert "several backends are installed (fake, other)" in several.output and "--backend NAME" in several.output
    configured = run("train", "--stage", "sft", "--dry-run", "--set", "backend=fake", *MODEL_SETS)
    assert configured.exit_code == 0 and "fake-run sft" in configured.output, configured.output


def test_a_misspelt_backend_gets_a_did_you_mean(fake):
    result = run("train", "-b", "slurmm", "--stage", "sft", "--dry-run", *MODEL_SETS)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "unknown backend 'slurmm'" in result.output and "did you mean 'slurm'?" in result.output


def test_config_show_prints_resolved_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sft:\n  zero_stage: 2\n")
    result = run("config", "show", "-c", str(path), "--set", "ppo.kl_ctl=0.05")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["sft"]["zero_stage"] == 2
    assert shown["sft"]["per_device_train_batch_size"] == 16
    assert shown["ppo"]["kl_ctl"] == 0.05


@pytest.mark.parametrize("command", [[], ["train"], ["status"], ["logs"], ["cancel"], ["backends"], ["config", "show"]])
def test_help_has_examples(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_chat_says_how_to_use_it_and_prints_no_library_noise():
    from pathlib import Path

    model = Path(__file__).resolve().parents[2] / "samples" / "models" / "tiny-opt"
    result = CliRunner().invoke(cli, ["chat", str(model), "--max-new-tokens", "4"], input="hello\nclear\nquit\n")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith(f"chatting with {model}: the tokenizer's chat template") and "greedy" in first
    assert "Type `clear` to start over, `quit` or Ctrl-D to leave." in result.output
    assert result.output.count("Assistant:") == 1 and "Loading weights" not in result.output


def test_eval_on_a_truncated_model_file_is_one_line(tmp_path):
    import shutil
    from pathlib import Path

    model = tmp_path / "model"
    shutil.copytree(Path(__file__).resolve().parents[2] / "samples" / "models" / "tiny-opt", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run("eval", "--stage", "sft", str(model), "--set", "data.data_path=[x]")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert f"{weights} is damaged" in result.output and "incomplete metadata" in result.output


def test_a_damaged_job_record_is_named_by_status(fake, tmp_path):
    import os
    from pathlib import Path

    from dschat_local import plugin as local_plugin

    folder = Path(os.environ["DSCHAT_STATE_DIR"]) / "local"
    folder.mkdir(parents=True)
    (folder / "job-1.json").write_text('{"job_id": "job-1", "sta')
    from dschat_core.plugins import get_plugin_manager

    get_plugin_manager().register(local_plugin, "local")
    one = run("status", "job-1", "-b", "local")
    assert one.exit_code != 0 and "job-1.json is damaged" in one.output and "fix: delete that file" in one.output
    listing = run("status", "--all", "-b", "local")
    assert listing.exit_code == 0 and "job-1: the job record" in listing.output, listing.output
