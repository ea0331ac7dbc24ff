"""Bad input, as a hostile or hurried user gives it: every case exits with code 2 and one line naming the key (or the
dataset, row and column), with no traceback, before anything is launched and with nothing written."""

from __future__ import annotations

import os
import socket
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from dschat_core.cli import cli
from dschat_core.errors import EXIT_BAD_INPUT
from dschat_local import plugin as local_plugin
from dschat_slurm import plugin as slurm_plugin
from dschat_t9k import plugin as t9k_plugin

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "samples" / "models" / "tiny-opt"


@pytest.fixture
def backends(register):
    register(local_plugin, "local")
    register(slurm_plugin, "slurm")
    register(t9k_plugin, "t9k")


def one_line_refusal(args: list[str], key: str, root: Path) -> str:
    result = CliRunner().invoke(cli, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert len(lines) == 1 and key in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (root / "runs").exists()  # nothing written
    return lines[0]


def dry_run(root: Path, backend: str, stage: str, *sets: str) -> list[str]:
    base = [
        f"storage.root={root}",
        "topology.accelerator=cpu",
        f"sft.model_name_or_path={TINY}",
        "sft.dtype=fp32",
        f"reward.model_name_or_path={TINY}",
        "reward.dtype=fp32",
        "ppo.dtype=fp32",
        "dpo.dtype=fp32",
        "sft.max_seq_len=64",
        "reward.max_seq_len=64",
        "dpo.max_seq_len=64",
        f"ppo.actor_model_name_or_path={TINY}",
        f"ppo.critic_model_name_or_path={TINY}",
        f"dpo.model_name_or_path={TINY}",
        "ppo.max_prompt_seq_len=32",
        "ppo.max_answer_seq_len=16",
    ]
    if backend == "t9k":
        base = [s for s in base if not s.startswith("storage.root")] + ["backends.t9k.image=dschat:test"]
    return ["train", "-b", backend, "--stage", stage, "--dry-run", *[a for s in (*base, *sets) for a in ("--set", s)]]


# (stage, --set, the key the line names): the rank-side ones too (lengths past the model's positions, LoRA names
# matching nothing, a port in use), caught here before a rank starts.
CONFIG_CASES = [
    ("sft", "seed=-1", "seed"),
    ("sft", "seed=4294967296", "seed"),
    ("sft", "seed=abc", "seed"),
    ("sft", "run_name=Bad_Name", "run_name"),
    ("sft", "run_name=''", "run_name"),
    ("sft", f"run_name={'a' * 41}", "run_name"),
    ("sft", "pipeline=rlhff", "pipeline"),
    ("sft", "topology.nodes=0", "topology.nodes"),
    ("sft", "topology.gpus_per_node=0", "topology.gpus_per_node"),
    ("sft", "topology.gpus_per_node=5000", "topology.gpus_per_node"),
    ("sft", "topology.accelerator=tpu", "topology.accelerator"),
    ("sft", "topology.master_port=80", "master_port"),
    ("sft", "topology.master_port=70000", "master_port"),
    ("sft", "data.data_split=2,4", "data.data_split"),
    ("sft", "data.data_split=nan,1,1", "data.data_split"),
    ("sft", "data.data_split=-1,1,1", "data.data_split"),
    ("sft", "data.data_split=0,0,0", "data.data_split"),
    ("sft", "data.data_split=a,b,c", "data.data_split"),
    ("reward", "data.data_split=1,0,0", "data.data_split"),
    ("sft", "data.num_proc=0", "data.num_proc"),
    ("sft", "sft.learning_rate=.inf", "sft.learning_rate"),
    ("sft", "sft.learning_rate=-1", "sft.learning_rate"),
    ("sft", "sft.learning_rate=.nan", "sft.learning_rate"),
    ("sft", "sft.per_device_train_batch_size=0", "per_device_train_batch_size"),
    ("sft", "sft.per_device_train_batch_size=1000000000000000000000000000000", "per_device_train_batch_size"),
    ("sft", "sft.max_seq_len=4", "sft.max_seq_len"),
    ("sft", "sft.num_train_epochs=0", "sft.num_train_epochs"),
    ("sft", "sft.zero_stage=4", "sft.zero_stage"),
    ("sft", "sft.dtype=fp8", "sft.dtype"),
    ("sft", "sft.dtype=fp16", "sft.dtype"),
    ("sft", "sft.dropout=1.5", "sft.dropout"),
    ("sft", "sft.lr_scheduler_type=exp", "sft.lr_scheduler_type"),
    ("sft", "sft.only_optimize_lora=true", "sft.only_optimize_lora"),
    ("sft", "sft.lora_dim=-1", "sft.lora_dim"),
    ("sft", "sft.keep_last=0", "sft.keep_last"),
    ("sft", "sft.resume=sometimes", "sft.resume"),
    ("sft", "sft.on_nonfinite=ignore", "sft.on_nonfinite"),
    ("sft", "sft.max_steps=0", "sft.max_steps"),
    ("sft", "sft.weight_decay=-0.1", "sft.weight_decay"),
    ("sft", "sft.loss_on=prompt", "sft.loss_on"),
    ("sft", "sft.learning_rat=1", "sft.learning_rat"),
    ("sft", "sft.max_seq_len=1024", "sft.max_seq_len"),
    ("sft", "sft.lora_dim=8 && sft.lora_module_name=nomatch.", "sft.lora_module_name"),
    ("sft", "sft.model_name_or_path=./no/such/model", "sft.model_name_or_path"),
    ("sft", "data.data_path=[./no/such/data]", "data.data_path"),
    ("reward", "reward.loss=hinge", "reward.loss"),
    ("reward", "reward.eval_iters=0", "reward.eval_iters"),
    ("ppo", "ppo.algorithm=dpo", "ppo.algorithm"),
    ("ppo", "ppo.algorithm=grpo", "ppo.n_samples_per_prompt"),
    ("ppo", "ppo.kl_ctl=-1", "ppo.kl_ctl"),
    ("ppo", "ppo.gamma=2", "ppo.gamma"),
    ("ppo", "ppo.clip_low=1.5", "ppo.clip_low"),
    ("ppo", "ppo.dual_clip=0.5", "ppo.dual_clip"),
    ("ppo", "ppo.temperature=0", "ppo.temperature"),
    ("ppo", "ppo.top_p=2", "ppo.top_p"),
    ("ppo", "ppo.reward_functions={nope: 1}", "ppo.reward_functions.nope"),
    ("ppo", "ppo.reward_functions={gsm8k: {weight: heavy}}", "ppo.reward_functions"),
    ("ppo", "ppo.align_overflow=true", "ppo.align_overflow"),
    ("ppo", "ppo.compile_generation=true", "ppo.compile_generation"),
    ("ppo", "ppo.inference_tp_size=2", "ppo.inference_tp_size"),
    ("ppo", "ppo.max_answer_seq_len=300", "ppo.max_prompt_seq_len + ppo.max_answer_seq_len"),
    ("ppo", "ppo.enable_hybrid_engine=true && ppo.actor_lora_dim=8", "ppo.enable_hybrid_engine"),
    ("ppo", "ppo.reward_functions={regex: 1.0}", "ppo.reward_functions.regex.pattern"),  # no pattern
    ("ppo", "ppo.reward_functions={regex: {pattern: '('}}", "ppo.reward_functions.regex.pattern"),
    ("ppo", "ppo.reward_functions={regex: {pattern: x, bogus: 2}}", "ppo.reward_functions.regex.bogus"),
    ("ppo", "ppo.reward_functions={regex: {pattern: x, ful: true}}", "ppo.reward_functions.regex.ful"),
    ("ppo", "ppo.reward_functions={gsm8k: {scal: 2}}", "ppo.reward_functions.gsm8k.scal"),  # a typo of a setting
    ("ppo", "ppo.reward_functions={gsm8k: {weight: .nan}}", "ppo.reward_functions.gsm8k.weight"),
    ("ppo", "ppo.n_samples_per_prompt=1000000000", "ppo.n_samples_per_prompt"),
    ("ppo", "ppo.kl_coef=0 && ppo.kl_ctl=0.1", "ppo.kl_ctl"),  # two spellings of one setting, both given
    ("ppo", "ppo.overlong=penalty && ppo.overlong_buffer=999 && ppo.max_answer_seq_len=64", "ppo.overlong_buffer"),
    ("dpo", "dpo.loss=hinge && dpo.label_smoothing=0.1", "dpo.label_smoothing"),
    ("dpo", "dpo.loss=kto", "dpo.loss"),
    ("dpo", "dpo.beta=0", "dpo.beta"),
    ("dpo", "dpo.label_smoothing=0.5", "dpo.label_smoothing"),
    ("sft", "backends.locl={}", "backends.locl"),
    ("sft", "backends.local.launcher=mpirun", "backends.local.launcher"),
    ("sft", "backends.local.env={'A B': x}", "backends.local.env"),
    ("sft", "backends.local.env={'A=B': x}", "backends.local.env"),
    ("sft", "backends.local.omp_num_threads=0", "backends.local.omp_num_threads"),
    ("sft", "backends.local.stop_grace_seconds=-1", "backends.local.stop_grace_seconds"),
    ("sft", "backends.local.env={HF_TOKEN: hf_abc}", "backends.local.env"),  # printed by --dry-run: a secret
    ("sft", "backends.local.env={WANDB_API_KEY: abc}", "backends.local.env"),
]

BACKEND_CASES = [
    ("slurm", "backends.slurm.time=forever", "backends.slurm.time"),
    ("slurm", "backends.slurm.mem=lots", "backends.slurm.mem"),
    ("slurm", "backends.slurm.extra_directives={'--x; id': '1'}", "backends.slurm.extra_directives"),
    ("slurm", "backends.slurm.env={'1A': x}", "backends.slurm.env"),
    ("slurm", "backends.slurm.cpus_per_task=0", "backends.slurm.cpus_per_task"),
    ("slurm", "backends.slurm.env={WANDB_API_KEY: abc}", "backends.slurm.env"),  # a secret in the script
    ("t9k", "backends.t9k.env={HF_TOKEN: abc}", "backends.t9k.env"),  # a secret in the job: use secret_env
    ("t9k", "backends.t9k.shm_size=lots", "backends.t9k.shm_size"),
    ("t9k", "backends.t9k.gpu_resource='bad key!'", "backends.t9k.gpu_resource"),
    ("t9k", "backends.t9k.node_selector={'bad key': x}", "backends.t9k.node_selector"),
    ("t9k", "backends.t9k.node_selector={zone: 'bad value!'}", "backends.t9k.node_selector"),
    ("t9k", "backends.t9k.mount_path=/t9k/../etc", "backends.t9k.mount_path"),
    ("t9k", "backends.t9k.priority=101", "backends.t9k.priority"),
    ("t9k", "backends.t9k.requests={cpu: lots}", "backends.t9k.requests"),
    ("t9k", "backends.t9k.volumes=[{claim_name: data, mount_path: ../x}]", "backends.t9k.volumes"),
    ("t9k", "backends.t9k.pvc=Not_A_Name", "backends.t9k.pvc"),
]


@pytest.mark.parametrize(("stage", "setting", "key"), CONFIG_CASES, ids=lambda v: str(v)[:40])
def test_bad_config_values_are_refused_before_launch(backends, tmp_path, stage, setting, key):
    one_line_refusal(dry_run(tmp_path, "local", stage, *setting.split(" && ")), key, tmp_path)


@pytest.mark.parametrize(("backend", "setting", "key"), BACKEND_CASES, ids=lambda v: str(v)[:40])
def test_bad_backend_settings_are_refused(backends, tmp_path, backend, setting, key):
    one_line_refusal(dry_run(tmp_path, backend, "sft", setting), key, tmp_path)


def test_a_port_in_use_is_refused(backends, tmp_path):
    with socket.socket() as sock:
        sock.bind(("", 0))
        sock.listen()
        port = sock.getsockname()[1]
        one_line_refusal(
            dry_run(tmp_path, "local", "sft", f"topology.master_port={port}"), "topology.master_port", tmp_path
        )


def test_a_storage_root_that_is_a_file_is_refused(backends, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_line_refusal(dry_run(blocker, "local", "sft"), "storage.root", tmp_path)


# -- config files ---------------------------------------------------------------------------------------------
BOMB = "".join(
    f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9) if i else '1'}]\n" for i in range(9)
)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (BOMB, "expands past"),
        ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("- a\n- b\n", "must hold a mapping"),
        ("sft: [unclosed\n", "invalid YAML"),
        (b"seed: \xff\xfe\n", "not UTF-8"),
        ("x" * (2 << 20), "larger than"),
        ("sft:\n  zero_stage: !!python/object:os.system 'id'\n", "invalid YAML"),
    ],
    ids=["alias-bomb", "duplicate", "list", "syntax", "utf8", "huge", "python-tag"],
)
def test_bad_config_files(backends, tmp_path, content, problem):
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = one_line_refusal(["config", "show", "-c", str(path)], "config file", tmp_path)
    assert problem in line


