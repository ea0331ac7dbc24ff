"""Conversational rows and chat templates: how a conversation becomes the text a stage tokenizes.

A conversational format maps a row to a :class:`Conversation` (its prompt turns, and the assistant turns it
completes them with); :class:`Renderer` renders it through the tokenizer's chat template (or ``data.chat_template``)
into the (prompt, chosen, rejected) texts the text formats give, plus, for stage 1, the characters of every
assistant turn, so that only those carry loss. The prompt is rendered with the template's generation prompt and
must be the start of the whole conversation's rendering, so that an answer generated after it is what training
saw (TRL's and OpenRLHF's convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .formats import DatasetFormat, RowError, text

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """Prompt turns (ending in a user turn), then the chosen assistant turn(s) and, for pairs, the rejected;
    ``dialogue`` a whole multi-turn conversation where stage 1 trains on every assistant turn of it."""

    prompt: list[Message]
    chosen: list[Message] | None
    rejected: list[Message] | None = None
    dialogue: list[Message] | None = None


def messages(row: Mapping[str, Any], column: str) -> list[Message]:
    """A column of role/content messages, checked: a non-empty list, known roles, non-empty text."""
    value = row.get(column)
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise RowError(column, "should be a non-empty list of {role, content} messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise RowError(column, f"message {i} should be a mapping with text 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(column, f"message {i} has unknown role {role!r} (known: {', '.join(ROLES)})")
        if not message["content"].strip():
            raise RowError(column, f"message {i} ({role}) is empty")
        out.append({"role": str(role), "content": str(message["content"])})
    return out


def with_system(row: Mapping[str, Any], turns: list[Message]) -> list[Message]:
    """``turns`` after the row's ``system`` column where it has one (and the turns do not start with one)."""
    system = row.get("system")
    if isinstance(system, str) and system.strip() and turns[0]["role"] != "system":
        return [{"role": "system", "content": system}, *turns]
    return turns


def split_last_answer(turns: list[Message], column: str) -> tuple[list[Message], list[Message]]:
    """A conversation as (the turns before its last assistant turn, that turn)."""
    if turns[-1]["role"] != "assistant":
        raise RowError(column, "should end with an assistant turn")
    return turns[:-1], turns[-1:]


def shared_prompt(chosen: list[Message], rejected: list[Message]) -> Conversation:
    """Two whole conversations that share their prompt turns and differ in the last assistant turn."""
    prompt, chosen_answer = split_last_answer(chosen, "chosen")
    rejected_prompt, rejected_answer = split_last_answer(rejected, "rejected")
    if prompt != rejected_prompt:
        raise RowError("rejected", "does not share its prompt turns with 'chosen'")
    return Conversation(prompt, chosen_answer, rejected_answer)


def _check_prompt(turns: list[Message], column: str) -> None:
    if not turns or turns[-1]["role"] != "user":
        raise RowError(column, "should end with a user turn (the prompt the assistant answers)")


