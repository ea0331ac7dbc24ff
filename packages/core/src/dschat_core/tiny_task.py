"""The tiny preference task behind the CPU default: a dataset with a learnable signal, and a judge that knows
the ground truth.

Prompts ask for a fact about one of a few dozen subjects ("What color is the sky?"). A preferred answer states the
fact ("The sky is blue."); a dispreferred one is curt ("I do not know.") or wrong ("The sky is green."). The
pairwise data is in Dahoas/rm-static's schema; the SFT demonstrations are 40% good answers and 60% "I do not
know.", so that the SFT model answers curtly when decoding greedily and PPO has something to learn. :func:`judge`
scores a generation by the ground truth, so a rising reward can be told apart from a fooled reward model.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

COLORS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "banana": "yellow",
    "blood": "red",
    "sea": "blue",
    "leaf": "green",
    "milk": "white",
    "crow": "black",
    "lemon": "yellow",
    "cherry": "red",
    "cloud": "white",
    "frog": "green",
    "tomato": "red",
    "night": "black",
    "sun": "yellow",
    "plum": "purple",
    "grape": "purple",
    "carrot": "orange",
    "pumpkin": "orange",
    "chocolate": "brown",
    "bark": "brown",
    "rose": "red",
}
SOUNDS = {
    "cat": "meow",
    "dog": "woof",
    "cow": "moo",
    "duck": "quack",
    "lion": "roar",
    "sheep": "baa",
    "owl": "hoot",
    "horse": "neigh",
    "pig": "oink",
    "snake": "hiss",
    "bee": "buzz",
    "mouse": "squeak",
    "wolf": "howl",
    "frog": "croak",
    "crow": "caw",
    "goat": "bleat",
}
CURT = [" I do not know.", " No.", " Ask someone else.", " Maybe."]
COLOR_QUESTIONS = ["What color is the {s}?", "Tell me the color of the {s}.", "Which color does the {s} have?"]
SOUND_QUESTIONS = ["What sound does the {s} make?", "How does the {s} sound?", "Which noise does a {s} make?"]


def _fact(kind: str, subject: str, value: str) -> str:
    return f" The {subject} is {value}." if kind == "color" else f" The {subject} says {value}."


def _prompt(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def _items() -> list[tuple[str, str, str, list[str]]]:
    items = [("color", s, v, COLOR_QUESTIONS) for s, v in COLORS.items()]
    items += [("sound", s, v, SOUND_QUESTIONS) for s, v in SOUNDS.items()]
    return items


def make_rows(n: int, seed: int, mix: float | None = None) -> list[dict[str, str]]:
    """``n`` rows in the rm-static schema (prompt, response, chosen, rejected). With ``mix``, ``chosen`` is the
    good answer only with that probability and otherwise the one curt reply (SFT demonstrations from a mostly
    curt demonstrator: greedy decoding of the SFT model then says "I do not know.", sampling finds the facts)."""
    rng = random.Random(seed)
    items = _items()
    rows = []
    for _ in range(n):
        kind, subject, value, questions = rng.choice(items)
        pool = sorted(set(COLORS.values()) if kind == "color" else set(SOUNDS.values()))
        wrong = rng.choice([v for v in pool if v != value])
        good = _fact(kind, subject, value)
        bad = rng.choice(CURT) if rng.random() < 0.5 else _fact(kind, subject, wrong)
        chosen = good if mix is None or rng.random() < mix else CURT[0]
        rejected = bad if chosen == good else good
        rows.append(
            {
                "prompt": _prompt(rng.choice(questions).format(s=subject)),
                "response": chosen,
                "chosen": chosen,
                "rejected": rejected,
            }
        )
    return rows


_SUBJECT = re.compile(r"(?:the|a) (\w+)")


def judge(prompt: str, answer: str) -> bool:
    """True when the answer states the right fact for the prompt's subject and no other value of its kind."""
    question = prompt.rsplit("Human:", 1)[-1]
    table = COLORS if "color" in question.lower() else SOUNDS
    subject = next((m.group(1) for m in _SUBJECT.finditer(question) if m.group(1) in table), None)
    if subject is None:
        return False
    words = set(re.findall(r"[a-z]+", answer.lower()))
    values = set(table.values())
    return table[subject] in words and not (words & (values - {table[subject]}))


def verdict(prompt: str, answer: str) -> bool | None:
    """The judge's verdict where the prompt is one of the tiny task's questions; None for any other prompt."""
    question = prompt.rsplit("Human:", 1)[-1]
    table = COLORS if "color" in question.lower() else SOUNDS
    if not any(m.group(1) in table for m in _SUBJECT.finditer(question)):
        return None
    return judge(prompt, answer)


def preference_rate(prompts: list[str], answers: list[str]) -> float:
    return sum(judge(p, a) for p, a in zip(prompts, answers, strict=True)) / max(1, len(prompts))