def test_a_fifo_as_config_is_refused_without_hanging(backends, tmp_path):
    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_refusal(["config", "show", "-c", str(fifo)], "config file", tmp_path)


def test_a_set_value_that_is_not_yaml_is_refused(backends, tmp_path):
    one_line_refusal(["config", "show", "--set", "data.data_path=[a,"], "--set", tmp_path)


# -- every string that reaches a script is one line ---------------------------------------------------------------
def string_settings(model: type[BaseModel], prefix: str) -> list[str]:
    """A --set that puts a newline into each text field of ``model`` (plain, dict of text, list of text)."""
    sets = []
    for name, field in model.model_fields.items():
        annotation, key = field.annotation, f"{prefix}.{name}"
        args = typing.get_args(annotation)
        origin = typing.get_origin(annotation)
        if annotation is str or str in args:
            sets.append(f'{key}="a\\nb"')
        elif origin is dict and args[1:] == (str,):
            sets.append(f'{key}={{K: "a\\nb"}}')
        elif origin is list and args == (str,):
            sets.append(f'{key}=["a\\nb"]')
    return sets


def every_string_setting() -> list[tuple[str, str]]:
    from dschat_core.config import RunConfig
    from dschat_local.backend import LocalSettings
    from dschat_slurm.backend import SlurmSettings
    from dschat_t9k.settings import T9kSettings

    cases = [("local", s) for s in string_settings(LocalSettings, "backends.local")]
    cases += [("slurm", s) for s in string_settings(SlurmSettings, "backends.slurm")]
    cases += [("t9k", s) for s in string_settings(T9kSettings, "backends.t9k")]
    for section in ("sft", "reward", "ppo", "dpo", "data", "storage"):
        model = RunConfig.model_fields[section].annotation
        cases += [(backend, s) for s in string_settings(model, section) for backend in ("local", "slurm", "t9k")]
    cases += [(backend, s) for s in ('run_name="a\\nb"', 'output_dir="a\\rb"') for backend in ("local", "slurm")]
    return cases


