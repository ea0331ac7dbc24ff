"""`dschat-core report A B`: short labels, a legend that covers no curve, and only the stage's own settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dschat_core.config import dump_config, load_config
from dschat_core.report import compare_runs


def fake_run(root: Path, name: str, *overrides: str) -> Path:
    """A run folder as a finished run leaves it: its resolved stage config and the stage's metrics.jsonl."""
    run = root / "runs" / name
    (run / "configs").mkdir(parents=True)
    (run / "actor").mkdir()
    config = load_config(
        None,
        [
            f"run_name={name}",
            f"storage.root={root}",
            f"data.data_path=[{root}/very/long/absolute/path/to/the/data/tiny-prefs]",
            *overrides,
        ],
    )
    (run / "configs" / "sft.yaml").write_text(dump_config(config))
    rate = config.sft.learning_rate
    points = [{"step": s, "train/loss": 3.0 - s * rate * 100, "eval/perplexity": 9.0 - s} for s in range(1, 9)]
    (run / "actor" / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    return run


@pytest.fixture
def figures(monkeypatch):
    """The figures compare_runs draws, kept when it closes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    return kept


def legend_clear_of_the_panels(figure) -> bool:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = figure.legends[0].get_window_extent(renderer)
    return not any(box.overlaps(axis.get_window_extent(renderer)) for axis in figure.axes if axis.has_data())


def test_runs_of_one_config_are_labelled_by_what_differs_and_the_legend_covers_nothing(tmp_path, figures):
    a = fake_run(tmp_path / "a", "tiny-cpu", "sft.learning_rate=1.0e-3", "dpo.beta=0.5")
    b = fake_run(tmp_path / "b", "tiny-cpu", "sft.learning_rate=3.0e-3", "dpo.beta=0.1")
    written = compare_runs([a, b], tmp_path / "compare")
    (figure,) = figures
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["learning_rate=0.001", "learning_rate=0.003"]
    assert legend_clear_of_the_panels(figure)
    assert all(axis.get_legend() is None for axis in figure.axes)  # no legend inside a panel
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "`sft.learning_rate`" in report and "dpo." not in report  # the stage's own keys only
    assert "very/long" not in report
    assert [p.name for p in written] == ["report.md", "sft.png"]


def test_runs_of_different_names_are_labelled_by_name(tmp_path, figures):
    runs = [
        fake_run(tmp_path, "tiny-cpu", "sft.learning_rate=1.0e-3"),
        fake_run(tmp_path, "tiny-cpu-grpo", "sft.learning_rate=2.0e-3", "pipeline=rl"),
        fake_run(tmp_path, "tiny-cpu-dpo", "sft.learning_rate=3.0e-3", "pipeline=dpo"),
        fake_run(tmp_path, "tiny-cpu-lr", "sft.learning_rate=4.0e-3"),
    ]
    compare_runs(runs, tmp_path / "compare")
    (figure,) = figures
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == [r.name for r in runs] and max(map(len, labels)) <= 24
    assert legend_clear_of_the_panels(figure)


def test_a_half_written_metrics_line_and_stray_bytes_are_skipped_with_a_note(tmp_path, figures, capsys):
    run = fake_run(tmp_path, "tiny-cpu", "sft.learning_rate=1.0e-3")
    metrics = run / "actor" / "metrics.jsonl"
    with open(metrics, "ab") as out:
        out.write(b'\x00\xff\xfe binary\n{"step": 9, "train/lo')  # what a crash mid-write leaves
    from dschat_core.report import read_metrics, write_report

    assert [p["step"] for p in read_metrics(run / "actor")] == list(range(1, 9))
    assert "skipped 2 unreadable line(s) (9, 10)" in capsys.readouterr().err
    assert [p.name for p in write_report(run)] == ["report.md", "sft.png"]


def test_a_damaged_finished_marker_is_noted_not_a_traceback(tmp_path, figures, capsys):
    from dschat_core.backend import FINISHED_MARKER
    from dschat_core.report import summary_line

    run = fake_run(tmp_path, "tiny-cpu")
    (run / "actor" / FINISHED_MARKER).write_bytes(b'{"eval/perplexity": 1.2')
    assert summary_line("sft", run / "actor").startswith("sft: eval perplexity nan")
    assert "is damaged" in capsys.readouterr().err