def corpus() -> list[str]:
    """Every text the task can produce: what the tiny tokenizers are trained on."""
    texts = []
    for kind, subject, value, questions in _items():
        texts += [_prompt(q.format(s=subject)) for q in questions]
        texts.append(_fact(kind, subject, value))
    texts += CURT
    return texts


def make_texts(n: int, seed: int) -> list[dict[str, str]]:
    """Plain text for stage 3's unsupervised (PTX) loss: a few true facts per line."""
    rng = random.Random(seed)
    facts = [_fact(kind, subject, value).strip() for kind, subject, value, _ in _items()]
    return [{"text": " ".join(rng.sample(facts, 3))} for _ in range(n)]


def make_questions(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` questions with their reference answers (the ``prompt``/``answer`` schema): what stage 3 learns from
    with a verifier reward."""
    rng = random.Random(seed)
    items = _items()
    rows = []
    for _ in range(n):
        kind, subject, value, questions = rng.choice(items)
        rows.append({"prompt": _prompt(rng.choice(questions).format(s=subject)), "answer": _fact(kind, subject, value)})
    return rows


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content.strip()}


def _chat_history(rng: random.Random, mix: float | None = None) -> list[dict[str, str]]:
    """Half the conversations start with an earlier question, answered well (with ``mix``: with that
    probability, else curtly, as the demonstrator answers the last one), so that prompts are multi-turn."""
    if rng.random() < 0.5:
        return []
    kind, subject, value, questions = rng.choice(_items())
    answer = _fact(kind, subject, value) if mix is None or rng.random() < mix else CURT[0]
    return [_user(rng.choice(questions).format(s=subject)), _assistant(answer)]


def make_chat_rows(n: int, seed: int, mix: float | None = None) -> list[dict[str, Any]]:
    """The tiny task as conversations: with ``mix``, SFT rows of ``messages`` (multi-turn where they have a
    history, the last answer good with probability ``mix``, else curt; some with a ``system`` line); without,
    preference rows (``prompt`` messages, ``chosen``/``rejected`` assistant turns)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for row in make_rows(n, seed, mix):
        history = _chat_history(rng, mix)
        question = _user(row["prompt"].split("Human: ", 1)[1].split("\n\nAssistant:")[0])
        if mix is not None:
            chat: dict[str, Any] = {"messages": [*history, question, _assistant(row["chosen"])]}
            if rng.random() < 0.25:
                chat["system"] = "You answer in one sentence."
            rows.append(chat)
        else:
            prompt = [*history, question]
            rows.append(
                {"prompt": prompt, "chosen": [_assistant(row["chosen"])], "rejected": [_assistant(row["rejected"])]}
            )
    return rows


def make_chat_questions(n: int, seed: int) -> list[dict[str, Any]]:
    """Conversational prompts with reference answers (``prompt`` messages, ``answer``), multi-turn where they have
    a history."""
    rng = random.Random(seed)
    rows = []
    for row in make_questions(n, seed):
        question = _user(row["prompt"].split("Human: ", 1)[1].split("\n\nAssistant:")[0])
        rows.append({"prompt": [*_chat_history(rng), question], "answer": row["answer"].strip()})
    return rows


def write_sample(out_dir: str | Path, seed: int = 1234) -> Path:
    """Write the shipped sample: ``tiny-prefs`` (pairwise, train/test JSONL), ``tiny-sft`` (mixed demos),
    ``tiny-qa`` (questions with reference answers), ``tiny-text`` (plain text for the PTX loss), and the same task
    as conversations: ``tiny-chat-prefs``, ``tiny-chat-sft`` and ``tiny-chat-qa``."""
    out = Path(out_dir)
    text = out / "tiny-text"
    text.mkdir(parents=True, exist_ok=True)
    with open(text / "train.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in make_texts(500, seed + 200))
    datasets = {
        "tiny-prefs": ("Dahoas/rm-static", {"train": 2000, "test": 200}, lambda n, s: make_rows(n, s)),
        "tiny-sft": ("Dahoas/rm-static", {"train": 1000, "test": 100}, lambda n, s: make_rows(n, s + 100, 0.4)),
        "tiny-qa": ("local/prompt-answer", {"train": 1000, "test": 100}, lambda n, s: make_questions(n, s + 300)),
        "tiny-chat-prefs": (
            "conversational/prompt-preference",
            {"train": 2000, "test": 200},
            lambda n, s: make_chat_rows(n, s + 400),
        ),
        "tiny-chat-sft": (
            "conversational/messages",
            {"train": 1000, "test": 100},
            lambda n, s: make_chat_rows(n, s + 500, 0.4),
        ),
        "tiny-chat-qa": (
            "conversational/prompt-answer",
            {"train": 1000, "test": 100},
            lambda n, s: make_chat_questions(n, s + 600),
        ),
    }
    for name, (fmt, splits, rows_of) in datasets.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for offset, (split, count) in enumerate(splits.items()):
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows_of(count, seed + offset))
        (folder / "dschat-dataset.json").write_text(json.dumps({"format": fmt, "source": "dschat tiny task"}) + "\n")
    return out