@pytest.mark.parametrize(("backend", "setting"), every_string_setting(), ids=lambda v: str(v)[:50])
def test_every_text_setting_with_a_newline_is_refused_on_every_backend(backends, tmp_path, backend, setting):
    key = setting.split("=")[0]
    one_line_refusal(dry_run(tmp_path, backend, "sft", setting), key, tmp_path)
    nul = setting.replace("\\n", "\\0")
    one_line_refusal(dry_run(tmp_path, backend, "sft", nul), key, tmp_path)


def test_shell_characters_render_quoted_on_every_backend(backends, tmp_path):
    """$(), backticks, ; and quotes are data: quoted in the local command and the sbatch script, plain values
    in the DeepSpeedJob (no shell reads them). The Slurm tests run such a script on the real Slurm."""
    import shlex

    evil = """$(touch x) `touch x`; touch x "q" """
    local = CliRunner().invoke(cli, dry_run(tmp_path, "local", "sft", f"backends.local.env={{EVIL: '{evil}'}}"))
    assert local.exit_code == 0 and shlex.quote(evil) in local.output, local.output
    slurm = CliRunner().invoke(
        cli,
        dry_run(
            tmp_path,
            "slurm",
            "sft",
            f"backends.slurm.env={{EVIL: '{evil}'}}",
            f"backends.slurm.extra_directives={{--comment: '{evil}'}}",
        ),
    )
    assert slurm.exit_code == 0 and f"export EVIL={shlex.quote(evil)}" in slurm.output, slurm.output
    t9k = CliRunner().invoke(cli, dry_run(tmp_path, "t9k", "sft", f"backends.t9k.env={{EVIL: '{evil}'}}"))
    assert t9k.exit_code == 0 and "EVIL" in t9k.output


