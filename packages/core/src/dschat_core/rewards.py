"""Rule-based and verifiable rewards for stage 3: functions of (prompt, answer, row) registered through the
``register_reward_functions`` hook, the built-ins among them.

A run config names them with weights (``ppo.reward_functions: {gsm8k: 1.0, format: {weight: 0.1, pattern:
"#### -?[0-9]+"}}``); an answer's reward is the weighted sum of their values, plus the reward model's score times
``ppo.reward_model_weight``. ``row`` is the prompt's dataset row, with the reference answer (where the format has
one) under ``reference``. A *verifier* says whether an answer is right (1.0) or not (0.0): held-out ``eval/accuracy``
is the rate of greedy answers every configured verifier accepts.
"""

from __future__ import annotations

import difflib
import math
import queue
import re
import string
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: (prompt, answer, row, **settings) -> reward
RewardFn = Callable[..., float]


#: reference answer (None where the row has none) -> what makes it unusable, or None when it can be used
ReferenceCheck = Callable[[str | None], str | None]


@dataclass(frozen=True)
class RewardFunction:
    name: str
    fn: RewardFn
    description: str
    verifier: bool = False
    """1.0 for a right answer, 0.0 otherwise: counted in ``eval/accuracy``."""
    check_reference: ReferenceCheck | None = None
    """For a function that compares with the row's reference: why a reference cannot be used (no reference, no
    number to compare with), or None. A row whose reference fails is a malformed row at data time — skipped and
    counted, or fatal under ``data.strict`` — instead of a reward of 0 every step."""
    settings_model: type[BaseModel] | None = None
    """Its settings as a pydantic model (unknown keys refused): checked before launch, as a backend's section is.
    Without one, the settings are checked against the function's keyword parameters."""

    def check_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The settings as the function gets them; ValueError naming the first bad one (key, problem, fix)."""
        if self.settings_model is not None:
            try:
                return self.settings_model.model_validate(dict(settings)).model_dump()
            except ValidationError as exc:
                err = exc.errors()[0]
                key = ".".join(str(p) for p in err["loc"]) or "settings"
                raise SettingError(key, _setting_problem(err, self.settings_model)) from None
        known = settings_of(self)
        for key in settings:
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                fix = f"did you mean '{close[0]}'?" if close else f"its settings: {', '.join(known) or 'none'}"
                raise SettingError(key, f"is not a setting of {self.name}; {fix}")
        missing = [k for k, v in known.items() if v == REQUIRED and k not in settings]
        if missing:
            raise SettingError(missing[0], f"is required by {self.name}")
        return dict(settings)


class SettingError(ValueError):
    """A reward function's setting that cannot be used: which one, and what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def _setting_problem(err: Mapping[str, Any], model: type[BaseModel]) -> str:
    if err["type"] == "extra_forbidden":
        known = list(model.model_fields)
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        return "unknown setting; " + (f"did you mean '{close[0]}'?" if close else f"its settings: {', '.join(known)}")
    message = str(err["msg"])
    return message[len("Value error, ") :] if message.startswith("Value error, ") else message


#: Shown for a setting without a default.
REQUIRED = "(required)"


def settings_of(function: RewardFunction) -> dict[str, Any]:
    """The settings a function takes beyond (prompt, answer, row), with their defaults (``REQUIRED`` if none);
    its settings model's fields where it has one."""
    import inspect

    if function.settings_model is not None:
        return {
            name: REQUIRED if field.is_required() else field.default
            for name, field in function.settings_model.model_fields.items()
        }

    found = {}
    for index, param in enumerate(inspect.signature(function.fn).parameters.values()):
        if index < 3 or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        found[param.name] = param.default if param.default is not param.empty else REQUIRED
    return found


class RewardFunctionError(Exception):
    """A reward function raised, did not return in time, or returned a value that is not a finite number; ``fix``
    says what to change."""

    def __init__(self, message: str, fix: str = "make the reward function return a finite float for every answer"):
        super().__init__(message)
        self.fix = fix


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


def has_reference(reference: str | None) -> str | None:
    if reference is None or not reference.strip():
        return "has no reference answer (the prompt/answer format's `answer`, GSM8K's `answer`)"
    return None


def has_final_number(reference: str | None) -> str | None:
    missing = has_reference(reference)
    if missing or reference is None or final_number(reference) is not None:
        return missing
    return f"reference answer {reference[-40:]!r} has no number for gsm8k to compare with (GSM8K's `#### N`)"


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


class RegexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(min_length=1, description="A Python regular expression.")
    full: bool = Field(False, description="Match the whole answer, not just a part.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a regular expression ({exc})") from None
        return value


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
    RewardFunction(
        "exact_match",
        exact_match,
        "the answer equals the reference (surrounding spaces aside)",
        True,
        has_reference,
    ),
    RewardFunction(
        "normalized_match",
        normalized_match,
        "equal after SQuAD normalisation (case, punctuation, articles, spaces)",
        True,
        has_reference,
    ),
    RewardFunction(
        "gsm8k",
        gsm8k,
        "the final number (after ####, else the last) equals the reference's",
        True,
        has_final_number,
    ),
    RewardFunction("gsm8k_format", gsm8k_format, "the answer ends in `#### <number>`"),
    RewardFunction(
        "regex", regex, "the answer matches `pattern` (`full: true`: all of it)", settings_model=RegexSettings
    ),
    RewardFunction("tiny_judge", tiny_judge, "the tiny task's ground-truth judge", True),
)


# -- scoring with the configured functions ------------------------------------------------------------------
def parse_spec(spec: float | Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """A config value (a weight, or ``{weight: W, **settings}``) as (weight, settings)."""
    if isinstance(spec, Mapping):
        settings = dict(spec)
        return float(settings.pop("weight", 1.0)), settings
    return float(spec), {}


class TimedCall:
    """Calls on a daemon thread, waited for at most ``timeout`` seconds: a function that never returns (a stuck
    network call, an endless loop) stops the run instead of hanging it. A thread left stuck is abandoned (a daemon
    dies with the process) and the next call gets a new one."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.requests: queue.Queue | None = None

    def _serve(self, requests: queue.Queue) -> None:
        while True:
            fn, args, kwargs, answer = requests.get()
            try:
                answer.put((True, fn(*args, **kwargs)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who names the function
                answer.put((False, exc))

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.timeout:
            return fn(*args, **kwargs)
        if self.requests is None:
            self.requests = queue.Queue()
            threading.Thread(target=self._serve, args=(self.requests,), daemon=True).start()
        answer: queue.Queue = queue.Queue(maxsize=1)
        self.requests.put((fn, args, kwargs, answer))
        try:
            ok, value = answer.get(timeout=self.timeout)
        except queue.Empty:
            self.requests = None  # that thread is stuck: the next call starts another
            raise TimeoutError(f"did not return within {self.timeout:g} s") from None
        if not ok:
            raise value
        return value


class Rewarder:
    """The configured reward functions, resolved against the registry; each call bounded by ``timeout`` seconds
    (``ppo.reward_function_timeout``; None or 0: unbounded)."""

    def __init__(
        self,
        specs: Mapping[str, float | Mapping[str, Any]],
        registry: Mapping[str, RewardFunction],
        timeout: float | None = None,
    ) -> None:
        unknown = [name for name in specs if name not in registry]
        if unknown:
            raise KeyError(unknown[0])
        self.functions = []
        for name, spec in specs.items():
            weight, settings = parse_spec(spec)
            self.functions.append((registry[name], weight, registry[name].check_settings(settings)))
        self.call = TimedCall(timeout)

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
                returned = self.call(function.fn, prompt, answer, row, **settings)
            except TimeoutError as exc:
                raise RewardFunctionError(
                    f"reward function {function.name!r} {exc}",
                    "make it return sooner, or raise ppo.reward_function_timeout",
                ) from None
            except Exception as exc:  # a user's function may raise anything: name it, with what it said
                raise RewardFunctionError(
                    f"reward function {function.name!r} raised {type(exc).__name__}: {exc}"
                ) from None
            if isinstance(returned, str | bytes) or not hasattr(returned, "__float__"):
                shown = repr(returned)[:40]
                raise RewardFunctionError(
                    f"reward function {function.name!r} returned {shown} (a {type(returned).__name__}, not a number)"
                )
            value = float(returned)
            if not math.isfinite(value):
                raise RewardFunctionError(f"reward function {function.name!r} returned {value}")
            values[function.name] = value
        return values

    def total(self, values: Mapping[str, float]) -> float:
        return sum(weight * values[function.name] for function, weight, _ in self.functions)

    def correct(self, values: Mapping[str, float]) -> bool:
        """Every verifier accepts the answer."""
        return all(values[name] >= 0.5 for name in self.verifiers)


def reference_checks(specs: Mapping[str, Any], registry: Mapping[str, RewardFunction]) -> dict[str, ReferenceCheck]:
    """The reference checks of the configured functions that declare one, by function name."""
    return {
        name: registry[name].check_reference  # type: ignore[misc]
        for name in sorted(specs)
        if name in registry and registry[name].check_reference is not None
    }


def reference_problem(reference: str | None, checks: Mapping[str, ReferenceCheck]) -> str:
    """What makes a row's reference unusable for the first check that refuses it, or ''."""
    for name, check in checks.items():
        problem = check(reference)
        if problem:
            return f"{problem}, so reward function {name!r} could never reward an answer to it"
    return ""