class Renderer:
    """Conversations to text through a chat template: the tokenizer's, or ``template`` (Jinja) where given."""

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.eos = tokenizer.eos_token or ""
        # a template that writes the BOS itself, for a tokenizer that adds one too, would give two (Llama 3's
        # known pitfall): the rendered text leaves it to the tokenizer
        bos = tokenizer.bos_token
        adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        self.bos = bos if adds_bos else ""

    def render(self, turns: list[Message], generation_prompt: bool = False) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                turns, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # noqa: BLE001 - a template's own error (raise_exception, bad alternation) names it
            raise RowError("messages", f"cannot be rendered by the chat template ({exc})") from None
        text = str(text)
        return text[len(self.bos) :] if self.bos and text.startswith(self.bos) else text

    def prompt(self, turns: list[Message]) -> str:
        """The prompt as generation reads it: the turns, then the template's generation prompt."""
        return self.render(turns, generation_prompt=True)

    def _without_eos(self, text: str) -> str:
        # every stage appends EOS to what it trains on: a template's own closing EOS is not doubled
        return text[: -len(self.eos)] if self.eos and text.endswith(self.eos) else text

    def completion(self, prompt_turns: list[Message], answer: list[Message], prompt_text: str, column: str) -> str:
        """The text ``answer`` adds after ``prompt_text`` (the rendered prompt) in the whole conversation."""
        whole = self._without_eos(self.render(prompt_turns + answer))
        if not whole.startswith(prompt_text):
            raise RowError(
                column,
                "renders differently after its prompt than the prompt with the generation prompt does; fix: a chat "
                "template whose generation prompt is how its assistant turns begin",
            )
        if not whole[len(prompt_text) :].strip():
            raise RowError(column, "renders to no text after its prompt")
        return whole[len(prompt_text) :]

    def triple(self, conversation: Conversation) -> tuple[str, str | None, str | None]:
        """(prompt, chosen, rejected) texts of a single-answer conversation or a pair."""
        _check_prompt(conversation.prompt, "prompt")
        prompt = self.prompt(conversation.prompt)
        chosen = rejected = None
        if conversation.chosen is not None:
            chosen = self.completion(conversation.prompt, conversation.chosen, prompt, "chosen")
        if conversation.rejected is not None:
            rejected = self.completion(conversation.prompt, conversation.rejected, prompt, "rejected")
        return prompt, chosen, rejected

    def dialogue(self, turns: list[Message]) -> tuple[str, str, list[tuple[int, int]]]:
        """A multi-turn SFT conversation: (the text up to its first assistant turn, the rest, the character spans
        of every assistant turn in the whole text). Each turn's span is what rendering it adds to the
        conversation before it, after the generation prompt (verl's and OpenRLHF's prefix difference)."""
        if "assistant" not in {t["role"] for t in turns}:
            raise RowError("messages", "has no assistant turn")
        whole = self._without_eos(self.render(turns))
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            if i == 0 or turns[i - 1]["role"] == "assistant":
                raise RowError("messages", f"message {i} (assistant) does not answer a user turn")
            before = self.prompt(turns[:i])
            start, end = len(before), len(self.render(turns[: i + 1]))  # with the turn's EOS: the model learns to stop
            if not whole.startswith(before) or end <= start:
                raise RowError(
                    "messages",
                    f"message {i} renders differently inside the conversation than after its turns; fix: a chat "
                    "template that renders each turn the same wherever it is",
                )
            spans.append((start, end))
        first = spans[0][0]
        return whole[:first], whole[first:], spans


# -- the conversational formats (TRL's dataset types, conversational) -------------------------------------------


def _messages(row: Mapping[str, Any]) -> Conversation:
    turns = with_system(row, messages(row, "messages"))
    prompt, answer = split_last_answer(turns, "messages")
    return Conversation(prompt, answer, dialogue=turns)


def _assistant_turns(row: Mapping[str, Any], column: str) -> list[Message]:
    turns = messages(row, column)
    if any(t["role"] != "assistant" for t in turns):
        raise RowError(column, "should hold assistant turns only (the prompt's turns go in 'prompt')")
    return turns


def _prompt_completion(row: Mapping[str, Any]) -> Conversation:
    prompt = with_system(row, messages(row, "prompt"))
    completion = _assistant_turns(row, "completion")
    return Conversation(prompt, completion, dialogue=prompt + completion)


def _preference(row: Mapping[str, Any]) -> Conversation:
    chosen, rejected = with_system(row, messages(row, "chosen")), with_system(row, messages(row, "rejected"))
    return shared_prompt(chosen, rejected)


def _prompt_preference(row: Mapping[str, Any]) -> Conversation:
    prompt = with_system(row, messages(row, "prompt"))
    return Conversation(prompt, _assistant_turns(row, "chosen"), _assistant_turns(row, "rejected"))


def _prompt_answer(row: Mapping[str, Any]) -> Conversation:
    prompt = with_system(row, messages(row, "prompt"))
    return Conversation(prompt, [{"role": "assistant", "content": text(row, "answer")}])


CONVERSATIONAL_FORMATS: tuple[DatasetFormat, ...] = (
    DatasetFormat(
        "conversational/messages",
        ("messages",),
        None,
        pairwise=False,
        to_conversation=_messages,
        list_columns=("messages",),
    ),
    DatasetFormat(
        "conversational/prompt-completion",
        ("prompt", "completion"),
        None,
        pairwise=False,
        to_conversation=_prompt_completion,
        list_columns=("prompt", "completion"),
    ),
    DatasetFormat(
        "conversational/preference",
        ("chosen", "rejected"),
        None,
        to_conversation=_preference,
        list_columns=("chosen", "rejected"),
    ),
    DatasetFormat(
        "conversational/prompt-preference",
        ("prompt", "chosen", "rejected"),
        None,
        to_conversation=_prompt_preference,
        list_columns=("prompt", "chosen", "rejected"),
    ),
    DatasetFormat(
        "conversational/prompt-answer",
        ("prompt", "answer"),
        None,
        pairwise=False,
        to_reference=lambda row: text(row, "answer"),
        to_conversation=_prompt_answer,
        list_columns=("prompt",),
    ),
)
