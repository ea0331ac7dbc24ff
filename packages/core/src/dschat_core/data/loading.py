"""Find a dataset (registered name or local path), recognise its format, and load its train/eval splits.

Local forms: JSON/JSONL files, Parquet files or folders (the hub's ``data/train-*.parquet`` layout included), and
``datasets`` ``save_to_disk`` folders. A folder written by ``dschat-core data`` records its format in
``dschat-dataset.json``; otherwise the format is recognised from the columns, never from the folder's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .formats import DatasetFormat

METADATA_FILE = "dschat-dataset.json"
EVAL_FRACTION = 0.1  # DeepSpeed-Chat cuts a dataset without an eval split 9:1


class DataError(UserError):
    """Bad data: names the dataset, and the row and column where there is one."""


@dataclass
class RawData:
    """A dataset's train and eval splits as ``datasets.Dataset`` objects, with the format that reads them."""

    source: str
    fmt: DatasetFormat
    train: Any  # datasets.Dataset (imported lazily)
    eval: Any


def _local_files(path: Path) -> tuple[str, dict[str, list[str]]] | None:
    """(builder, data_files by split) for JSON/Parquet files or folders of them."""
    if path.is_file():
        suffix = "".join(path.suffixes[-1:]).lower()
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix)
        return (builder, {"train": [str(path)]}) if builder else None
    for builder, pattern in (("parquet", "*.parquet"), ("json", "*.json*")):
        # Hidden folders hold tools' bookkeeping (huggingface_hub's .cache with partial downloads).
        files = sorted(
            p
            for p in path.rglob(pattern)
            if p.name != METADATA_FILE and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        files = [
            f
            for f in files
            if f.name not in ("dataset_infos.json", "dataset_info.json", "state.json", "dataset_dict.json")
        ]
        if files:
            splits: dict[str, list[str]] = {}
            for f in files:
                split = f.name.split("-")[0].split(".")[0]
                split = split if split in ("train", "test", "eval", "validation", "dev") else "train"
                splits.setdefault(split, []).append(str(f))
            return builder, splits
    return None


def detect_format(
    columns: list[str], formats: dict[str, DatasetFormat], source: str, lists: set[str] | frozenset[str] = frozenset()
) -> DatasetFormat:
    """The format a dataset's columns fit: the one that reads the most of them; on a tie, the one whose columns
    hold what it reads (message lists for a conversational format, text for the others), then a generic schema
    (its text kept as it is, never wrapped in a prompt template a second time), then the first registered.
    ``lists``: the columns that hold lists; a conversational format fits only where its message columns do."""
    fitting = [
        (len(fmt.columns), set(fmt.list_columns) == set(fmt.columns) & lists, fmt.generic, -order, fmt)
        for order, fmt in enumerate(formats.values())
        if set(fmt.columns) <= set(columns) and set(fmt.list_columns) <= lists
    ]
    if fitting:
        return max(fitting, key=lambda item: item[:4])[4]
    raise DataError(
        f"dataset {source}: columns {sorted(columns)} match no known format; fix: rename the columns "
        "to a known schema (e.g. prompt/chosen/rejected) or register a format plugin"
    )


def peek_format(source: str, formats: dict[str, DatasetFormat]) -> DatasetFormat | None:
    """A dataset's format where it can be told without loading it (before launch): a registered name, a folder's
    recorded format, the keys of a JSONL file's first row or a Parquet file's schema; None otherwise."""
    import json

    path = Path(source).expanduser()
    if not path.exists():
        return formats.get(source)
    meta = path / METADATA_FILE if path.is_dir() else None
    if meta and meta.exists():
        return formats.get(read_metadata(meta, source).get("format", ""))
    found = _local_files(path)
    if found is None:
        return None
    builder, files = found
    first = Path(sorted(f for split in files.values() for f in split)[0])
    try:
        if builder == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pq.read_schema(first)
            columns = schema.names
            lists = {f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)}
        elif first.suffix == ".jsonl":
            with open(first, encoding="utf-8") as handle:
                line = next((text for text in handle if text.strip()), "")
            row = json.loads(line) if line else {}
            columns, lists = list(row), {k for k, v in row.items() if isinstance(v, list)}
        else:
            return None
        return detect_format(columns, formats, source, lists) if columns else None
    except (OSError, ValueError, DataError):
        return None  # training reads it and says what is wrong, row by row


