"""Per-stage data: DeepSpeed-Chat's ``data_split`` phases, tokenization, and a content-keyed cache.

The same end-of-text handling in every stage: a text ends with the tokenizer's EOS token (DeepSpeed-Chat trains
the reward model on a literal ``<|endoftext|>`` string but reads rewards at EOS in stage 3).
The cache key covers the datasets' content fingerprints, the tokenizer, the settings and this code's version;
rank 0 builds while the other ranks wait, then every rank loads (works on shared filesystems).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DATA_PHASES, RunConfig
from .conversations import Conversation, Renderer
from .formats import DatasetFormat, RowError
from .loading import DataError, RawData, load_raw, load_text

#: How to give conversational data a chat template (the exit-2 line where neither is there).
TEMPLATE_FIX = (
    "use a tokenizer that has a chat template (tokenizer_config.json's chat_template), or set data.chat_template "
    "to a Jinja template"
)
CACHE_VERSION = 3  # 2: rows are malformed per stage; stage 3 keeps references and rows. 3: DeepSpeed-Chat's cuts
ROW_COLUMNS = ("prompt", "chosen", "rejected")


def phase_indices(size: int, shares: tuple[float, ...], phase: int, seed: int) -> np.ndarray:
    """DeepSpeed-Chat's split (``get_raw_dataset_split_index``): one seeded permutation; each phase gets
    round(share × size) rows, and what rounding leaves over or short moves every cut after the first, so the first
    phase absorbs it. Phase ``phase`` (0-based) gets its chunk, disjoint from the others."""
    order = np.arange(size, dtype=np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64)
    np.random.RandomState(seed).shuffle(order)
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + int(round(share * float(size))))
    diff = bounds[-1] - size
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return order[bounds[phase] : bounds[phase + 1]].astype(np.int64)


@dataclass
class SplitReport:
    rows: int = 0
    skipped: int = 0
    too_long: int = 0
    first_problem: str = ""


@dataclass
class StageData:
    """Tokenized train and eval datasets for one stage, and what was dropped on the way."""

    train: Any
    eval: Any
    report: dict[str, dict[str, SplitReport]] = field(default_factory=dict)
    cache_path: str = ""
    from_cache: bool = False


#: What each stage reads of a (prompt, chosen, rejected) triple: a row is malformed only where these are.
STAGE_NEEDS = {
    "sft": ("prompt", "chosen"),
    "reward": ("prompt", "chosen", "rejected"),
    "dpo": ("prompt", "chosen", "rejected"),
    "ppo": ("prompt",),
}
_ABSENT = "\x00dschat: a column this stage does not read\x00"


def map_row(fmt: DatasetFormat, row, needs: tuple[str, ...]) -> tuple[str, str | None, str | None]:
    """The row's triple as far as a stage reads it. A column the stage does not read may be bad (an SFT row with
    no usable rejected answer is still an SFT row): it is stood in for, and its slot is None."""
    row, errors = dict(row), list[RowError]()
    for _ in range(4):
        try:
            triple = list(fmt.triple(row, check_pair=False))
            break
        except RowError as exc:
            if row.get(exc.column) == _ABSENT:  # not even a stand-in reads: the row is unusable
                raise errors[0] from None
            errors.append(exc)
            row[exc.column] = _ABSENT
    else:
        raise errors[0]
    slots = dict(zip(("prompt", "chosen", "rejected"), triple, strict=True))
    for slot, value in slots.items():
        if value is not None and _ABSENT in value:
            if slot in needs:
                raise errors[0]
            slots[slot] = None
    if "rejected" in needs:
        if slots["rejected"] is None:
            raise RowError("rejected", "is missing")
        if slots["chosen"] == slots["rejected"]:
            raise RowError("chosen", "is identical to 'rejected'")
    if "chosen" in needs and slots["chosen"] is None:
        raise RowError("chosen", "is missing")
    return slots["prompt"], slots["chosen"], slots["rejected"]  # type: ignore[return-value]


def conversation_row(
    fmt: DatasetFormat, row, renderer: Renderer, needs: tuple[str, ...]
) -> tuple[str, str | None, str | None, list[tuple[int, int]] | None]:
    """A conversational row as the texts a stage reads, rendered through the chat template, and for a multi-turn
    dialogue in stage 1 the character spans of every assistant turn (None where the answer is all there is)."""
    assert fmt.to_conversation is not None
    conversation: Conversation = fmt.to_conversation(row)
    if "chosen" in needs and "rejected" not in needs and conversation.dialogue is not None:
        opening, rest, spans = renderer.dialogue(conversation.dialogue)
        return opening, rest, None, spans
    if "chosen" not in needs:
        conversation = Conversation(conversation.prompt, None)
    elif "rejected" not in needs:
        conversation = Conversation(conversation.prompt, conversation.chosen)
    elif conversation.rejected is None:
        raise RowError("rejected", "is missing")
    prompt, chosen, rejected = renderer.triple(conversation)
    if "rejected" in needs and chosen == rejected:
        raise RowError("chosen", "is identical to 'rejected'")
    return prompt, chosen, rejected, None


def rows_to_triples(
    raw_split,
    fmt: DatasetFormat,
    indices,
    source: str,
    split: str,
    strict: bool,
    stage: str,
    reference_checks: Mapping[str, Callable[[str | None], str | None]] | None = None,
    renderer: Renderer | None = None,
    spans: bool = False,
) -> tuple[dict[str, list], SplitReport]:
    """Map selected rows to what ``stage`` reads of (prompt, chosen, rejected), and for stage 3 each row's
    reference answer and the row itself (JSON) for reward functions; malformed rows are skipped and counted, or
    fatal in strict mode, with the dataset, row and column named. In stage 3 a reference that a configured
    reward function cannot use (``reference_checks``) makes the row malformed too. A conversational format's
    rows are rendered by ``renderer``; with ``spans`` (stage 1 where some data is conversational) each row also
    gets the character spans its loss covers."""
    from ..rewards import reference_problem

    needs = STAGE_NEEDS[stage]
    if fmt.conversational and renderer is None:
        raise DataError(f"dataset {source}: {fmt.name} rows need a chat template to become text; fix: {TEMPLATE_FIX}")
    names = [*ROW_COLUMNS, *(("reference", "row") if stage == "ppo" else ()), *(("spans",) if spans else ())]
    columns: dict[str, list] = {c: [] for c in names}
    report = SplitReport()
    if "rejected" in needs and not fmt.pairwise:
        raise DataError(
            f"dataset {source}: {fmt.name} has no rejected answers, so it cannot train stage {stage}; "
            "fix: list it under data.sft_only_data_path"
        )
    for index in indices:
        index = int(index)
        try:
            row = raw_split[index]
        except Exception as exc:  # undecodable rows surface here
            problem, row = f"cannot be decoded ({exc})", None
        else:
            problem = ""
        if row is not None:
            try:
                extra: dict[str, Any] = {}
                loss_spans = None
                if fmt.conversational:
                    assert renderer is not None
                    prompt, chosen, rejected, loss_spans = conversation_row(fmt, row, renderer, needs)
                else:
                    prompt, chosen, rejected = map_row(fmt, row, needs)
                if spans:
                    assert renderer is not None
                    # one answer (not a multi-turn dialogue): its text and the EOS every stage appends to it
                    loss_spans = loss_spans or [(len(prompt), len(prompt) + len(chosen or "") + len(renderer.eos))]
                    extra["spans"] = [list(span) for span in loss_spans]
                if stage == "ppo":
                    reference = _reference(fmt, row)
                    unusable = reference_problem(reference, reference_checks or {})
                    if unusable:
                        raise RowError("answer", unusable)
                    extra.update(
                        reference=reference,
                        row=json.dumps({**row, "reference": reference}, default=str, ensure_ascii=False),
                    )
            except RowError as exc:
                problem = str(exc)
        if problem:
            where = f"dataset {source}, {split} row {index}: {problem}"
            if strict:
                raise DataError(f"{where}; fix: correct the row, or set data.strict=false to skip bad rows")
            report.skipped += 1
            report.first_problem = report.first_problem or where
            continue
        for name, value in {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}.items():
            columns[name].append(value)
    report.rows = len(columns["prompt"])
    return columns, report


def _reference(fmt: DatasetFormat, row) -> str | None:
    if fmt.to_reference is None:
        return None
    try:
        return fmt.to_reference(row)
    except RowError:
        return None  # a prompt without a usable reference is still a prompt; functions that need one say so


# -- tokenization per stage -----------------------------------------------------------------------------------


def stage_lengths(config: RunConfig, stage: str) -> dict[str, Any]:
    """The settings that change the tokenized data (part of the cache key)."""
    if stage == "sft":
        return {"max_seq_len": config.sft.max_seq_len, "loss_on": config.sft.loss_on}
    if stage == "reward":
        return {"max_seq_len": config.reward.max_seq_len}
    if stage == "dpo":
        return {"max_seq_len": config.dpo.max_seq_len}
    return {"max_prompt_seq_len": config.ppo.max_prompt_seq_len, "reference_checks": sorted(checks_of(config))}


def checks_of(config: RunConfig) -> dict[str, Callable[[str | None], str | None]]:
    """The reference checks of stage 3's configured reward functions (the registry's, plugins included)."""
    from ..plugins import get_reward_functions
    from ..rewards import reference_checks

    return reference_checks(config.ppo.reward_functions, get_reward_functions()) if config.ppo.reward_functions else {}


def tokenize_function(stage: str, tokenizer, settings: dict[str, Any]) -> Callable[[dict], dict]:
    eos = tokenizer.eos_token or ""

    def encode(texts: list[str], max_len: int) -> list[list[int]]:
        return tokenizer(texts, max_length=max_len, truncation=True)["input_ids"]

    if stage == "sft":

        def sft(batch: dict) -> dict:
            texts = [p + c + eos for p, c in zip(batch["prompt"], batch["chosen"], strict=True)]
            prompt_lens = [len(x) for x in encode(batch["prompt"], settings["max_seq_len"])]
            if "spans" not in batch:
                return {"input_ids": encode(texts, settings["max_seq_len"]), "prompt_len": prompt_lens}
            encoded = tokenizer(texts, max_length=settings["max_seq_len"], truncation=True, return_offsets_mapping=True)
            masks = [
                token_mask(offsets, spans)
                for offsets, spans in zip(encoded["offset_mapping"], batch["spans"], strict=True)
            ]
            return {"input_ids": encoded["input_ids"], "prompt_len": prompt_lens, "loss_mask": masks}

        return sft
    if stage == "dpo":

        def pairs(batch: dict) -> dict:
            n = settings["max_seq_len"]
            chosen = encode([p + c + eos for p, c in zip(batch["prompt"], batch["chosen"], strict=True)], n)
            rejected = encode([p + r + eos for p, r in zip(batch["prompt"], batch["rejected"], strict=True)], n)
            prompt_lens = [len(x) for x in encode(batch["prompt"], n)]
            return {"chosen_input_ids": chosen, "rejected_input_ids": rejected, "prompt_len": prompt_lens}

        return pairs
    if stage == "reward":

        def reward(batch: dict) -> dict:
            n = settings["max_seq_len"]
            chosen = encode([p + c + eos for p, c in zip(batch["prompt"], batch["chosen"], strict=True)], n)
            rejected = encode([p + r + eos for p, r in zip(batch["prompt"], batch["rejected"], strict=True)], n)
            return {"chosen_input_ids": chosen, "rejected_input_ids": rejected}

        return reward

    def prompts(batch: dict) -> dict:
        ids = tokenizer(batch["prompt"])["input_ids"]
        return {"prompt_input_ids": ids, "prompt_len": [len(x) for x in ids]}

    return prompts


def token_mask(offsets: list[tuple[int, int]], spans: list[list[int]]) -> list[int]:
    """1 for each token that starts inside one of the character ``spans`` (the assistant turns), else 0; tokens
    the tokenizer adds with no text (a BOS) are 0."""
    return [int(end > start and any(a <= start < b for a, b in spans)) for start, end in offsets]


# -- building and caching -----------------------------------------------------------------------------------


def cache_key(config: RunConfig, stage: str, sources: list[RawData], sft_only: list[RawData], tokenizer) -> str:
    from datasets.fingerprint import Hasher

    payload = {
        "version": CACHE_VERSION,
        "stage": stage,
        "split": config.data.data_split,
        "seed": config.seed,
        "strict": config.data.strict,
        "settings": stage_lengths(config, stage),
        "tokenizer": Hasher.hash(tokenizer),
        "eos": tokenizer.eos_token,
        "sources": [(r.source, r.fmt.name, r.train._fingerprint, r.eval._fingerprint) for r in sources],
        "sft_only": [(r.source, r.fmt.name, r.train._fingerprint, r.eval._fingerprint) for r in sft_only],
    }
    if config.data.chat_template is not None:  # (the tokenizer's own template is in its hash)
        payload["chat_template"] = config.data.chat_template
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _build(
    config: RunConfig,
    stage: str,
    sources: list[RawData],
    sft_only: list[RawData],
    tokenizer,
    log: Callable[[str], None],
) -> StageData:
    import datasets

    phase = DATA_PHASES[stage]
    shares = config.data.split_shares
    settings = stage_lengths(config, stage)
    checks = checks_of(config) if stage == "ppo" else {}
    encode = tokenize_function(stage, tokenizer, settings)
    renderer = make_renderer(config, tokenizer, [*sources, *(sft_only if stage == "sft" else [])])
    spans = stage == "sft" and renderer is not None  # stage 1 masks by spans wherever some data is conversational
    report: dict[str, dict[str, SplitReport]] = {}
    parts: dict[str, list] = {"train": [], "eval": []}
    jobs = [(raw, shares, phase) for raw in sources]
    if stage == "sft":
        jobs += [(raw, (1.0, 0.0, 0.0), 0) for raw in sft_only]
    for raw, split_shares, split_phase in jobs:
        for split, data in (("train", raw.train), ("eval", raw.eval)):
            indices = phase_indices(len(data), split_shares, split_phase, config.seed)
            columns, split_report = rows_to_triples(
                data, raw.fmt, indices, raw.source, split, config.data.strict, stage, checks, renderer, spans
            )
            report.setdefault(raw.source, {})[split] = split_report
            if split_report.skipped:
                log(
                    f"warning: dataset {raw.source} ({split}): skipped {split_report.skipped} malformed rows; "
                    f"first: {split_report.first_problem}"
                )
            if not columns["prompt"]:
                continue
            tokenized = datasets.Dataset.from_dict(columns).map(
                encode,
                batched=True,
                num_proc=config.data.num_proc if len(indices) > 1000 else None,
                remove_columns=[*ROW_COLUMNS, *(["spans"] if spans else [])],  # stage 3 keeps reference and row
                desc=f"tokenizing {stage} {split}",
            )
            if stage == "ppo":
                limit = settings["max_prompt_seq_len"]
                kept = tokenized.filter(
                    lambda lens, limit=limit: [n <= limit for n in lens], input_columns="prompt_len", batched=True
                )
                split_report.too_long = len(tokenized) - len(kept)
                if split_report.too_long:
                    log(
                        f"dataset {raw.source} ({split}): dropped {split_report.too_long} prompts longer than "
                        f"ppo.max_prompt_seq_len={limit} tokens"
                    )
                tokenized = kept
            parts[split].append(tokenized)
    result: dict[str, Any] = {}
    for split in ("train", "eval"):
        if not parts[split] or sum(len(p) for p in parts[split]) == 0:
            if split == "eval":
                result[split] = None
                continue
            raise DataError(
                f"stage {stage}: no {split} rows left from {', '.join(r.source for r in sources)} "
                f"with data_split {config.data.data_split}; fix: use more data or a larger share"
            )
        result[split] = datasets.concatenate_datasets(parts[split]).shuffle(seed=config.seed).flatten_indices()
    return StageData(result["train"], result["eval"], report)


def make_renderer(config: RunConfig, tokenizer, sources: list[RawData]) -> Renderer | None:
    """The chat-template renderer where some of ``sources`` is conversational (None where none is): with
    ``data.chat_template`` if set, else the tokenizer's own; neither is a DataError naming both fixes."""
    conversational = [raw.source for raw in sources if raw.fmt.conversational]
    if not conversational:
        return None
    template = config.data.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(
            f"dataset {conversational[0]} is conversational and the tokenizer has no chat template; fix: {TEMPLATE_FIX}"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"dataset {conversational[0]} is conversational: its loss masks need a fast (Rust) tokenizer's offsets; "
            "fix: use the model's tokenizer.json (AutoTokenizer with use_fast=True)"
        )
    return Renderer(tokenizer, config.data.chat_template)


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def load_stage_data(
    config: RunConfig,
    stage: str,
    tokenizer,
    formats: dict[str, DatasetFormat],
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> StageData:
    """Tokenized data for ``stage``: from the cache when the key matches, else built (by global rank 0 only
    when distributed) and cached."""
    import datasets

    dist = _dist()
    rank = dist.get_rank() if dist else 0
    sources = [load_raw(s, formats, config.seed) for s in config.data.data_path]
    sft_only = [load_raw(s, formats, config.seed) for s in config.data.sft_only_data_path] if stage == "sft" else []
    key = cache_key(config, stage, sources, sft_only, tokenizer)
    path = _cache_root(config) / f"{stage}-{key}"

    def build() -> StageData:
        data = _build(config, stage, sources, sft_only, tokenizer, log)
        _save(data, path)
        return data

    built = _build_on_rank0(path, build, f"stage {stage}")
    if built is not None:
        built.cache_path = str(path)
        _log_report(built, stage, log)
        return built
    loaded = datasets.load_from_disk(str(path))
    meta = json.loads((path / "done.json").read_text())
    data = StageData(
        loaded["train"],
        loaded.get("eval"),
        {s: {k: SplitReport(**v) for k, v in splits.items()} for s, splits in meta["report"].items()},
        cache_path=str(path),
        from_cache=True,
    )
    if rank == 0:
        _log_report(data, stage, log)
    return data


def _cache_root(config: RunConfig) -> Path:
    return Path(config.data.cache_dir or Path.home() / ".cache" / "dschat")


def _build_on_rank0(path: Path, build: Callable[[], Any], what: str) -> Any:
    """Run ``build`` (which writes ``path``) on global rank 0 unless ``path`` is complete already; the other ranks
    wait and then read the folder. A failure on rank 0 fails every rank."""
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    built, error = None, None
    if rank == 0 and not (path / "done.json").exists():
        try:
            built = build()
        except BaseException as exc:  # tell the other ranks before raising
            error = exc
    if dist:
        flag = [error is None]
        dist.broadcast_object_list(flag, src=0)
        if not flag[0] and error is None:
            raise DataError(f"{what}: rank 0 failed to prepare the data (see its log)")
    if error is not None:
        raise error
    return built


def _group_texts(block: int) -> Callable[[dict], dict]:
    """Concatenate tokenized texts and cut blocks of ``block`` tokens; the remainder is dropped (DeepSpeed-Chat)."""

    def group(batch: dict) -> dict:
        ids = [token for seq in batch["input_ids"] for token in seq]
        usable = len(ids) // block * block
        return {"input_ids": [ids[i : i + block] for i in range(0, usable, block)]}

    return group


def load_ptx_data(
    config: RunConfig, tokenizer, log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)
):
    """Stage 3's unsupervised data: ``data.unsupervised_dataset_name`` tokenized (the ``text`` column, else the
    first), each text ending in EOS, cut into blocks of max_prompt_seq_len + max_answer_seq_len tokens; cached
    like the stage data."""
    import datasets
    from datasets.fingerprint import Hasher

    source = config.data.unsupervised_dataset_name
    assert source is not None
    raw = load_text(source, config.data.unsupervised_dataset_config_name)
    block = config.ppo.max_prompt_seq_len + config.ppo.max_answer_seq_len
    payload = {
        "version": CACHE_VERSION,
        "source": source,
        "config": config.data.unsupervised_dataset_config_name,
        "fingerprint": raw._fingerprint,
        "tokenizer": Hasher.hash(tokenizer),
        "block": block,
    }
    path = _cache_root(config) / f"ptx-{hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]}"
    column = "text" if "text" in raw.column_names else raw.column_names[0]
    eos = tokenizer.eos_token or ""

    def build():
        tokenized = raw.map(
            lambda b: {"input_ids": tokenizer([str(t) + eos for t in b[column]])["input_ids"]},
            batched=True,
            remove_columns=raw.column_names,
            desc="tokenizing ptx",
            num_proc=config.data.num_proc if len(raw) > 1000 else None,
        )
        # One pass over everything, so no text's tail is dropped at a map-batch boundary.
        blocks = tokenized.map(_group_texts(block), batched=True, batch_size=None, desc="grouping ptx")
        if len(blocks) == 0:
            raise DataError(
                f"dataset {source}: fewer than {block} tokens in all, not one PTX block; fix: use more "
                "text or shorter ppo.max_prompt_seq_len + ppo.max_answer_seq_len"
            )
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        blocks.save_to_disk(str(tmp))
        (tmp / "done.json").write_text(json.dumps({"blocks": len(blocks), "block": block}))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return blocks

    blocks = _build_on_rank0(path, build, "ptx data") or datasets.load_from_disk(str(path))
    dist = _dist()
    if not dist or dist.get_rank() == 0:
        log(f"ptx data: {len(blocks)} blocks of {block} tokens from {source} ({path})")
    return blocks


def _save(data: StageData, path: Path) -> None:
    from dataclasses import asdict

    import datasets

    splits = {"train": data.train}
    if data.eval is not None:
        splits["eval"] = data.eval
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    datasets.DatasetDict(splits).save_to_disk(str(tmp))
    meta = {"report": {s: {k: asdict(v) for k, v in splits_.items()} for s, splits_ in data.report.items()}}
    (tmp / "done.json").write_text(json.dumps(meta))
    if path.exists():  # a stale half-written folder from a killed run
        shutil.rmtree(path)
    os.replace(tmp, path)


def _log_report(data: StageData, stage: str, log: Callable[[str], None]) -> None:
    where = "loaded from cache" if data.from_cache else "built and cached"
    eval_rows = len(data.eval) if data.eval is not None else 0
    log(f"data for stage {stage}: {len(data.train)} train / {eval_rows} eval rows ({where}: {data.cache_path})")
