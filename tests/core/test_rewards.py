"""Reward functions: the built-ins against worked examples, the registry hook, the config's names and weights."""

from __future__ import annotations

import math

import pytest

from dschat_core.config import load_config
from dschat_core.errors import ConfigError
from dschat_core.hookspecs import hookimpl
from dschat_core.launch import check_stage
from dschat_core.plugins import get_reward_functions
from dschat_core.rewards import Rewarder, RewardFunction, RewardFunctionError, final_number, normalize

GSM8K_ROW = {"question": "Tom has 3 apples and buys 4. How many?", "reference": "3 + 4 = 7\n#### 7"}


def score(name: str, answer: str, row: dict, **settings) -> float:
    return get_reward_functions()[name].fn("prompt", answer, row, **settings)


def test_gsm8k_final_number():
    assert final_number("so 3 + 4 = 7\n#### 7") == 7.0
    assert final_number("It costs 1,234.5 dollars") == 1234.5
    assert final_number("#### -12 apples, not 3") == -12.0
    assert final_number("no number here") is None
    assert score("gsm8k", " 3 + 4 = 7. #### 7", GSM8K_ROW) == 1.0
    assert score("gsm8k", " The answer is 7", GSM8K_ROW) == 1.0  # no ####: the last number
    assert score("gsm8k", " #### 8", GSM8K_ROW) == 0.0
    assert score("gsm8k_format", " 3 + 4 = 7 #### 7", GSM8K_ROW) == 1.0
    assert score("gsm8k_format", " it is 7", GSM8K_ROW) == 0.0


def test_exact_and_normalized_match():
    row = {"reference": " The sky is blue."}
    assert score("exact_match", "The sky is blue. ", row) == 1.0
    assert score("exact_match", " the sky is blue", row) == 0.0
    assert normalize("  The SKY, is blue!") == "sky is blue"
    assert score("normalized_match", " the sky is blue", row) == 1.0
    assert score("normalized_match", " The sky is green.", row) == 0.0


def test_regex_and_the_tiny_judge():
    assert score("regex", " #### 42", {}, pattern=r"#### \d+") == 1.0
    assert score("regex", " 42", {}, pattern=r"\d+ apples", full=True) == 0.0
    prompt = "\n\nHuman: What color is the sky?\n\nAssistant:"
    judge = get_reward_functions()["tiny_judge"].fn
    assert judge(prompt, " The sky is blue.", {}) == 1.0 and judge(prompt, " I do not know.", {}) == 0.0


def test_a_reference_is_required_where_a_function_compares_with_one():
    rewarder = Rewarder({"exact_match": 1.0}, get_reward_functions())
    with pytest.raises(RewardFunctionError, match="'exact_match' raised ValueError: exact_match needs a reference"):
        rewarder.score("p", "a", {})


def test_weights_settings_and_verifiers():
    rewarder = Rewarder({"gsm8k": 1.0, "regex": {"weight": 0.5, "pattern": "####"}}, get_reward_functions())
    values = rewarder.score("p", " 7 #### 7", GSM8K_ROW)
    assert values == {"gsm8k": 1.0, "regex": 1.0} and rewarder.total(values) == 1.5
    assert rewarder.verifiers == ["gsm8k"] and rewarder.correct(values)
    assert not rewarder.correct(rewarder.score("p", " #### 9", GSM8K_ROW))


def test_a_function_that_returns_nan_or_raises_is_named(register):
    class Broken:
        @hookimpl
        def register_reward_functions(self, register):
            register(RewardFunction("nan_reward", lambda p, a, r: math.nan, "always NaN"))
            register(RewardFunction("boom", lambda p, a, r: 1 / 0, "always raises"))
            register(RewardFunction("text_reward", lambda p, a, r: "0.5", "a number as text"))

    register(Broken(), "broken")
    with pytest.raises(RewardFunctionError, match=r"'text_reward' returned '0.5' \(a str, not a number\)"):
        Rewarder({"text_reward": 1.0}, get_reward_functions()).score("p", "a", {})
    with pytest.raises(RewardFunctionError, match="'nan_reward' returned nan"):
        Rewarder({"nan_reward": 1.0}, get_reward_functions()).score("p", "a", {})
    with pytest.raises(RewardFunctionError, match="'boom' raised ZeroDivisionError"):
        Rewarder({"boom": 1.0}, get_reward_functions()).score("p", "a", {})


