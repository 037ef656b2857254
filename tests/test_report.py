"""Run reports: summary, comparison table, plots."""

from __future__ import annotations

from pathlib import Path

from fedllama import report

ROWS = [
    {
        "round": 0,
        "eval_loss": 3.0,
        "train_loss": None,
        "bytes_up": 0,
        "bytes_down": 0,
        "seconds": 1.0,
    },
    {
        "round": 1,
        "eval_loss": 2.5,
        "train_loss": 2.8,
        "bytes_up": 4e6,
        "bytes_down": 4e6,
        "seconds": 10.0,
    },
    {
        "round": 2,
        "eval_loss": 2.0,
        "train_loss": 2.2,
        "bytes_up": 2e6,
        "bytes_down": 4e6,
        "seconds": 20.0,
    },
]


def test_summary_reports_the_eval_change() -> None:
    text = report.summary(ROWS)
    assert "eval loss 3.0000 (round 0) -> 2.0000 (round 2): -1.0000" in text
    assert len(text.splitlines()) == 5


def test_comparison_table_has_a_row_per_strategy_with_means() -> None:
    table = report.comparison_table({"a": ROWS, "b": ROWS[:2]})
    lines = table.splitlines()
    assert lines[0].startswith("| strategy | eval r0 | eval r1 | eval r2 | Δ eval")
    assert lines[2] == "| a | 3.0000 | 2.5000 | 2.0000 | -1.0000 | 3.00 | 15 |"
    assert lines[3] == "| b | 3.0000 | 2.5000 | - | -0.5000 | 4.00 | 10 |"


def test_plots_are_written(tmp_path: Path) -> None:
    assert report.plot_losses(ROWS, tmp_path / "a.png").stat().st_size > 1000
    assert report.plot_comparison({"a": ROWS}, tmp_path / "b.png").stat().st_size > 1000