def load_raw(source: str, formats: dict[str, DatasetFormat], seed: int) -> RawData:
    """Load one ``data.data_path`` entry."""
    import datasets

    path = Path(source).expanduser()
    fmt: DatasetFormat | None = None
    if path.exists():
        meta = path / METADATA_FILE if path.is_dir() else None
        if meta and meta.exists():
            name = read_metadata(meta, source).get("format")
            if name not in formats:
                raise DataError(
                    f"dataset {source}: its metadata names format '{name}', which is not registered; "
                    "fix: install the plugin that provides it"
                )
            fmt = formats[name]
        loaded = _open_local(source, path)
    else:
        if source not in formats:
            known = ", ".join(sorted(formats))
            raise DataError(f"dataset '{source}' is neither a local path nor a known name; fix: use one of {known}")
        fmt = formats[source]
        loaded = _load_hub(source, fmt.hub_name or fmt.name, fmt.hub_config)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if "train" not in loaded:
        raise DataError(f"dataset {source}: no 'train' split (found {sorted(loaded)}); fix: name the split train")
    train = loaded["train"]
    if len(train) == 0:
        raise DataError(f"dataset {source}: the train split is empty; fix: check the files")
    fmt = fmt or detect_format(train.column_names, formats, source, list_columns(train))
    eval_name = next((s for s in (fmt.eval_split, "test", "eval", "validation", "dev") if s and s in loaded), None)
    if eval_name is not None:
        evaluation = loaded[eval_name]
    elif len(train) > 1:
        eval_rows = max(1, int(round(len(train) * EVAL_FRACTION)))
        parts = train.train_test_split(test_size=eval_rows, seed=seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = train.select([])
    return RawData(source, fmt, train, evaluation)


def list_columns(data) -> set[str]:
    """The columns of a ``datasets.Dataset`` that hold lists (of messages, for conversational formats)."""
    return {name for name, feature in data.features.items() if isinstance(feature, list) or hasattr(feature, "feature")}


def read_metadata(meta: Path, source: str) -> dict:
    """A dataset folder's ``dschat-dataset.json``: a JSON object naming its format."""
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"dataset {source}: {meta.name} is not readable JSON ({_first_line(exc)}); fix: write "
            '{"format": "NAME"} there, or delete it to recognise the format from the columns'
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("format"), str):
        raise DataError(
            f'dataset {source}: {meta.name} must be an object with a "format" name; fix: write '
            '{"format": "NAME"} there (see dschat-core data list), or delete it'
        )
    return data


def _open_local(source: str, path: Path, setting: str = "data.data_path"):
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return datasets.load_from_disk(str(path))
    found = _local_files(path)
    if found is None:
        raise DataError(
            f"dataset {source}: no JSON, JSONL or Parquet files and no save_to_disk folder there; "
            f"fix: point {setting} at the data"
        )
    builder, files = found
    if builder == "json":
        _check_utf8(source, [f for split in files.values() for f in split])
    loader_log = datasets.utils.logging.get_logger("datasets.packaged_modules.json.json")
    level = loader_log.level
    loader_log.setLevel(datasets.utils.logging.CRITICAL)  # its "Failed to load JSON" line: ours says where
    try:
        return datasets.load_dataset(builder, data_files=files)
    except Exception as exc:  # the builders raise many types for unreadable files
        where = _first_bad_json(sorted(f for split in files.values() for f in split)) if builder == "json" else ""
        raise DataError(
            f"dataset {source}: cannot read it as {builder}: {where or _first_line(exc)}; "
            "fix: check the files are valid " + builder.upper()
        ) from None
    finally:
        loader_log.setLevel(level)


def _first_bad_json(files: list[str]) -> str:
    """Where a JSON/JSONL file that the reader refused goes wrong: an empty file, or the first line of a .jsonl
    that is not a JSON object (the reader's own message names neither)."""
    import json

    for name in files:
        path = Path(name)
        if path.stat().st_size == 0 or not path.read_bytes().strip():
            return f"{name} is empty"
        if not name.endswith(".jsonl"):  # a JSON array (or a compressed file) is not read line by line
            continue
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    return f"{name} line {number} is not JSON ({exc})"
                if not isinstance(row, dict):
                    return f"{name} line {number} is not a JSON object"
    return ""


def load_text(source: str, config_name: str | None = None):
    """The train split of a plain-text dataset (stage 3's unsupervised PTX data): a local path, or a hub name
    with its config name as DeepSpeed-Chat's ``--unsupervised_dataset_name/_config_name``."""
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        loaded = _open_local(source, path, "data.unsupervised_dataset_name")
    else:
        loaded = _load_hub(source, source, config_name)
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if "train" not in loaded:
        raise DataError(f"dataset {source}: no 'train' split (found {sorted(loaded)}); fix: name the split train")
    if len(loaded["train"]) == 0:
        raise DataError(f"dataset {source}: the train split is empty; fix: check the files")
    return loaded["train"]


def _load_hub(source: str, name: str, config_name: str | None):
    """A dataset from the hub (or its local cache); without network, one line that says what to do."""
    import datasets

    try:
        return datasets.load_dataset(name, config_name)
    except Exception as exc:  # the hub client raises many types (ConnectionError, HTTP errors, offline mode)
        raise DataError(
            f"dataset {source}: cannot load it from the hub ({type(exc).__name__}: {_first_line(exc)}); "
            f"fix: on a machine with network, `dschat-core data download {name} -o DIR` (or `data import` "
            "a folder downloaded by hand), then point data.data_path at DIR"
        ) from None


def _check_utf8(source: str, files: list[str]) -> None:
    """The JSON reader would replace undecodable bytes silently: name the file and line instead."""
    for name in files:
        with open(name, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"dataset {source}: cannot read it as json: {name} line {number} is not UTF-8 "
                        f"(byte {exc.start}); fix: re-encode the file as UTF-8"
                    ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
