"""Conversational data through chat templates: formats told by their columns' types, stage 1's loss on every
assistant turn and nothing else (token by token), conversational pairs and prompts, bad conversations skipped
and counted or fatal, no template an exit-2 line before launch, `data inspect` showing what is trained, and
DeepSpeed-Chat's text datasets tokenized as before."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dschat_core.cli import cli
from dschat_core.config import load_config
from dschat_core.data.loading import DataError, load_raw, peek_format
from dschat_core.data.pipeline import load_stage_data
from dschat_core.errors import ConfigError
from dschat_core.launch import check_stage
from dschat_core.models import TINY_CHAT_TEMPLATE, init_tiny, train_tokenizer
from dschat_core.plugins import get_dataset_formats
from dschat_core.stages.sft import IGNORE_INDEX, SFTStage
from dschat_core.tiny_task import corpus, make_chat_rows, make_rows

from .test_pipeline import write_jsonl

SKY = [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "The sky is blue."}]
COW = [
    {"role": "user", "content": "What sound does the cow make?"},
    {"role": "assistant", "content": "The cow says moo."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(), vocab_size=300)


def config_for(tmp_path, data_path, *overrides):
    return load_config(
        None,
        [
            f"data.data_path={data_path}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.data_split=1,1,1",
            "sft.max_seq_len=96",
            "reward.max_seq_len=96",
            "dpo.max_seq_len=96",
            "ppo.max_prompt_seq_len=96",
            *overrides,
        ],
    )


def sft_labels(config, tokenizer, rows):
    stage = SFTStage(config)
    stage.tokenizer = tokenizer
    return stage.collate(rows)


def test_formats_are_told_by_their_columns_types(tmp_path):
    formats = get_dataset_formats()
    cases = {
        "messages": ({"messages": SKY}, "conversational/messages"),
        "pc": ({"prompt": SKY[:1], "completion": SKY[1:]}, "conversational/prompt-completion"),
        "pairs": ({"chosen": SKY, "rejected": [SKY[0], {"role": "assistant", "content": "No."}]}, None),
        "prompt-pairs": ({"prompt": SKY[:1], "chosen": SKY[1:], "rejected": SKY[1:]}, None),
        "qa": ({"prompt": SKY[:1], "answer": "The sky is blue."}, "conversational/prompt-answer"),
        "text-qa": ({"prompt": "Q", "answer": "A"}, "local/prompt-answer"),
        "text-pairs": ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "local/pairwise"),
    }
    expected = {"pairs": "conversational/preference", "prompt-pairs": "conversational/prompt-preference"}
    for name, (row, fmt) in cases.items():
        path = write_jsonl(tmp_path / name / "train.jsonl", [row, row])
        want = fmt or expected[name]
        assert load_raw(str(path.parent), formats, 1).fmt.name == want, name  # by the loaded features
        assert peek_format(str(path.parent), formats).name == want, name  # by the first row, before launch


def test_stage_1_trains_on_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    """A two-turn conversation (with a system line): the labels are the assistant turns' tokens, each with the
    EOS that closes it, token by token."""
    rows = [{"messages": SKY + COW, "system": "Be brief."}] * 8
    write_jsonl(tmp_path / "chat" / "train.jsonl", rows)
    write_jsonl(tmp_path / "chat" / "test.jsonl", rows[:2])
    config = config_for(tmp_path, f"[{tmp_path / 'chat'}]", f"data.chat_template={json.dumps(TINY_CHAT_TEMPLATE)}")
    data = load_stage_data(config, "sft", tokenizer, get_dataset_formats(), log=lambda text: None)
    batch = sft_labels(config, tokenizer, [data.train[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = tokenizer.decode(ids)
    assert text.startswith("<s>Be brief.\n\nHuman: What color is the sky?")
    trained = [int(i) for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    expected = tokenizer(" The sky is blue.</s> The cow says moo.</s>", add_special_tokens=False)["input_ids"]
    assert trained == expected
    untrained = tokenizer.decode([int(i) for i, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "Human:" in untrained and "Be brief." in untrained and "blue" not in untrained and "moo" not in untrained
    assert data.train[0]["prompt_len"] == len(tokenizer(text.split(" The sky")[0][3:])["input_ids"])
    # loss_on: all trains every token; the stage's prompt is the conversation up to its first answer
    every = sft_labels(
        config.model_copy(update={"sft": config.sft.model_copy(update={"loss_on": "all"})}), tokenizer, [data.train[0]]
    )
    assert (every["labels"][0] != IGNORE_INDEX).all()


def test_conversational_pairs_and_prompts(tmp_path, tokenizer):
    """Pairs that share their prompt turns, given either way, tokenize alike; stage 3's prompt is the
    conversation rendered with the generation prompt."""
    history = COW + SKY[:1]
    good, bad = {"role": "assistant", "content": "The sky is blue."}, {"role": "assistant", "content": "No."}
    two = {"prompt": history, "chosen": [good], "rejected": [bad]}
    whole = {"chosen": [*history, good], "rejected": [*history, bad]}
    template = f"data.chat_template={json.dumps(TINY_CHAT_TEMPLATE)}"
    got = {}
    for name, row in (("two", two), ("whole", whole)):
        write_jsonl(tmp_path / name / "train.jsonl", [row] * 6)
        config = config_for(tmp_path / name, f"[{tmp_path / name}]", template, "pipeline=dpo")
        got[name] = load_stage_data(config, "dpo", tokenizer, get_dataset_formats(), log=lambda text: None).train[0]
    assert got["two"] == got["whole"]
    row = got["two"]
    assert tokenizer.decode(row["chosen_input_ids"][row["prompt_len"] :]) == " The sky is blue.</s>"
    assert tokenizer.decode(row["rejected_input_ids"][row["prompt_len"] :]) == " No.</s>"
    assert tokenizer.decode(row["chosen_input_ids"][: row["prompt_len"]]).endswith(
        "moo.</s>\n\nHuman: What color is the sky?\n\nAssistant:"
    )
    qa = [{"prompt": history, "answer": "The sky is blue."}] * 6
    write_jsonl(tmp_path / "qa" / "train.jsonl", qa)
    config = config_for(tmp_path / "qa", f"[{tmp_path / 'qa'}]", template, "pipeline=rl", "data.data_split=0,0,1")
    prompt = load_stage_data(config, "ppo", tokenizer, get_dataset_formats(), log=lambda text: None).train[0]
    assert tokenizer.decode(prompt["prompt_input_ids"]).endswith("What color is the sky?\n\nAssistant:")
    assert prompt["reference"] == "The sky is blue."


@pytest.mark.parametrize("strict", [False, True])
def test_bad_conversations_are_skipped_and_counted_or_fatal(tmp_path, tokenizer, strict):
    raising = (
        "{%- for m in messages -%}{%- if loop.index0 % 2 == 0 and m['role'] != 'user' -%}"
        "{{ raise_exception('roles must alternate user/assistant') }}{%- endif -%}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}assistant:{%- endif -%}"
    )
    bad = [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}, SKY[1]]},
        {"messages": SKY[:1]},
        {"messages": [SKY[0], {"role": "assistant", "content": "  "}]},
        {"messages": [SKY[1], SKY[0], SKY[1]]},
    ]
    good = [{"messages": SKY}] * 10
    write_jsonl(tmp_path / "mixed" / "train.jsonl", good + bad)
    config = config_for(
        tmp_path, f"[{tmp_path / 'mixed'}]", "data.data_split=1,0,0", f"data.chat_template={json.dumps(raising)}"
    )
    if strict:
        with pytest.raises(DataError, match=r"dataset .*mixed, (train|eval) row \d+: .*fix: correct the row"):
            load_stage_data(
                config.model_copy(update={"data": config.data.model_copy(update={"strict": True})}),
                "sft",
                tokenizer,
                get_dataset_formats(),
                log=lambda text: None,
            )
        return
    said: list[str] = []
    data = load_stage_data(config, "sft", tokenizer, get_dataset_formats(), log=said.append)
    skipped = sum(r.skipped for r in data.report[str(tmp_path / "mixed")].values())
    assert skipped == 5 and len(data.train) + len(data.eval or []) == 10
    problems = " ".join(said)
    assert "skipped" in problems


def test_every_kind_of_bad_conversation_is_named(tmp_path, tokenizer):
    from dschat_core.data.conversations import CONVERSATIONAL_FORMATS, Renderer
    from dschat_core.data.formats import RowError
    from dschat_core.data.pipeline import conversation_row

    messages = next(f for f in CONVERSATIONAL_FORMATS if f.name == "conversational/messages")
    renderer = Renderer(tokenizer, TINY_CHAT_TEMPLATE)
    for row, said in (
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "wizard", "content": "hi"}, SKY[1]]}, "unknown role 'wizard'"),
        ({"messages": SKY[:1]}, "should end with an assistant turn"),
        ({"messages": [SKY[0], {"role": "assistant", "content": " "}]}, "is empty"),
        ({"messages": [SKY[1], SKY[0], SKY[1]]}, "does not answer a user turn"),
    ):
        with pytest.raises(RowError, match=said):
            conversation_row(messages, row, renderer, ("prompt", "chosen"))
    alternating = Renderer(tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RowError, match="cannot be rendered by the chat template .*roles must alternate"):
        conversation_row(messages, {"messages": SKY}, alternating, ("prompt", "chosen"))


def test_no_template_is_an_exit_2_line_before_launch(tmp_path):
    model = init_tiny("opt", tmp_path / "plain")
    config_file = model / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings.pop("chat_template", None)
    config_file.write_text(json.dumps(settings))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    chat = write_jsonl(tmp_path / "chat" / "train.jsonl", [{"messages": SKY}] * 4)
    config = config_for(tmp_path, f"[{chat.parent}]", f"sft.model_name_or_path={model}", "data.data_split=1,0,0")
    with pytest.raises(ConfigError) as caught:
        check_stage(config, "sft")
    assert caught.value.key == "data.chat_template"
    assert "has no chat template" in str(caught.value) and "set data.chat_template" in str(caught.value)
    assert "tokenizer_config.json's chat_template" in str(caught.value)
    check_stage(
        config_for(
            tmp_path,
            f"[{chat.parent}]",
            f"sft.model_name_or_path={model}",
            "data.data_split=1,0,0",
            f"data.chat_template={json.dumps(TINY_CHAT_TEMPLATE)}",
        ),
        "sft",
    )
    result = CliRunner().invoke(cli, ["data", "inspect", str(chat.parent), "--tokenizer", str(model)])
    assert result.exit_code == 2, result.output
    assert "has no chat template; fix:" in result.output and "data.chat_template" in result.output


def test_data_inspect_shows_the_detected_format_and_the_trained_tokens(tmp_path):
    model = init_tiny("opt", tmp_path / "tiny")  # the tiny models carry a chat template
    chat = write_jsonl(tmp_path / "chat" / "train.jsonl", [{"messages": SKY + COW}] * 10)
    result = CliRunner().invoke(
        cli, ["data", "inspect", str(chat), "--tokenizer", str(model), "--set", "data.data_split=1,0,0"]
    )
    assert result.exit_code == 0, result.output
    assert "format conversational/messages" in result.output
    rendered = result.output.split("trained tokens between [[ ]]):\n", 1)[1]
    assert "Human: What color is the sky?\n\nAssistant:[[ The sky is blue.</s>]]" in rendered
    assert "Human: What sound does the cow make?\n\nAssistant:[[ The cow says moo.</s>]]" in rendered
    assert rendered.count("[[") == 2


def test_deepspeed_chat_datasets_tokenize_as_before(tmp_path, tokenizer):
    """A tokenizer with a chat template reads DeepSpeed-Chat's text datasets exactly as one without: the same
    tokens in every stage, and stage 1's default still trains on every token (DeepSpeed-Chat's loss)."""
    folder = tmp_path / "prefs"
    write_jsonl(folder / "train.jsonl", make_rows(60, 1))
    plain = train_tokenizer(corpus(), vocab_size=300)
    plain.chat_template = None
    templated = train_tokenizer(corpus(), vocab_size=300)
    assert templated.chat_template == TINY_CHAT_TEMPLATE
    for stage in ("sft", "reward", "ppo"):
        tokens = []
        for name, tok in (("plain", plain), ("templated", templated)):
            config = config_for(tmp_path / name, f"[{folder}]")
            data = load_stage_data(config, stage, tok, get_dataset_formats(), log=lambda text: None)
            tokens.append(data.train.to_list())
        assert tokens[0] == tokens[1], stage
    config = config_for(tmp_path / "plain", f"[{folder}]")
    rows = load_stage_data(config, "sft", plain, get_dataset_formats(), log=lambda text: None).train
    assert "loss_mask" not in rows.column_names
    batch = sft_labels(config, plain, [rows[0]])
    assert (batch["labels"] != IGNORE_INDEX).sum() == batch["attention_mask"].sum()


def test_the_tiny_chat_task_renders_like_the_text_task(tokenizer):
    """The tiny template writes DeepSpeed-Chat's turns: a one-turn conversation of the tiny task is the text
    task's row, token for token (so the tiny judge reads both)."""
    from dschat_core.data.conversations import Conversation, Renderer

    text = make_rows(20, 7)
    chat = make_chat_rows(20, 7)
    renderer = Renderer(tokenizer, TINY_CHAT_TEMPLATE)
    single = [(t, c) for t, c in zip(text, chat, strict=True) if len(c["prompt"]) == 1]
    assert 0 < len(single) < 20  # both kinds are there: one turn, and with an earlier exchange
    for t, c in single:
        assert renderer.prompt(c["prompt"]) == t["prompt"]
        assert renderer.triple(Conversation(c["prompt"], c["chosen"]))[1] == t["chosen"]
