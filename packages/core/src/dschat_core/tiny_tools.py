"""The tiny tools task behind ``samples/tiny-cpu-tools.yaml``: two-digit multiplication and addition, which a
0.7M-parameter model cannot compute but can answer with the built-in calculator environment.

Questions ask "What is 47 times 38?" with the reference answer "The answer is 1786."; a tool-using answer calls
``<calc> 47 * 38 </calc>``, reads ``<result> 1786 </result>`` and answers. The SFT demonstrations are 35% tool use and
65% confident guesses (a random number), so the SFT model mostly guesses when it decodes greedily and stage 3 has
tool use to discover: held-out accuracy measures whether it did.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

#: The calculator's markup, each one token of the tiny tools tokenizer (a turn must end exactly at ``</calc>``).
TOOL_TOKENS = ["<calc>", "</calc>", "<result>", "</result>"]
OPERATIONS = {"times": "*", "plus": "+"}
#: The tiny tools model: wider than the tiny task's (copying numbers through a tool call takes more than 0.1M
#: parameters), heads 32 wide so that vLLM's CPU kernels run it too.
TOOLS_MODEL = {"hidden": 128, "layers": 3, "heads": 4}


def _prompt(a: int, word: str, b: int) -> str:
    return f"\n\nHuman: What is {a} {word} {b}?\n\nAssistant:"


def _value(a: int, word: str, b: int) -> int:
    return a * b if word == "times" else a + b


def _question(rng: random.Random) -> tuple[int, str, int]:
    return rng.randint(10, 99), rng.choice(list(OPERATIONS)), rng.randint(10, 99)


def answer_text(value: int) -> str:
    return f" The answer is {value}."


def tool_use(a: int, word: str, b: int) -> str:
    """A demonstration: the call, the calculator's answer (as the environment writes it), the final answer."""
    value = _value(a, word, b)
    return f" <calc> {a} {OPERATIONS[word]} {b} </calc> <result> {value} </result>{answer_text(value)}"


def make_questions(n: int, seed: int) -> list[dict[str, str]]:
    """Questions with their reference answers (the ``prompt``/``answer`` schema)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, word, b = _question(rng)
        rows.append({"prompt": _prompt(a, word, b), "answer": answer_text(_value(a, word, b))})
    return rows


def make_demonstrations(n: int, seed: int, tool_share: float = 0.35) -> list[dict[str, str]]:
    """SFT rows (rm-static's schema): ``tool_share`` of them use the calculator, the rest guess a number."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, word, b = _question(rng)
        guess = answer_text(rng.randint(100, 9999) if word == "times" else rng.randint(20, 198))
        chosen = tool_use(a, word, b) if rng.random() < tool_share else guess
        rows.append({"prompt": _prompt(a, word, b), "response": chosen, "chosen": chosen, "rejected": guess})
    return rows


def corpus() -> list[str]:
    """Texts the tiny tools tokenizer is trained on: every number the task writes, in its contexts."""
    rng = random.Random(0)
    texts = []
    for _ in range(3000):
        a, word, b = _question(rng)
        texts += [_prompt(a, word, b), tool_use(a, word, b)]
    return texts


def write_sample(out_dir: str | Path, seed: int = 1234) -> Path:
    """``tiny-tools-qa`` (questions with reference answers) and ``tiny-tools-sft`` (demonstrations)."""
    out = Path(out_dir)
    datasets = {
        "tiny-tools-qa": ("local/prompt-answer", lambda n, s: make_questions(n, s + 500)),
        "tiny-tools-sft": ("Dahoas/rm-static", lambda n, s: make_demonstrations(n, s + 600)),
    }
    for name, (fmt, rows_of) in datasets.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for offset, (split, count) in enumerate({"train": 1000, "test": 100}.items()):
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows_of(count, seed + offset))
        (folder / "dschat-dataset.json").write_text(json.dumps({"format": fmt, "source": "dschat tiny tools"}) + "\n")
    return out


def init_model(out_dir: str | Path, arch: str = "opt", vocab_size: int = 512, seed: int = 0) -> Path:
    """The tiny tools model (``model init-tiny --tools``): :data:`TOOLS_MODEL`'s shape, its tokenizer trained on the
    task's texts with the calculator's markup as whole tokens."""
    from .models import init_tiny

    return init_tiny(
        arch, out_dir, texts=corpus(), vocab_size=vocab_size, seed=seed, extra_tokens=TOOL_TOKENS, **TOOLS_MODEL
    )
