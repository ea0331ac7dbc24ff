"""``python -m benchmarks sft-gap``: issue 31's controlled experiment. Stage 1 on a ~26.5M-parameter OPT (random
init, hidden 512, 8 layers, 8 heads, the project's tiny tokenizer) trained a worse model than DeepSpeed-Chat's own
step 1 on the same data (held-out perplexity 5.35 against 4.11). Here dschat's SFT runs with each difference from
DeepSpeed-Chat's batch construction switched on alone, then all together, and every final model is measured by
one function: token-weighted perplexity over the real tokens (prompt + chosen + EOS) of the stage-1 eval rows.

The differences emulated (DeepSpeed-Chat's ``dschat/utils/data/data_utils.py`` and step 1's ``main.py``):

- ``eos-text``: DeepSpeed-Chat appends ``<|endoftext|>`` as *text* to every row (several tokens for this
  tokenizer), dschat the tokenizer's EOS id. Emulated by appending the text to the chosen answers in the data.
- ``pad-to-max``: DeepSpeed-Chat pads every row to ``max_seq_len``; with ``labels = input_ids`` (its version
  before the labels were masked with the attention mask) the pad tokens (= EOS here) count in the loss, so the
  loss averages over all 128 positions per row. Emulated by a stage whose collate pads to ``max_seq_len`` and
  keeps the pads' labels (``benchmarks/sft_gap_worker.py``), run under torchrun like any stage.
- ``deepspeed-chat``: both.
- ``dropout-0``: dropout off (both systems keep the model config's 0.1 unless told; a check that it matters).

The split is not a difference any more: dschat's cuts equal DeepSpeed-Chat's ``get_raw_dataset_split_index`` for
every size (tests/data/test_pipeline.py::test_cuts_are_deepspeed_chats_for_every_size), so both train on the same
400 rows. Results go to ``benchmarks/results/sft-gap-<time>.json`` and ``sft-gap.md``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The issue's settings: 2 CPU ranks, fp32, ZeRO-2, batch 8 per rank, length 128, lr 1e-3 cosine without warm-up,
#: no weight decay, one epoch over the 400 stage-1 rows (25 steps), loss on prompt and answer.
SETTINGS = [
    "topology.gpus_per_node=2",
    "topology.accelerator=cpu",
    "seed=1234",
    "data.data_split=2,4,4",
    "sft.dtype=fp32",
    "sft.zero_stage=2",
    "sft.per_device_train_batch_size=8",
    "sft.per_device_eval_batch_size=8",
    "sft.max_seq_len=128",
    "sft.learning_rate=1.0e-3",
    "sft.lr_scheduler_type=cosine",
    "sft.num_warmup_steps=0",
    "sft.weight_decay=0.0",
    "sft.gradient_accumulation_steps=1",
    "sft.num_train_epochs=1",
    "sft.loss_on=all",
    "sft.eval_before_training=false",
    "sft.save_each_epoch=false",
    "sft.print_interval=5",
]
#: variant -> (the data's chosen answers end in DeepSpeed-Chat's EOS text, rows padded to max_seq_len with pads in
#: the loss, extra settings)
VARIANTS: dict[str, tuple[bool, bool, list[str]]] = {
    "dschat": (False, False, []),
    "eos-text": (True, False, []),
    "pad-to-max": (False, True, []),
    "deepspeed-chat": (True, True, []),
    "dropout-0": (False, False, ["sft.dropout=0.0"]),
}
EOS_TEXT = "<|endoftext|>"


def make_inputs(root: Path) -> tuple[Path, dict[bool, Path]]:
    """The model and the two data folders (with and without the EOS text): the tiny task's 2000 + 200 pairs in
    rm-static's schema, half of them with chosen and rejected swapped (a weak-policy SFT set), save_to_disk."""
    import datasets

    from dschat_core.models import init_tiny
    from dschat_core.tiny_task import make_rows

    model = init_tiny("opt", root / "opt-26m", hidden=512, layers=8, heads=8)
    folders = {}
    for eos_text in (False, True):
        splits = {}
        for split, (n, seed) in {"train": (2000, 1234), "test": (200, 1235)}.items():
            rows = make_rows(n, seed)
            for i, row in enumerate(rows):
                if i % 2:
                    row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
                if eos_text:
                    row["chosen"] += EOS_TEXT
                    row["rejected"] += EOS_TEXT
            splits[split] = datasets.Dataset.from_list(rows)
        folder = root / ("data-eos-text" if eos_text else "data")
        datasets.DatasetDict(splits).save_to_disk(str(folder))
        (folder / "dschat-dataset.json").write_text(json.dumps({"format": "Dahoas/rm-static"}))
        folders[eos_text] = folder
    return model, folders


