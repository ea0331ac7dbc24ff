"""The tiny task's judge where people read answers: its verdict in saved samples and in `eval`'s output."""

from __future__ import annotations

from dschat_core.evaluate import format_result
from dschat_core.stages.rl.evaluation import judged
from dschat_core.tiny_task import verdict

SKY = "\n\nHuman: What color is the sky?\n\nAssistant:"
COW = "\n\nHuman: What sound does the cow make?\n\nAssistant:"


def test_verdict_is_none_for_prompts_that_are_not_the_tasks():
    assert verdict(SKY, " The sky is blue.") is True
    assert verdict(SKY, " I do not know.") is False
    assert verdict("\n\nHuman: What is 2 + 2?\n\nAssistant:", " 4") is None


def test_saved_answers_carry_the_verdict_only_for_the_tasks_prompts():
    assert judged({"prompt": COW, "answer": " The cow says moo."})["judge"] is True
    assert "judge" not in judged({"prompt": "\n\nHuman: Hi\n\nAssistant:", "answer": " Hello"})


def test_eval_output_marks_each_answer_and_counts_the_right_ones():
    result = {
        "baseline/reward": -1.0,
        "model/reward": 2.0,
        "prompts": [SKY, COW],
        "baseline/answers": [" I do not know.", " I do not know."],
        "model/answers": [" The sky is blue.", " The cow says woof."],
    }
    text = format_result("ppo", result)
    assert "the tiny task's judge: baseline 0/2 right, model 1/2 right" in text
    assert "model: 'The sky is blue.' [judge: right]" in text and "[judge: wrong]" in text
    other = {**result, "prompts": ["\n\nHuman: What is 2 + 2?\n\nAssistant:"] * 2}
    assert "judge" not in format_result("ppo", other)