def rl_config(*overrides: str):
    return load_config(
        None,
        [
            "pipeline=rl",
            "sft.model_name_or_path=facebook/opt-125m",
            "ppo.algorithm=grpo",
            "ppo.n_samples_per_prompt=4",
            *overrides,
        ],
    )


def test_an_unknown_function_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError) as info:
        check_stage(rl_config("ppo.reward_functions={gsm9k: 1.0}"), "ppo", chained=True)
    message = info.value.format_message()
    assert info.value.key == "ppo.reward_functions.gsm9k" and "gsm8k" in message and "normalized_match" in message


def test_stage_3_needs_a_reward_from_somewhere():
    with pytest.raises(ConfigError, match="no reward model and no function"):
        check_stage(rl_config(), "ppo", chained=True)
    check_stage(rl_config("ppo.reward_functions={gsm8k: 1.0}"), "ppo", chained=True)  # functions alone: fine
    with pytest.raises(ConfigError, match="rl pipeline trains no reward model"):
        check_stage(rl_config("ppo.reward_functions={gsm8k: 1.0}", "ppo.reward_model_weight=0.5"), "ppo", chained=True)


def test_grpo_settings_are_checked():
    with pytest.raises(ConfigError, match="n_samples_per_prompt to 2 or more"):
        load_config(None, ["ppo.algorithm=grpo"])
    with pytest.raises(ConfigError, match="ppo.dual_clip"):
        load_config(None, ["ppo.dual_clip=0.5"])
    config = load_config(None, ["ppo.kl_coef=0", "ppo.algorithm=rloo", "ppo.n_samples_per_prompt=2"])
    assert config.ppo.kl_ctl == 0 and not config.ppo.needs_reference and not config.ppo.needs_critic
    assert load_config(None, ["ppo.algorithm=grpo", "ppo.n_samples_per_prompt=2"]).ppo.kl_location == "loss"
    assert load_config(None, []).ppo.kl_location == "reward" and load_config(None, []).ppo.kl_kind == "k1"


def test_rewards_lists_each_function_with_its_package_settings_and_kind():
    from click.testing import CliRunner

    from dschat_core.cli import cli

    result = CliRunner().invoke(cli, ["rewards"])
    assert result.exit_code == 0, result.output
    rows = {line.split("\t")[0]: line.split("\t") for line in result.output.splitlines()}
    assert rows["regex"][1] == "reward" and rows["gsm8k"][1] == "verifier"
    assert rows["regex"][2].startswith("dschat-core ")
    assert rows["regex"][3] == "settings: pattern (required), full=False" and rows["gsm8k"][3] == "settings: none"


def test_a_reward_function_that_never_returns_is_stopped_after_the_timeout(register):
    import threading
    import time

    release = threading.Event()

    class Slow:
        @hookimpl
        def register_reward_functions(self, register):
            register(RewardFunction("stuck", lambda p, a, r: release.wait(60) and 1.0, "never returns"))
            register(RewardFunction("quick", lambda p, a, r: 0.5, "returns"))

    register(Slow(), "slow")
    rewarder = Rewarder({"stuck": 1.0}, get_reward_functions(), timeout=0.2)
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"'stuck' did not return within 0.2 s") as caught:
        rewarder.score("p", "a", {})
    assert time.monotonic() - start < 5 and "ppo.reward_function_timeout" in caught.value.fix
    release.set()
    # the next call gets a fresh thread; a function that returns in time is unaffected
    assert Rewarder({"quick": 1.0}, get_reward_functions(), timeout=0.2).score("p", "a", {}) == {"quick": 0.5}
