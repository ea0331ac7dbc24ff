"""The rollout-engine seam without ranks: the table of engines matches the config, and ``rollout_engine: vllm``
is refused before launch, in one line, where it cannot run (vLLM missing, heads too narrow for its CPU kernels,
settings that contradict it)."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from dschat_core.cli import cli
from dschat_core.config import PPO, load_config
from dschat_core.errors import EXIT_BAD_INPUT, ConfigError, UserError
from dschat_core.model_checks import check_models, head_size
from dschat_core.models import init_tiny
from dschat_core.stages.rl.engines import ENGINES
from dschat_local import plugin as local_plugin

from .runs import REPO

HAS_VLLM = importlib.util.find_spec("vllm") is not None
SHORT = ("ppo.max_prompt_seq_len=32", "ppo.max_answer_seq_len=16")  # within the tiny models' 256 positions


def test_every_rollout_engine_of_the_config_has_an_implementation():
    assert set(ENGINES) == set(PPO.model_fields["rollout_engine"].annotation.__args__)


def dry_run(assets, actor, *more: str):
    return CliRunner().invoke(
        cli,
        [
            "train",
            "-b",
            "local",
            "--stage",
            "ppo",
            "--dry-run",
            "-c",
            str(REPO / "samples" / "tiny-cpu-grpo.yaml"),
            "--set",
            f"data.data_path=[{assets['data'] / 'tiny-qa'}]",
            "--set",
            f"ppo.actor_model_name_or_path={actor}",
            "--set",
            "ppo.rollout_engine=vllm",
            *more,
        ],
    )


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_vllm_missing_is_one_line_naming_the_pip_command(assets, tmp_path, register):
    register(local_plugin, "local")
    result = dry_run(assets, assets["opt"], "--set", f"storage.root={tmp_path}")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "ppo.rollout_engine" in result.output and "pip install 'dschat-core[vllm]'" in result.output
    # and on a rank, where a cluster's image lacks it: the worker's first words, before any engine is built
    from dschat_core.stages.rl.stage import run

    config = load_config(None, [f"ppo.actor_model_name_or_path={assets['opt']}", "ppo.rollout_engine=vllm"])
    with pytest.raises(UserError, match=r"pip install 'dschat-core\[vllm\]'"):
        run(config)


def test_heads_too_narrow_for_vllms_cpu_kernels_are_refused_before_launch(assets, tmp_path):
    narrow = load_config(
        None,
        [
            f"ppo.actor_model_name_or_path={assets['opt']}",
            "ppo.rollout_engine=vllm",
            "topology.accelerator=cpu",
            *SHORT,
        ],
    )
    from transformers import AutoConfig

    assert head_size(AutoConfig.from_pretrained(assets["opt"])) == 16
    with pytest.raises(ConfigError, match="heads are 16 wide") as caught:
        check_models(narrow, "ppo")
    assert caught.value.key == "ppo.rollout_engine" and "rollout_engine hf" in str(caught.value)
    wide = init_tiny("opt", tmp_path / "wide", heads=2)
    check_models(
        narrow.model_copy(update={"ppo": narrow.ppo.model_copy(update={"actor_model_name_or_path": str(wide)})}), "ppo"
    )
    hf = load_config(None, [f"ppo.actor_model_name_or_path={assets['opt']}", "topology.accelerator=cpu", *SHORT])
    check_models(hf, "ppo")  # the hf engine generates with any head size


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["ppo.enable_hybrid_engine=true"], "enable_hybrid_engine is the hf engine's"),
        (["ppo.vllm.max_model_len=100"], "vllm.max_model_len 100 is shorter than"),
        (["ppo.vllm.cpu_kv_cache_gib=0"], "cpu_kv_cache_gib"),
    ],
)
def test_vllm_settings_that_cannot_work_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, ["ppo.rollout_engine=vllm", *overrides])


def test_the_hybrid_engine_is_refused_where_its_kernels_cannot_run(monkeypatch):
    """DeepSpeed's Hybrid Engine kernels fail at the first generate under transformers 5 (seen on an H200); the run
    is refused before launch instead, and allowed under transformers 4."""
    import transformers

    from dschat_core.launch import check_hybrid_engine

    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    with pytest.raises(ConfigError, match="transformers 5.24.0") as caught:
        check_hybrid_engine()
    assert caught.value.key == "ppo.enable_hybrid_engine" and "enable_hybrid_engine=false" in str(caught.value)
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    check_hybrid_engine()
