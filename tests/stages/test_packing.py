"""``sft.packing``: padding-free rows give the padded batch's loss and gradients where the model's attention keeps
packed sequences apart by position ids (Llama, GPT-2), and training refuses the models where it does not (OPT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dschat_core.backend import FINISHED_MARKER, JobState
from dschat_core.launch import plan
from dschat_core.models import init_tiny
from dschat_core.training.batching import pack_rows, pad_right
from dschat_local.backend import LocalBackend

from .runs import config, metrics, run_stage

SEQUENCES = [[5, 9, 13, 7, 11, 20, 21], [8, 6, 10], [30, 31, 32, 33], [40, 41, 42, 43, 44, 45], [50, 51]]


def test_packing_fills_rows_first_fit_with_positions_from_zero():
    packed = pack_rows(SEQUENCES, SEQUENCES, 10, pad_id=1)
    ids, positions, labels, real = packed["input_ids"], packed["position_ids"], packed["labels"], packed["token_mask"]
    assert ids.shape == (3, 10)  # 22 tokens in rows of 10: 7+3, 6+4, 2
    assert sorted(ids[real.bool()].tolist()) == sorted(t for s in SEQUENCES for t in s)
    assert ids[0].tolist() == SEQUENCES[0] + SEQUENCES[1]
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    # each sequence's first label is ignored: nothing is predicted from the sequence before it
    assert labels[0].tolist() == [-100, 9, 13, 7, 11, 20, 21, -100, 6, 10]
    # the tail of a short row is padding, its positions running on, its labels ignored
    assert ids[2].tolist() == [50, 51] + [1] * 8 and positions[2].tolist() == list(range(10))
    assert (labels[2, 2:] == -100).all() and real[2].tolist() == [1, 1] + [0] * 8


def test_a_sequence_longer_than_the_width_gets_a_row_of_its_own():
    packed = pack_rows([[1] * 12, [2, 3]], [[1] * 12, [2, 3]], 8, pad_id=0)
    assert packed["input_ids"].shape == (2, 12)


@pytest.mark.parametrize(("arch", "exact"), [("llama", True), ("gpt2", True), ("opt", False)])
def test_packed_rows_give_the_padded_batchs_loss_and_gradients(tmp_path, arch, exact):
    model = AutoModelForCausalLM.from_pretrained(init_tiny(arch, tmp_path / arch), dtype=torch.float32)

    def loss_and_grads(**batch):
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ids, mask = pad_right(SEQUENCES, 1)
    padded = loss_and_grads(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    packed_batch = pack_rows(SEQUENCES, SEQUENCES, 12, pad_id=1)
    packed_batch.pop("token_mask")
    packed = loss_and_grads(**packed_batch)
    same = torch.allclose(padded[0], packed[0], atol=1e-5) and all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(padded[1], packed[1], strict=True)
    )
    assert same is exact, (float(padded[0]), float(packed[0]))


@pytest.fixture(scope="module")
def llama_assets(assets):
    return {**assets, "opt": assets["llama"]}  # the sample's models, as tiny Llamas


@pytest.mark.ranks
def test_packed_sft_trains_with_the_padded_losses(tmp_path, llama_assets):
    short = ["sft.max_steps=4", "sft.print_interval=1", "sft.eval_before_training=false", "sft.loss_on=response"]
    padded, _ = run_stage(config(tmp_path / "padded", llama_assets, *short), "sft")
    packed, _ = run_stage(config(tmp_path / "packed", llama_assets, *short, "sft.packing=true"), "sft")

    def steps(out: Path) -> list[dict]:
        return [m for m in metrics(out) if "train/loss" in m]

    assert len(steps(padded)) == 4
    assert [m["train/loss"] for m in steps(packed)] == pytest.approx([m["train/loss"] for m in steps(padded)], abs=1e-5)
    # the same real tokens per step, in fewer or equal padded positions
    assert [m["train/tokens_per_s"] / m["train/samples_per_s"] for m in steps(packed)] == pytest.approx(
        [m["train/tokens_per_s"] / m["train/samples_per_s"] for m in steps(padded)]
    )


@pytest.mark.ranks
def test_packing_an_opt_model_stops_before_training_naming_the_setting(tmp_path, assets):
    backend = LocalBackend()
    p = plan(config(tmp_path, assets, "sft.packing=true", "sft.max_steps=4"), backend, "sft")
    status = backend.status(backend.submit(p))
    log = "".join(backend.logs(status.job_id))
    assert status.state is JobState.FAILED
    assert "error: config error: sft.packing = True: OPTForCausalLM attends across packed sequences" in log, log[-3000:]
    logged = Path(p.output_dir) / "metrics.jsonl"
    assert not logged.exists() or "train/loss" not in logged.read_text()  # stopped before the first step
    assert not (Path(p.output_dir) / FINISHED_MARKER).exists()
