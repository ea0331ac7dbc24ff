"""Downloads from the Hugging Face hub (or a mirror: ``HF_ENDPOINT``) into plain folders that training reads.

huggingface_hub does the HTTP (resumable: a dropped connection leaves a partial file that the next attempt continues
with a Range request); this module picks the files, retries, and writes the metadata our loaders read.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .data.formats import DatasetFormat
from .data.loading import METADATA_FILE, DataError, RawData, detect_format, list_columns, load_raw
from .errors import BackendError, UserError

MODEL_METADATA_FILE = "dschat-model.json"
#: What training needs from a model repository (weights are chosen separately).
MODEL_SUPPORT_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
]
DATA_FILES = ["*.parquet", "*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz", "*.arrow", "README.md"]

T = TypeVar("T")


def with_retries(
    action: Callable[[], T],
    what: str,
    attempts: int = 5,
    first_wait: float = 1.0,
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> T:
    """Run ``action``; on a network error wait (1, 2, 4 … s) and try again. Missing repositories and files are
    not retried: they are the user's to fix."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    for attempt in range(1, attempts + 1):
        try:
            return action()
        except GatedRepoError:  # before its base class, RepositoryNotFoundError
            raise UserError(
                f"{what}: the repository is gated; fix: accept its terms on the hub and log in "
                "(`hf auth login`, or HF_TOKEN from your secret store)"
            ) from None
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            raise UserError(
                f"{what}: not found on {_endpoint()} ({type(exc).__name__}); fix: check the name, "
                "or set HF_ENDPOINT to your mirror"
            ) from None
        except Exception as exc:  # network errors come as several types (httpx, OSError, hub HTTP errors)
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise UserError(
                    f"{what}: {_first_line(exc)}; fix: check the name and your access (HF_TOKEN, HF_ENDPOINT)"
                ) from None
            if attempt == attempts and status is None:  # no answer at all: offline, a firewall, a wrong endpoint
                raise UserError(
                    f"{what}: cannot reach {_endpoint()} after {attempts} attempt(s) ({_first_line(exc)}); fix: "
                    "check the network or set HF_ENDPOINT to a mirror you can reach; or fetch the files on another "
                    "machine and bring them here (`dschat-core data import FOLDER -o OUT` for a dataset, a model "
                    "folder as it is)"
                ) from None
            if attempt == attempts:
                raise BackendError(f"{what}: failed after {attempts} attempts: {_first_line(exc)}") from None
            wait = first_wait * 2 ** (attempt - 1)
            log(f"{what}: attempt {attempt} failed ({_first_line(exc)}); retrying in {wait:.0f}s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def select_model_files(files: list[str]) -> list[str]:
    """Config, tokenizer files and one set of PyTorch weights (safetensors when the repository has them, else
    pytorch_model*.bin): no Flax, TensorFlow, ONNX or other copies."""

    def matches(name: str, patterns: list[str]) -> bool:
        return "/" not in name and any(fnmatch.fnmatch(name, p) for p in patterns)

    support = [f for f in files if matches(f, MODEL_SUPPORT_FILES)]
    safetensors = [f for f in files if matches(f, ["*.safetensors", "*.safetensors.index.json"])]
    weights = safetensors or [f for f in files if matches(f, ["pytorch_model*.bin", "pytorch_model.bin.index.json"])]
    return sorted(set(support + weights))


def download_model(name: str, output: str | Path, revision: str | None = None, attempts: int = 5) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    info = with_retries(lambda: HfApi().model_info(name, revision=revision), f"model {name}", attempts)
    files = [s.rfilename for s in info.siblings or []]
    chosen = select_model_files(files)
    if not any(f.endswith((".safetensors", ".bin")) for f in chosen):
        raise UserError(
            f"model {name}: no safetensors or pytorch_model.bin weights in the repository "
            f"({len(files)} files); fix: pick a repository with PyTorch weights"
        )
    out = Path(output)
    with_retries(
        lambda: snapshot_download(name, revision=info.sha, local_dir=out, allow_patterns=chosen),
        f"model {name}",
        attempts,
    )
    (out / MODEL_METADATA_FILE).write_text(
        json.dumps({"source": name, "revision": info.sha, "files": chosen, "endpoint": _endpoint()}, indent=2) + "\n"
    )
    return out


def _write_dataset_metadata(out: Path, fmt: DatasetFormat, extra: dict[str, Any]) -> None:
    (out / METADATA_FILE).write_text(json.dumps({"format": fmt.name, **extra}, indent=2) + "\n")


def download_dataset(
    name: str,
    output: str | Path,
    formats: dict[str, DatasetFormat],
    revision: str | None = None,
    attempts: int = 5,
    seed: int = 1234,
) -> RawData:
    """A dataset's data files from the hub (a registered name, or any repository in a known schema), with
    ``dschat-dataset.json`` recording the format and the source; returns it loaded, as training will."""
    from huggingface_hub import HfApi, snapshot_download

    fmt = formats.get(name)
    repo = (fmt.hub_name or fmt.name) if fmt else name
    info = with_retries(lambda: HfApi().dataset_info(repo, revision=revision), f"dataset {repo}", attempts)
    out = Path(output)
    with_retries(
        lambda: snapshot_download(
            repo, repo_type="dataset", revision=info.sha, local_dir=out, allow_patterns=DATA_FILES
        ),
        f"dataset {repo}",
        attempts,
    )
    shutil.rmtree(out / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping, done with
    meta = {"source": name, "revision": info.sha, "endpoint": _endpoint()}
    if fmt is None:  # any repository in a known schema: its columns say which
        fmt = load_raw(str(out), formats, seed).fmt
    _write_dataset_metadata(out, fmt, meta)
    return load_raw(str(out), formats, seed)  # as training will read it: through the metadata


def import_dataset(
    source: str | Path,
    output: str | Path,
    formats: dict[str, DatasetFormat],
    format_name: str | None = None,
    seed: int = 1234,
) -> RawData:
    """The seed's manual path, done once: a folder of files fetched by hand (``dataset_infos.json``,
    ``data/train-*.parquet``, ``data/test-*.parquet``, or JSON/JSONL) copied into ``output`` with its format
    recorded, after checking that it loads."""
    src, out = Path(source), Path(output)
    if not src.is_dir():
        raise DataError(f"dataset {source}: not a folder; fix: point at the folder of downloaded files")
    if format_name is not None and format_name not in formats:
        raise DataError(f"format '{format_name}' is not registered; fix: use one of {', '.join(sorted(formats))}")
    raw = load_raw(str(src), formats, seed)  # validates files and schema before anything is written
    fmt = formats[format_name] if format_name else raw.fmt
    if format_name and not set(fmt.columns) <= set(raw.train.column_names):
        detect_format(
            raw.train.column_names, {fmt.name: fmt}, str(source), list_columns(raw.train)
        )  # raises naming the columns
    copied = 0
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if (
            path.is_file()
            and not any(part.startswith(".") for part in relative.parts)
            and relative.name != METADATA_FILE
            and any(fnmatch.fnmatch(relative.name, p) for p in [*DATA_FILES, "dataset_infos.json"])
        ):
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied += 1
    if not copied:
        raise DataError(f"dataset {source}: no data files to import; fix: point at the downloaded files")
    _write_dataset_metadata(out, fmt, {"source": str(source), "imported": True})
    return load_raw(str(out), formats, seed)
