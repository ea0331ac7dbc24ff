"""Rule-based and verifiable rewards for stage 3: functions of (prompt, answer, row) registered through the
``register_reward_functions`` hook, the built-ins among them.

A run config names them with weights (``ppo.reward_functions: {gsm8k: 1.0, format: {weight: 0.1, pattern:
"#### -?[0-9]+"}}``); an answer's reward is the weighted sum of their values, plus the reward model's score times
``ppo.reward_model_weight``. ``row`` is the prompt's dataset row, with the reference answer (where the format has
one) under ``reference``. A *verifier* says whether an answer is right (1.0) or not (0.0): held-out ``eval/accuracy``
is the rate of greedy answers every configured verifier accepts.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: (prompt, answer, row, **settings) -> reward
RewardFn = Callable[..., float]


@dataclass(frozen=True)
class RewardFunction:
    name: str
    fn: RewardFn
    description: str
    verifier: bool = False
    """1.0 for a right answer, 0.0 otherwise: counted in ``eval/accuracy``."""


class RewardFunctionError(Exception):
    """A reward function raised or returned a value that is not a finite number."""


# -- the built-ins --------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _reference(row: Mapping[str, Any], name: str) -> str:
    reference = row.get("reference")
    if not isinstance(reference, str):
        raise ValueError(
            f"{name} needs a reference answer, and this prompt's row has none (a prompt/answer or "
            "gsm8k-format dataset gives one)"
        )
    return reference


def exact_match(prompt: str, answer: str, row: Mapping[str, Any]) -> float:
    return float(answer.strip() == _reference(row, "exact_match").strip())


def normalized_match(prompt: str, answer: str, row: Mapping[str, Any]) -> float:
    return float(normalize(answer) == normalize(_reference(row, "normalized_match")))


def final_number(text: str) -> float | None:
    """GSM8K's answer: the number after the last ``####``, else the last number in the text."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[0 if "####" in text else -1].replace(",", ""))
    except ValueError:
        return None


def gsm8k(prompt: str, answer: str, row: Mapping[str, Any]) -> float:
    expected, got = final_number(_reference(row, "gsm8k")), final_number(answer)
    return float(expected is not None and got is not None and math.isclose(expected, got, rel_tol=0, abs_tol=1e-6))


def regex(prompt: str, answer: str, row: Mapping[str, Any], pattern: str = "", full: bool = False) -> float:
    """1.0 when ``pattern`` is found in the answer (the whole answer with ``full``), e.g. a required format."""
    if not pattern:
        raise ValueError("regex needs a pattern: {regex: {weight: W, pattern: '...'}}")
    match = re.fullmatch(pattern, answer.strip(), flags=re.DOTALL) if full else re.search(pattern, answer)
    return float(match is not None)


def gsm8k_format(prompt: str, answer: str, row: Mapping[str, Any]) -> float:
    """1.0 when the answer ends in GSM8K's format, ``#### <number>``."""
    return float(re.search(r"####\s*-?[\d,]+(?:\.\d+)?\s*$", answer.strip()) is not None)


def tiny_judge(prompt: str, answer: str, row: Mapping[str, Any]) -> float:
    """The tiny task's ground truth (dschat_core.tiny_task): the right fact for the prompt's subject."""
    from .tiny_task import judge

    return float(judge(prompt, answer))


BUILTIN_REWARD_FUNCTIONS = (
    RewardFunction("exact_match", exact_match, "the answer equals the reference (surrounding spaces aside)", True),
    RewardFunction(
        "normalized_match",
        normalized_match,
        "equal after SQuAD normalisation (case, punctuation, articles, spaces)",
        True,
    ),
    RewardFunction("gsm8k", gsm8k, "the final number (after ####, else the last) equals the reference's", True),
    RewardFunction("gsm8k_format", gsm8k_format, "the answer ends in `#### <number>`"),
    RewardFunction("regex", regex, "the answer matches `pattern` (`full: true`: all of it)"),
    RewardFunction("tiny_judge", tiny_judge, "the tiny task's ground-truth judge", True),
)


# -- scoring with the configured functions ------------------------------------------------------------------
def parse_spec(spec: float | Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """A config value (a weight, or ``{weight: W, **settings}``) as (weight, settings)."""
    if isinstance(spec, Mapping):
        settings = dict(spec)
        return float(settings.pop("weight", 1.0)), settings
    return float(spec), {}


class Rewarder:
    """The configured reward functions, resolved against the registry."""

    def __init__(self, specs: Mapping[str, float | Mapping[str, Any]], registry: Mapping[str, RewardFunction]) -> None:
        unknown = [name for name in specs if name not in registry]
        if unknown:
            raise KeyError(unknown[0])
        self.functions = [(registry[name], *parse_spec(spec)) for name, spec in specs.items()]

    @property
    def names(self) -> list[str]:
        return [function.name for function, _, _ in self.functions]

    @property
    def verifiers(self) -> list[str]:
        return [function.name for function, _, _ in self.functions if function.verifier]

    def score(self, prompt: str, answer: str, row: Mapping[str, Any]) -> dict[str, float]:
        """Each function's value (unweighted); :class:`RewardFunctionError` names the one that failed."""
        values = {}
        for function, _, settings in self.functions:
            try:
                value = float(function.fn(prompt, answer, row, **settings))
            except Exception as exc:  # a user's function may raise anything: name it, with what it said
                raise RewardFunctionError(
                    f"reward function {function.name!r} raised {type(exc).__name__}: {exc}"
                ) from None
            if not math.isfinite(value):
                raise RewardFunctionError(f"reward function {function.name!r} returned {value}")
            values[function.name] = value
        return values

    def total(self, values: Mapping[str, float]) -> float:
        return sum(weight * values[function.name] for function, weight, _ in self.functions)

    def correct(self, values: Mapping[str, float]) -> bool:
        """Every verifier accepts the answer."""
        return all(values[name] >= 0.5 for name in self.verifiers)
