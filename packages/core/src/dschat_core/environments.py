"""Environments for multi-turn stage 3: what answers a model's turn (a tool's result, a game's next state).

An :class:`Environment` is registered by name (``register_environments`` in hookspecs.py; the built-in calculator
below the same way) and named by ``ppo.environment.name``. For each prompt it starts an :class:`Episode` from the
dataset row; the rollout loop (:mod:`dschat_core.stages.rl.episodes`) generates a model turn until one of the
environment's ``stop`` strings (or EOS), hands the turn's text to :meth:`Episode.step`, appends the returned
observation to the conversation (attended, never trained on), and goes on until the model ends with EOS, the
episode is done, ``max_turns`` or the token budget.

Tool calls are written in one format: ``<calc> EXPRESSION </calc>``, answered with ``<result> VALUE </result>`` (the
spaces keep a number one word, tokenized as it is in the prompt and the answer);
each stop string must be one token of the tokenizer (the tiny tools model adds them), so that a turn ends exactly
where the call does, on either rollout engine.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Step:
    """An environment's answer to one model turn: ``observation`` (text appended to the conversation; empty for
    none), ``done`` (the episode ends here), ``reward`` (added to the episode's reward; None for none),
    ``tool_call`` (the turn called a tool) and ``tool_error`` (that call failed: bad arguments, say; the model sees
    the error and may try again)."""

    observation: str = ""
    done: bool = False
    reward: float | None = None
    tool_call: bool = False
    tool_error: bool = False


class Episode(Protocol):
    def step(self, turn: str) -> Step:
        """Answer the model's turn ``turn`` (its text up to and including the stop string that ended it)."""
        ...


@dataclass(frozen=True)
class Environment:
    """A named environment: ``start(row, **settings)`` begins an episode for a dataset row; ``stop``: the strings
    that end a model turn and hand it to the environment; ``settings``: a pydantic model of its settings
    (``ppo.environment.settings``), checked before launch."""

    name: str
    start: Callable[..., Episode]
    stop: tuple[str, ...]
    description: str = ""
    settings: type[BaseModel] | None = None

    def resolved(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """``settings`` checked against the settings model, defaults filled in (raises pydantic's
        ValidationError); as given where the environment has none."""
        if self.settings is None:
            return dict(settings)
        return self.settings(**settings).model_dump()

    def defaults(self) -> dict[str, Any]:
        """Each setting with its default (``(required)`` for none)."""
        if self.settings is None:
            return {}
        return {k: "(required)" if f.is_required() else f.default for k, f in self.settings.model_fields.items()}


class EnvironmentFailure(Exception):
    """An environment that raised, hung or flooded its output, with where: stops the run, or fails the episode
    under ``ppo.environment.on_error: score``."""


# -- the built-in calculator --------------------------------------------------------------------------------------

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)

_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_expression_chars: int = Field(100, ge=1, le=10_000, description="Longer expressions are a tool error.")
    max_abs_value: float = Field(1e12, gt=0, description="Larger intermediate values are a tool error.")


def calculate(expression: str, max_abs_value: float = 1e12) -> int | float:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses), parsed here: nothing of the
    text is evaluated by Python. Raises ValueError for anything else, a division by zero or a value too large."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not arithmetic: {expression.strip()[:40]!r}") from exc

    def value(node: ast.AST) -> int | float:
        result: Any
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            result = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            result = _UNARY[type(node.op)](value(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            try:
                result = _OPERATORS[type(node.op)](left, right)
            except (ZeroDivisionError, OverflowError) as exc:
                raise ValueError(str(exc)) from exc
        else:
            raise ValueError(f"not arithmetic: {type(node).__name__}")
        if isinstance(result, complex) or not math.isfinite(result) or abs(result) > max_abs_value:
            raise ValueError("value out of range")
        return int(result) if isinstance(result, int) else float(result)

    return value(tree.body)


def format_number(number: int | float) -> str:
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    return str(number) if isinstance(number, int) else f"{number:.6g}"


@dataclass
class CalculatorEpisode:
    """Answers each ``<calc>…</calc>`` call with ``<result>…</result>`` (or ``<result>error</result>``); a turn
    without a call gets no observation. The episode ends when the model ends its answer (EOS)."""

    max_expression_chars: int = 100
    max_abs_value: float = 1e12
    calls: list[str] = field(default_factory=list)

    def step(self, turn: str) -> Step:
        found = CALL.findall(turn)
        if not found:
            return Step()
        expression = found[-1]
        self.calls.append(expression)
        try:
            if len(expression) > self.max_expression_chars:
                raise ValueError("expression too long")
            result = format_number(calculate(expression, self.max_abs_value))
        except ValueError:
            return Step(observation=" <result> error </result>", tool_call=True, tool_error=True)
        return Step(observation=f" <result> {result} </result>", tool_call=True)


def start_calculator(row: Mapping[str, Any], **settings: Any) -> CalculatorEpisode:
    return CalculatorEpisode(**settings)


CALCULATOR = Environment(
    name="calculator",
    start=start_calculator,
    stop=("</calc>",),
    description="Arithmetic: <calc> EXPR </calc> is answered with <result> VALUE </result> (parsed, never evaluated).",
    settings=CalculatorSettings,
)

BUILTIN_ENVIRONMENTS = [CALCULATOR]
