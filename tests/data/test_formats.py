"""Each registered dataset maps a fixture row in its real schema to the right triple."""

from __future__ import annotations

import pytest

from dschat_core.data.formats import BUILTIN_FORMATS, RowError

BY_NAME = {fmt.name: fmt for fmt in BUILTIN_FORMATS}

FIXTURES = {
    "local/pairwise": (
        {"prompt": "\n\nHuman: Hi?\n\nAssistant:", "chosen": " Hello.", "rejected": " Go."},
        ("\n\nHuman: Hi?\n\nAssistant:", " Hello.", " Go."),
    ),
    "local/prompt-answer": (
        {"prompt": "\n\nHuman: 2 + 2?\n\nAssistant:", "answer": " 4"},
        ("\n\nHuman: 2 + 2?\n\nAssistant:", " 4", None),
    ),
    "openai/gsm8k": (
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        (" Human: Tom has 3 apples and buys 4. How many? Assistant:", " 3 + 4 = 7\n#### 7", None),
    ),
    "Dahoas/rm-static": (
        {"prompt": "\n\nHuman: Hi?\n\nAssistant:", "response": " Hello.", "chosen": " Hello.", "rejected": " Go."},
        ("\n\nHuman: Hi?\n\nAssistant:", " Hello.", " Go."),
    ),
    "Dahoas/full-hh-rlhf": (
        {"prompt": "\n\nHuman: Hi?\n\nAssistant:", "response": " A", "chosen": " A", "rejected": " B"},
        ("\n\nHuman: Hi?\n\nAssistant:", " A", " B"),
    ),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Rock."},
        (" Human: Name a fruit. Assistant:", " Apple.", " Rock."),
    ),
    "yitingxie/rlhf-reward-datasets": (
        {"prompt": "Human: Hi? ", "chosen": "Human: Hi? Assistant: Hello!", "rejected": "Human: Hi? Assistant: Bye"},
        ("Human: Hi? Assistant:", " Hello!", " Bye"),
    ),
    "openai/webgpt_comparisons": (
        {
            "question": {"full_text": "Why is the sky blue?"},
            "answer_0": "Rayleigh scattering [1] (mostly).",
            "answer_1": "Paint.",
            "score_0": 1.0,
            "score_1": -1.0,
        },
        (" Human: Why is the sky blue? Assistant:", " Rayleigh scattering.", " Paint."),
    ),
    "stanfordnlp/SHP": (
        {"history": "Best pet?", "human_ref_A": "A cat.", "human_ref_B": "A rock.", "labels": 0},
        (" Human: Best pet? Assistant:", " A rock.", " A cat."),
    ),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": (
        {"prompt": "USER: Hi ASSISTANT:", "label": "Hello"},
        ("Human: Hi Assistant:", " Hello", None),
    ),
    "local/jsonfile": (
        {"prompt": "Human: Hi Assistant:", "chosen": "Yes", "rejected": "No"},
        (" Human: Hi Assistant:", " Yes", " No"),
    ),
    "wangrui6/Zhihu-KOL": ({"INSTRUCTION": "问题", "RESPONSE": "回答"}, (" Human: 问题 Assistant:", " 回答", None)),
    "Cohere/miracl-zh-queries-22-12": (
        {"query": "q", "positive_passages": [{"text": "good"}], "negative_passages": [{"text": "bad"}]},
        (" Human: q Assistant:", "good", "bad"),
    ),
    "Hello-SimpleAI/HC3-Chinese": ({"question": "q", "human_answers": ["a"]}, ("q", "a", None)),
    "mkqa-Chinese": ({"queries": {"zh_cn": "问"}, "answers": {"zh_cn": [{"text": "答"}]}}, ("问", "答", None)),
    "mkqa-Japanese": ({"queries": {"ja": "質問"}, "answers": {"ja": [{"text": "答え"}]}}, ("質問", "答え", None)),
    "Cohere/miracl-ja-queries-22-12": (
        {"query": "q", "positive_passages": [{"text": "good"}], "negative_passages": []},
        ("q", "good", None),
    ),
    "lmqg/qg_jaquad": ({"question": "q", "sentence": "s"}, ("q", "s", None)),
    "lmqg/qag_jaquad": ({"questions": ["q1", "q2"], "paragraph": "p"}, ("q1", "p", None)),
}


def test_every_registered_format_has_a_fixture():
    assert set(FIXTURES) == set(BY_NAME)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_format_maps_its_schema(name):
    row, expected = FIXTURES[name]
    assert BY_NAME[name].triple(row) == expected


@pytest.mark.parametrize(
    ("row", "column", "problem"),
    [
        ({"prompt": "p", "response": "", "chosen": None, "rejected": "r"}, "chosen", "is None"),
        ({"prompt": "p", "response": "", "chosen": "  ", "rejected": "r"}, "chosen", "is empty"),
        ({"prompt": 3, "response": "", "chosen": "c", "rejected": "r"}, "prompt", "should be text"),
        ({"response": "", "chosen": "c", "rejected": "r"}, "prompt", "is missing"),
        ({"prompt": "p", "response": "", "chosen": "same", "rejected": "same"}, "chosen", "identical"),
    ],
)
def test_bad_rows_name_the_column(row, column, problem):
    with pytest.raises(RowError) as info:
        BY_NAME["Dahoas/rm-static"].triple(row)
    assert info.value.column == column and problem in str(info.value)
