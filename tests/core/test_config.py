"""The run-config schema: DeepSpeed-Chat's defaults, overrides, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from dschat_core.config import RunConfig, apply_override, dump_config, load_config, read_yaml
from dschat_core.errors import EXIT_BAD_INPUT, ConfigError


def test_defaults_are_deepspeed_chats():
    config = RunConfig()
    assert config.data.data_path == ["Dahoas/rm-static"]
    assert config.data.data_split == "2,4,4"
    assert config.seed == 1234
    sft, reward, ppo = config.sft, config.reward, config.ppo
    assert (sft.learning_rate, sft.per_device_train_batch_size, sft.max_seq_len) == (1e-3, 16, 512)
    assert (sft.lr_scheduler_type, sft.num_warmup_steps, sft.zero_stage, sft.dtype) == ("cosine", 0, 0, "fp16")
    assert (sft.lora_dim, sft.lora_module_name, sft.lora_learning_rate) == (0, "decoder.layers.", 5e-4)
    assert (reward.learning_rate, reward.num_padding_at_beginning, reward.eval_iters) == (5e-5, 1, 100)
    assert (ppo.actor_learning_rate, ppo.critic_learning_rate, ppo.num_warmup_steps) == (9.65e-6, 5e-6, 100)
    assert (ppo.max_prompt_seq_len, ppo.max_answer_seq_len, ppo.unsup_coef) == (256, 256, 27.8)
    # DeepSpeed-Chat's hard-coded constants, now settings with the same values.
    assert (ppo.kl_ctl, ppo.clip_reward_value, ppo.cliprange, ppo.cliprange_value) == (0.1, 5.0, 0.2, 0.2)
    assert (ppo.gamma, ppo.lam) == (1.0, 0.95)
    assert config.trust_remote_code is False


def test_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_name: demo\nsft:\n  zero_stage: 2\ndata:\n  data_path: /data/rm\n")
    config = load_config(
        path,
        [
            "sft.zero_stage=3",
            "ppo.kl_ctl=0.05",
            "data.data_split=10,0,0",
            "topology.gpus_per_node=2",
            "backends.local.launcher=torchrun",
        ],
    )
    assert config.run_name == "demo"
    assert config.sft.zero_stage == 3
    assert config.ppo.kl_ctl == 0.05
    assert config.data.data_path == ["/data/rm"]  # one string becomes a list
    assert config.data.split_shares == (1.0, 0.0, 0.0)
    assert config.topology.world_size == 2
    assert config.backends == {"local": {"launcher": "torchrun"}}


def test_override_values_are_yaml():
    data: dict = {}
    apply_override(data, "data.data_path=[a, b]")
    apply_override(data, "sft.gradient_checkpointing=true")
    apply_override(data, "sft.dropout=0.1")
    assert data == {"data": {"data_path": ["a", "b"]}, "sft": {"gradient_checkpointing": True, "dropout": 0.1}}


def test_dump_roundtrip(tmp_path):
    config = load_config(None, ["sft.model_name_or_path=facebook/opt-1.3b"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


BAD_INPUTS = [
    # (overrides, the key the message must name, a fragment of the problem)
    (["no_such_key=1"], "no_such_key", "unknown key"),
    (["sft.zero_stag=2"], "sft.zero_stag", "did you mean 'zero_stage'"),
    (["sft.per_device_train_batch_size=-4"], "sft.per_device_train_batch_size", ">= 1"),
    (["sft.per_device_train_batch_size=lots"], "sft.per_device_train_batch_size", "whole number"),
    (["topology.nodes=0"], "topology.nodes", ">= 1"),
    (["topology.gpus_per_node=1.5"], "topology.gpus_per_node", "whole number"),
    (["sft.zero_stage=4"], "sft.zero_stage", "use one of"),
    (["sft.dtype=fp8"], "sft.dtype", "use one of"),
    (["sft.learning_rate=0"], "sft.learning_rate", "> 0"),
    (["sft.dropout=1.5"], "sft.dropout", "< 1"),
    (["data.data_split=2,4"], "data.data_split", "three"),
    (["data.data_split=a,b,c"], "data.data_split", "three"),
    (["run_name=My_Run"], "run_name", "lowercase"),
    (["sft.only_optimize_lora=true"], "sft.only_optimize_lora", "lora_dim"),
    (["ppo.inference_tp_size=2"], "ppo.inference_tp_size", "actor_zero_stage 3"),
    (["ppo.enable_hybrid_engine=true", "ppo.actor_lora_dim=8"], "ppo.enable_hybrid_engine", "peft"),
    (["ppo.align_overflow=true"], "ppo.align_overflow", "not supported"),
    (["ppo.compile_generation=true"], "ppo.compile_generation", "generation_cache: static"),
    (["ppo.generation_cache=static", "ppo.generation_kv_cache=false"], "ppo.generation_cache", "generation_kv_cache"),
    (["ppo.on_nonfinite=ignore"], "ppo.on_nonfinite", "use one of"),
    (["sft=3"], "sft", "section"),
    (["sft.zero_stage=1", "sft.zero_stage.deep=1"], "sft.zero_stage", "is a value"),
    (["novalue"], "--set", "section.key=value"),
    (["ppo.gamma=2"], "ppo.gamma", "<= 1"),
]


@pytest.mark.parametrize(("overrides", "key", "fragment"), BAD_INPUTS)
def test_bad_input_names_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = info.value.format_message()
    assert "\n" not in message
    assert message.startswith(f"config error: {key}")
    assert fragment in message
    assert "fix:" in message or "did you mean" in message
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        read_yaml(tmp_path)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sft:\n  zero_stage: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        read_yaml(bad_yaml)
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(b"run_name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml(not_utf8)
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(a_list)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run_name: !!python/object/apply:os.system ['touch /tmp/dschat-pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(path)


def test_configuration_reference_is_current():
    from pathlib import Path

    from dschat_core.reference import config_reference

    docs = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert docs.read_text() == config_reference(), "regenerate: dschat-core config reference > docs/configuration.md"


def test_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    """Issue 19: run from another folder, the sample's `models/tiny-opt` is the sample's, not the working folder's;
    a value given with --set stays relative to where the shell is."""
    from pathlib import Path

    samples = Path(__file__).resolve().parents[2] / "samples"
    monkeypatch.chdir(tmp_path)
    config = load_config(samples / "tiny-cpu.yaml", ["reward.model_name_or_path=models/mine"])
    assert config.sft.model_name_or_path == str(samples / "models" / "tiny-opt")
    assert all(Path(p).is_absolute() and Path(p).exists() for p in config.data.data_path)
    assert config.reward.model_name_or_path == "models/mine"


def test_bf16_on_a_processor_without_bf16_units_is_warned_of(tmp_path):
    """Each rank says so once (run_stage): bf16 without AMX or AVX-512 bf16 runs its matmuls far below fp32."""
    from dschat_core.launch import cpu_bf16_warning, cpu_flags

    bf16 = load_config(None, ["sft.dtype=bf16"])
    warning = cpu_bf16_warning(bf16, "sft", {"avx", "avx2"})
    assert warning.startswith("warning: sft.dtype = bf16 on a processor without bf16 matrix units")
    assert "--set sft.dtype=fp32" in warning
    assert cpu_bf16_warning(bf16, "sft", {"avx2", "amx_bf16"}) == ""
    assert cpu_bf16_warning(bf16, "sft", {"avx512_bf16"}) == ""
    assert cpu_bf16_warning(bf16, "sft", None) == ""  # flags unknown: nothing said
    assert cpu_bf16_warning(load_config(None, ["sft.dtype=fp32"]), "sft", {"avx2"}) == ""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") is None
