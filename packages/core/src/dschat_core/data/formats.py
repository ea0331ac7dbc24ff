"""Dataset formats: how the rows of a dataset become (prompt, chosen, rejected) triples.

Every dataset DeepSpeed-Chat supports is here under its hub name, with its prompt convention
(" Human: … Assistant:"). A plugin adds more through the ``register_dataset_formats`` hook.
A local folder is matched by the format name recorded in its metadata (written by ``dschat-core data``
commands) or by its columns — never by the folder's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Row = Mapping[str, Any]
Triple = tuple[str, str, "str | None"]


class RowError(ValueError):
    """A row that cannot be mapped; the message names the column."""

    def __init__(self, column: str, problem: str) -> None:
        super().__init__(f"column '{column}' {problem}")
        self.column = column


def text(row: Row, column: str) -> str:
    """A non-empty string column, or a RowError naming it."""
    if column not in row:
        raise RowError(column, "is missing")
    value = row[column]
    if value is None:
        raise RowError(column, "is None")
    if not isinstance(value, str):
        raise RowError(column, f"should be text, not {type(value).__name__}")
    if not value.strip():
        raise RowError(column, "is empty")
    return value


def first(row: Row, column: str, key: str | None = None) -> str:
    """Text of the first element of a list column (optionally of a key inside it)."""
    items = row.get(column)
    if not isinstance(items, list) or not items:
        raise RowError(column, "should be a non-empty list")
    item = items[0]
    if key is not None:
        if not isinstance(item, Mapping):
            raise RowError(column, f"items should be mappings with '{key}'")
        return text(item, key)
    return text({column: item}, column)


def human(question: str) -> str:
    return f" Human: {question} Assistant:"


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset schema. ``to_triple`` maps a row; a None ``rejected`` means SFT-only data."""

    name: str
    columns: tuple[str, ...]
    to_triple: Callable[[Row], Triple] | None
    """None for a conversational format: its rows are rendered through a chat template (``to_conversation``)."""
    eval_split: str | None = "test"
    """Name of the evaluation split; None means the train split is cut 9:1."""
    train_split: str = "train"
    hub_name: str | None = None
    """What to load from the hub when it differs from ``name`` (two mkqa formats read ``mkqa``)."""
    hub_config: str | None = None
    pairwise: bool = True
    aliases: tuple[str, ...] = field(default=())
    to_reference: Callable[[Row], str] | None = None
    """The reference answer a verifier compares with (stage 3's reward functions), where the schema has one."""
    generic: bool = False
    """A schema that keeps its columns' text as it is: preferred when a local dataset's columns fit several."""
    to_conversation: Callable[[Row], Any] | None = None
    """A conversational format's mapping to a :class:`~dschat_core.data.conversations.Conversation`."""
    list_columns: tuple[str, ...] = ()
    """The columns that hold lists of messages: a conversational format fits only where they do."""

    @property
    def conversational(self) -> bool:
        return self.to_conversation is not None

    @property
    def clean_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_")

    def triple(self, row: Row, check_pair: bool = True) -> Triple:
        """The row as (prompt, chosen, rejected). A pair whose answers are the same teaches a preference nothing:
        refused unless ``check_pair`` is off (for the stages that read no rejected answer)."""
        if self.to_triple is None:
            raise RowError(self.columns[0], "is conversational: it is rendered through a chat template")
        prompt, chosen, rejected = self.to_triple(row)
        if check_pair and self.pairwise and rejected is not None and chosen == rejected:
            raise RowError("chosen", "is identical to 'rejected'")
        return prompt, chosen, rejected


# -- DeepSpeed-Chat's adapters (dschat/utils/data/raw_datasets.py) ------------------------------------------


def _rm_static(row: Row) -> Triple:
    return text(row, "prompt"), text(row, "chosen"), text(row, "rejected")


def _gptj_pairwise(row: Row) -> Triple:
    return human(text(row, "prompt")), " " + text(row, "chosen"), " " + text(row, "rejected")


def _after_last_assistant(value: str, column: str) -> str:
    marker = "Assistant:"
    if marker not in value:
        raise RowError(column, "has no 'Assistant:' turn")
    answer = value.split(marker)[-1]
    if not answer.strip():
        raise RowError(column, "has an empty last 'Assistant:' turn")
    return answer


def _rlhf_reward(row: Row) -> Triple:
    chosen = _after_last_assistant(text(row, "chosen"), "chosen")
    rejected = _after_last_assistant(text(row, "rejected"), "rejected")
    return text(row, "prompt") + "Assistant:", chosen, rejected


_CITATION = re.compile(r" ?\[\d+(?:,\s*\d+)*\]")
_PARENS = re.compile(r" ?\([^()]*\)")


def _webgpt_clean(answer: str) -> str:
    return " " + _PARENS.sub("", _CITATION.sub("", answer)).strip()


def _webgpt(row: Row) -> Triple:
    question = row.get("question")
    if not isinstance(question, Mapping):
        raise RowError("question", "should be a mapping with 'full_text'")
    prompt = human(text(question, "full_text"))
    a0, a1 = text(row, "answer_0"), text(row, "answer_1")
    s0, s1 = row.get("score_0"), row.get("score_1")
    if not isinstance(s0, int | float) or not isinstance(s1, int | float):
        raise RowError("score_0", "and 'score_1' should be numbers")
    chosen, rejected = (a0, a1) if s0 >= s1 else (a1, a0)
    return prompt, _webgpt_clean(chosen), _webgpt_clean(rejected)