def train(root: Path, name: str, model: Path, data: Path, padded: bool, extra: list[str]) -> tuple[Path, float]:
    """One variant's stage 1 on 2 CPU ranks; (its final model folder, wall seconds)."""
    from dschat_core.config import load_config
    from dschat_core.launch import plan
    from dschat_local.backend import LocalBackend

    overrides = [
        *SETTINGS,
        f"storage.root={root / name}",
        f"sft.model_name_or_path={model}",
        f"data.data_path=[{data}]",
        *extra,
    ]
    config = load_config(None, overrides)
    backend = LocalBackend()
    launch = plan(config, backend, "sft")
    start = time.perf_counter()
    if padded:  # the emulated batch construction: its own worker, launched as the local backend launches
        launch.write_config()
        env = {**os.environ, **backend.environment(launch)}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc_per_node=2",
            "-m",
            "benchmarks.sft_gap_worker",
            "--config",
            str(launch.config_path),
        ]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    else:
        status = backend.status(backend.submit(launch))
        if not status.succeeded:
            raise SystemExit(f"{name} failed: {status.describe()}")
    return Path(launch.output_dir), time.perf_counter() - start


def held_out_perplexity(model_dir: Path, measure: dict[str, list[str]]) -> dict[str, float]:
    """The one measurement, on the same stage-1 eval rows for every variant, with each system's way of ending a
    row: token-weighted perplexity over the real tokens (no padding) of prompt + chosen + the tokenizer's EOS id
    (``perplexity``: dschat's rows), and of prompt + chosen + ``<|endoftext|>`` as text (``perplexity_eos_text``:
    DeepSpeed-Chat's rows); and over the answer's tokens alone."""
    import torch

    from dschat_core.config import load_config
    from dschat_core.data.pipeline import load_stage_data
    from dschat_core.models import load_causal_lm, load_tokenizer
    from dschat_core.plugins import get_dataset_formats
    from dschat_core.stages.sft import token_nll

    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir)).eval()
    figures: dict[str, float] = {}
    for name, overrides in measure.items():
        rows = load_stage_data(load_config(None, overrides), "sft", tokenizer, get_dataset_formats()).eval
        total = answer_total = 0.0
        tokens = answer_tokens = 0
        with torch.no_grad():
            for row in rows:
                ids = torch.tensor([row["input_ids"]])
                nll = token_nll(model(input_ids=ids).logits, ids)[0]
                if name == "eos_text":  # the row ends in the EOS text; the EOS id dschat appends is not DS-Chat's
                    nll = nll[:-1]
                total += float(nll.sum())
                tokens += nll.numel()
                answer = nll[row["prompt_len"] - 1 :]
                answer_total += float(answer.sum())
                answer_tokens += answer.numel()
        suffix = "" if name == "eos_id" else f"_{name}"
        figures[f"perplexity{suffix}"] = math.exp(total / tokens)
        figures[f"answer_perplexity{suffix}"] = math.exp(answer_total / answer_tokens)
        figures[f"eval_tokens{suffix}"] = tokens
        figures["eval_rows"] = len(rows)
    return figures


def sft_gap(variants: list[str]) -> dict:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="dschat-sft-gap-"))
    model, folders = make_inputs(root)
    common = [*SETTINGS, f"sft.model_name_or_path={model}", f"storage.root={root / 'measure'}"]
    measure = {
        "eos_id": [*common, f"data.data_path=[{folders[False]}]"],
        "eos_text": [*common, f"data.data_path=[{folders[True]}]"],
    }
    results: dict = {"model": str(model), "before": held_out_perplexity(model, measure), "variants": {}}
    print(f"before training: {results['before']}", flush=True)
    for name in variants:
        eos_text, padded, extra = VARIANTS[name]
        out, wall = train(root, name, model, folders[eos_text], padded, extra)
        figures = {**held_out_perplexity(out, measure), "wall_s": round(wall, 1)}
        summary = json.loads((out / "dschat-finished.json").read_text())
        figures["own_eval_perplexity"] = summary.get("eval/perplexity")
        figures["steps"] = summary.get("global_step")
        results["variants"][name] = figures
        print(f"{name}: {figures}", flush=True)
    return results


def sft_gap_markdown(result: dict) -> str:
    env = result.get("environment", {})
    lines = [
        "# Stage 1 against DeepSpeed-Chat's batch construction (issue 31)",
        "",
        f"`python -m benchmarks sft-gap` on {env.get('machine', '?')} ({env.get('cpu', '')}): a ~26.5M-parameter "
        "OPT (random init), the tiny task's pairs with half swapped, data_split 2,4,4 (400 rows), 2 CPU ranks, "
        "ZeRO-2, batch 8/rank, length 128, lr 1e-3 cosine, no warm-up, 1 epoch, loss on all tokens. One function "
        "measures every model on the same 40 stage-1 eval rows, over their real tokens, once with the rows ending "
        "as dschat ends them (the EOS id) and once as DeepSpeed-Chat does (`<\\|endoftext\\|>` as text, 10 tokens "
        "of this tokenizer).",
        "",
        "| variant | perplexity, rows ending in the EOS id (dschat's) | rows ending in `<\\|endoftext\\|>` text "
        "(DeepSpeed-Chat's) | answer tokens only | the run's own eval | wall s |",
        "|---|---|---|---|---|---|",
    ]
    rows = {"(before training)": result["before"], **result["variants"]}
    for name, f in rows.items():
        own = f"{f['own_eval_perplexity']:.3f}" if f.get("own_eval_perplexity") else ""
        lines.append(
            f"| {name} | {f['perplexity']:.3f} | {f['perplexity_eos_text']:.3f} | {f['answer_perplexity']:.3f} | "
            f"{own} | {f.get('wall_s', '')} |"
        )
    return "\n".join(lines) + "\n"