# -- bad datasets: `data inspect` checks exactly as training does --------------------------------------------
def jsonl(rows: list[dict]) -> str:
    import json

    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"prompt": "\n\nHuman: Hi?\n\nAssistant:", "chosen": " Hello.", "rejected": " Go away."}
DATASET_CASES = {
    "not-json": ({"train.jsonl": "{not json\n"}, "cannot read it as json"),
    "not-utf8": ({"train.jsonl": b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'}, "not UTF-8"),
    "unknown-columns": ({"train.jsonl": jsonl([{"query": "q", "reply": "a"}])}, "match no known format"),
    "empty-train": ({"train.jsonl": ""}, "dataset"),
    "no-train-split": ({"test.jsonl": jsonl([GOOD])}, "dataset"),
    "metadata-not-json": ({"train.jsonl": jsonl([GOOD]), "dschat-dataset.json": "{oops"}, "not readable JSON"),
    "metadata-not-object": ({"train.jsonl": jsonl([GOOD]), "dschat-dataset.json": "[1, 2]"}, "must be an object"),
    "metadata-unknown-format": (
        {"train.jsonl": jsonl([GOOD]), "dschat-dataset.json": '{"format": "acme/x"}'},
        "not registered",
    ),
    "chosen-none": ({"train.jsonl": jsonl([GOOD, {**GOOD, "chosen": None}])}, "column 'chosen' is None"),
    "chosen-empty": ({"train.jsonl": jsonl([GOOD, {**GOOD, "chosen": "  "}])}, "column 'chosen' is empty"),
    "prompt-number": ({"train.jsonl": jsonl([GOOD, {**GOOD, "prompt": 3}])}, "column 'prompt' should be text"),
    "chosen-list": ({"train.jsonl": jsonl([GOOD, {**GOOD, "chosen": ["a"]}])}, "column 'chosen' should be text"),
    "identical-pair": ({"train.jsonl": jsonl([GOOD, {**GOOD, "rejected": " Hello."}])}, "identical to 'rejected'"),
    "rejected-missing": ({"train.jsonl": jsonl([GOOD, {k: v for k, v in GOOD.items() if k != "rejected"}])}, "dataset"),
    "no-data-files": ({"README.md": "just a readme\n"}, "no JSON, JSONL or Parquet"),
    "corrupt-parquet": ({"train.parquet": b"PAR1 this is not parquet"}, "cannot read it as parquet"),
    "sft-only-for-pairs": ({"train.jsonl": jsonl([{"prompt": "p", "answer": "a"}] * 4)}, "no stage of the dpo"),
    "webgpt-bad-scores": (
        {
            "train.jsonl": jsonl(
                [{"question": {"full_text": "q"}, "answer_0": "a", "answer_1": "b", "score_0": "high", "score_1": 1.0}]
            )
        },
        "score_0",
    ),
    "gsm8k-answer-none": (
        {"train.jsonl": jsonl([{"question": "q", "answer": "1 #### 1"}, {"question": "q2", "answer": None}])},
        "column 'answer' is None",
    ),
    "shp-history-missing": (
        {"train.jsonl": jsonl([{"human_ref_A": "a", "human_ref_B": "b", "labels": 1, "history": ""}])},
        "column 'history' is empty",
    ),
}


@pytest.mark.parametrize("name", sorted(DATASET_CASES))
def test_bad_datasets_are_one_line_errors(backends, tmp_path, name):
    files, problem = DATASET_CASES[name]
    folder = tmp_path / "data"
    folder.mkdir()
    for file_name, content in files.items():
        (folder / file_name).write_bytes(content if isinstance(content, bytes) else content.encode())
    split = {
        "gsm8k-answer-none": "1,0,0",
        "sft-only-for-pairs": "0,1,0",
        "identical-pair": "0,1,0",
        "rejected-missing": "0,1,0",
    }.get(name, "1,1,1")
    args = [
        "data",
        "inspect",
        str(folder),
        "--set",
        "data.strict=true",
        "--set",
        f"data.data_split={split}",
        "--set",
        "pipeline=dpo" if name == "sft-only-for-pairs" else "pipeline=rlhf",
    ]
    if name == "gsm8k-answer-none":
        args += ["--set", "pipeline=rl"]
    line = one_line_refusal(args, "dataset", tmp_path)
    assert problem in line, line


def test_an_unknown_name_offline_is_one_line(backends, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = one_line_refusal(["data", "inspect", "Dahoas/rm-static"], "dataset", tmp_path)
    assert "data download" in line
    line = one_line_refusal(["data", "inspect", "acme/not-a-dataset"], "dataset", tmp_path)
    assert "neither a local path nor a known name" in line


def test_config_show_checks_the_backend_sections_and_shows_no_secret(backends, tmp_path):
    line = one_line_refusal(
        ["config", "show", "--set", f"storage.root={tmp_path}", "--set", "backends.local.env={HF_TOKEN: hf_secret}"],
        "backends.local.env",
        tmp_path,
    )
    assert "hf_secret" not in line and "export it in the shell" in line
    one_line_refusal(["config", "show", "--set", "backends.local.launcher=mpirun"], "backends.local.launcher", tmp_path)


def test_an_error_line_shows_a_cut_value_however_long_the_value(backends, tmp_path):
    huge = "x" * 150_000
    line = one_line_refusal(
        dry_run(tmp_path, "local", "sft", f"sft.lr_scheduler_type={huge}"), "sft.lr_scheduler_type", tmp_path
    )
    assert len(line) < 2_500 and "more characters)" in line


@pytest.mark.parametrize("reference", ["no number here", "#### 5abc ####", "#### "])
def test_a_reference_the_verifier_cannot_read_is_a_bad_row_at_data_time(backends, tmp_path, reference):
    """GRPO with {gsm8k: 1.0} on such a row would reward 0 every step and end SUCCEEDED; it is a malformed row."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"question": f"q{i}", "answer": f"{i} #### {i}"} for i in range(6)] + [
        {"question": "bad", "answer": reference}
    ]
    (folder / "train.jsonl").write_text(jsonl(rows))
    args = ["data", "inspect", str(folder), "--set", "pipeline=rl", "--set", "data.data_split=0,0,1"]
    args += ["--set", "ppo.algorithm=grpo", "--set", "ppo.n_samples_per_prompt=4"]
    args += ["--set", "ppo.reward_functions={gsm8k: 1.0}"]
    line = one_line_refusal([*args, "--set", "data.strict=true"], "dataset", tmp_path)
    assert "has no number for gsm8k to compare with" in line and "reward function 'gsm8k' could never" in line
    lenient = CliRunner().invoke(cli, args)
    assert lenient.exit_code == 0, lenient.output
    assert "malformed skipped" in lenient.output
    # without a verifier that reads references, the row is a prompt like any other
    plain = CliRunner().invoke(cli, [*args[:-2], "--set", "ppo.reward_functions={regex: {pattern: x}}"])
    assert plain.exit_code == 0 and "malformed skipped" not in plain.output, plain.output


def test_more_cpu_ranks_than_cores_is_a_warning(backends, tmp_path):
    import os

    many = (os.cpu_count() or 1) * 32
    result = CliRunner().invoke(cli, dry_run(tmp_path, "local", "sft", f"topology.gpus_per_node={many}"))
    assert result.exit_code == 0, result.output
    assert f"warning: topology.gpus_per_node = {many} CPU ranks on {os.cpu_count()} cores" in result.output


def test_a_dry_run_of_several_stages_is_a_yaml_stream_for_t9k(backends, tmp_path):
    import yaml

    args = dry_run(tmp_path, "t9k", "sft", "backends.t9k.check_pvc=false")
    args[args.index("--stage") + 1] = "all"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    jobs = [d for d in yaml.safe_load_all(result.output) if d]
    assert [job["kind"] for job in jobs] == ["DeepSpeedJob"] * 3


def test_t9k_download_refuses_a_storage_root_off_the_pvc(backends, tmp_path):
    from dschat_core.cli import build_cli

    args = ["t9k", "download", "--model", "facebook/opt-125m", "--dry-run", "--set", "storage.root=/home/me"]
    result = CliRunner().invoke(build_cli(), args)
    assert result.exit_code == EXIT_BAD_INPUT and len(result.output.strip().splitlines()) == 1, result.output
    assert "storage.root = '/home/me': is not on the PVC mounted at /t9k/mnt" in result.output


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("", "empty.jsonl is empty"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{bad json\n', "line 2 is not JSON"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', "stage reward gets no training row"),  # one row
    ],
    ids=["empty", "bad-line", "one-row"],
)
def test_inspect_names_an_empty_file_a_bad_line_and_a_split_that_starves_a_stage(backends, tmp_path, content, said):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    line = one_line_refusal(["data", "inspect", str(data)], "dataset", tmp_path)
    assert said in line and "StopIteration" not in line


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_pairs_stages_refuse_prompt_answer_data_before_launch(backends, tmp_path, stage):
    data = tmp_path / "qa.jsonl"
    data.write_text(jsonl([{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(20)]))
    line = one_line_refusal(dry_run(tmp_path, "local", stage, f"data.data_path=[{data}]"), "data.data_path", tmp_path)
    assert "no rejected answers, so it cannot train stage " + stage in line