def _shp(row: Row) -> Triple:
    prompt = human(text(row, "history"))
    a, b = text(row, "human_ref_A"), text(row, "human_ref_B")
    chosen, rejected = (a, b) if row.get("labels") == 1 else (b, a)
    return prompt, " " + chosen, " " + rejected


def _sharegpt(row: Row) -> Triple:
    prompt = text(row, "prompt").replace("USER", "Human").replace("ASSISTANT", "Assistant")
    return prompt, " " + text(row, "label"), None


def _as_is(row: Row) -> Triple:
    return text(row, "prompt"), text(row, "chosen"), text(row, "rejected")


def _prompt_answer(row: Row) -> Triple:
    return text(row, "prompt"), text(row, "answer"), None


def _gsm8k(row: Row) -> Triple:
    return human(text(row, "question")), " " + text(row, "answer"), None


def _local_json(row: Row) -> Triple:
    return " " + text(row, "prompt"), " " + text(row, "chosen"), " " + text(row, "rejected")


def _zhihu(row: Row) -> Triple:
    return human(text(row, "INSTRUCTION")), " " + text(row, "RESPONSE"), None


def _miracl(row: Row) -> Triple:
    negatives = row.get("negative_passages")
    rejected = first(row, "negative_passages", "text") if negatives else None
    return human(text(row, "query")), first(row, "positive_passages", "text"), rejected


def _miracl_ja(row: Row) -> Triple:
    negatives = row.get("negative_passages")
    rejected = first(row, "negative_passages", "text") if negatives else None
    return text(row, "query"), first(row, "positive_passages", "text"), rejected


def _hc3(row: Row) -> Triple:
    return text(row, "question"), first(row, "human_answers"), None


def _mkqa(lang: str) -> Callable[[Row], Triple]:
    def mapping(row: Row) -> Triple:
        queries, answers = row.get("queries"), row.get("answers")
        if not isinstance(queries, Mapping):
            raise RowError("queries", "should be a mapping of languages")
        if not isinstance(answers, Mapping):
            raise RowError("answers", "should be a mapping of languages")
        return text(queries, lang), first(answers, lang, "text"), None

    return mapping


def _qg_jaquad(row: Row) -> Triple:
    return text(row, "question"), text(row, "sentence"), None


def _qag_jaquad(row: Row) -> Triple:
    return first(row, "questions"), text(row, "paragraph"), None


BUILTIN_FORMATS: tuple[DatasetFormat, ...] = (
    # Generic local schemas, their text kept as it is (a local file is recognised by its columns alone).
    DatasetFormat("local/pairwise", ("prompt", "chosen", "rejected"), _as_is, eval_split="test", generic=True),
    DatasetFormat(
        "local/prompt-answer",
        ("prompt", "answer"),
        _prompt_answer,
        eval_split="test",
        pairwise=False,
        to_reference=lambda row: text(row, "answer"),
        generic=True,
    ),
    DatasetFormat(
        "openai/gsm8k",
        ("question", "answer"),
        _gsm8k,
        hub_config="main",
        pairwise=False,
        to_reference=lambda row: text(row, "answer"),
    ),
    DatasetFormat("Dahoas/rm-static", ("prompt", "response", "chosen", "rejected"), _rm_static, generic=True),
    DatasetFormat("Dahoas/full-hh-rlhf", ("prompt", "response", "chosen", "rejected"), _rm_static),
    DatasetFormat(
        "Dahoas/synthetic-instruct-gptj-pairwise", ("prompt", "chosen", "rejected"), _gptj_pairwise, eval_split=None
    ),
    DatasetFormat("yitingxie/rlhf-reward-datasets", ("prompt", "chosen", "rejected"), _rlhf_reward),
    DatasetFormat(
        "openai/webgpt_comparisons",
        ("question", "answer_0", "answer_1", "score_0", "score_1"),
        _webgpt,
        eval_split=None,
    ),
    DatasetFormat(
        "stanfordnlp/SHP", ("history", "human_ref_A", "human_ref_B", "labels"), _shp, eval_split="validation"
    ),
    DatasetFormat("pvduy/sharegpt_alpaca_oa_vicuna_format", ("prompt", "label"), _sharegpt, pairwise=False),
    DatasetFormat("local/jsonfile", ("prompt", "chosen", "rejected"), _local_json, eval_split="eval"),
    DatasetFormat("wangrui6/Zhihu-KOL", ("INSTRUCTION", "RESPONSE"), _zhihu, eval_split=None, pairwise=False),
    DatasetFormat(
        "Cohere/miracl-zh-queries-22-12", ("query", "positive_passages", "negative_passages"), _miracl, eval_split="dev"
    ),
    DatasetFormat(
        "Hello-SimpleAI/HC3-Chinese",
        ("question", "human_answers"),
        _hc3,
        eval_split=None,
        pairwise=False,
        hub_config="all",
    ),
    DatasetFormat(
        "mkqa-Chinese", ("queries", "answers"), _mkqa("zh_cn"), eval_split=None, hub_name="mkqa", pairwise=False
    ),
    DatasetFormat(
        "mkqa-Japanese", ("queries", "answers"), _mkqa("ja"), eval_split=None, hub_name="mkqa", pairwise=False
    ),
    DatasetFormat(
        "Cohere/miracl-ja-queries-22-12",
        ("query", "positive_passages", "negative_passages"),
        _miracl_ja,
        eval_split="dev",
    ),
    DatasetFormat("lmqg/qg_jaquad", ("question", "sentence"), _qg_jaquad, eval_split="validation", pairwise=False),
    DatasetFormat("lmqg/qag_jaquad", ("questions", "paragraph"), _qag_jaquad, eval_split="validation", pairwise=False),
)
