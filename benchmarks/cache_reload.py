"""Tokenized-data cache: build 50k rows once, then reload unchanged, then after changing one row.

    python benchmarks/cache_reload.py [--rows 50000] [--out benchmarks/results]

Writes cache_reload.json and cache_reload.md. The claim it checks: an unchanged rerun loads from the cache in
under a second, and a one-row change is noticed (rebuilt, not reused).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from dschat_core.config import load_config
from dschat_core.data.pipeline import load_stage_data
from dschat_core.models import train_tokenizer
from dschat_core.plugins import get_dataset_formats
from dschat_core.tiny_task import corpus, make_rows


def timed(action):
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    quiet = lambda text: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        rows = make_rows(args.rows, 7)
        write = lambda: (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
        write()
        tokenizer = train_tokenizer(corpus())
        config = load_config(None, [f"data.data_path=[{folder}]", f"data.cache_dir={tmp}/cache", "data.num_proc=2"])
        formats = get_dataset_formats()
        first, build_s = timed(lambda: load_stage_data(config, "sft", tokenizer, formats, log=quiet))
        again, reload_s = timed(lambda: load_stage_data(config, "sft", tokenizer, formats, log=quiet))
        rows[123]["chosen"] = rows[123]["chosen"] + " Indeed."
        write()
        changed, change_s = timed(lambda: load_stage_data(config, "sft", tokenizer, formats, log=quiet))
    result = {
        "rows": args.rows,
        "stage": "sft",
        "build_s": round(build_s, 3),
        "reload_s": round(reload_s, 3),
        "reload_from_cache": again.from_cache,
        "after_one_row_change_s": round(change_s, 3),
        "one_row_change_rebuilt": not changed.from_cache,
        "train_rows": len(first.train),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {sys.version.split()[0]}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_reload.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cache_reload.md").write_text(
        "# Tokenized-data cache (stage 1, {rows} rows)\n\n| step | seconds | from cache |\n|---|---|---|\n"
        "| first build | {build_s} | no |\n| unchanged rerun | {reload_s} | {reload_from_cache} |\n"
        "| after changing one row | {after_one_row_change_s} | {fresh} |\n\nMachine: {machine} (2 cores).\n".format(
            **result, fresh=not result["one_row_change_rebuilt"]
        )
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
