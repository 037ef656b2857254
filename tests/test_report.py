"""Run reports: summary, comparison table, plots."""

from __future__ import annotations

from pathlib import Path

from fedllama.experiments import report
from fedllama.server.metrics import MetricsRow
from tests.harness import DP_ROW

_KEYS = ("round", "eval_loss", "train_loss", "bytes_up", "bytes_down", "seconds", "clients_ok")
ROWS = [
    MetricsRow(**dict(zip(_KEYS, (0, 3.0, None, 0, 0, 1.0, 0), strict=True))),
    MetricsRow(
        **dict(zip(_KEYS, (1, 2.5, 2.8, 4e6, 4e6, 10.0, 2), strict=True)), client_eval_loss=2.6
    ),
    MetricsRow(
        **dict(zip(_KEYS, (2, 2.0, 2.2, 2e6, 4e6, 20.0, 1), strict=True)), client_eval_loss=1.9
    ),
]


def test_summary_reports_the_eval_change() -> None:
    text = report.summary(ROWS)
    assert "eval loss 3.0000 (round 0) -> 2.0000 (round 2): -1.0000" in text
    assert len(text.splitlines()) == 5


def test_comparison_table_has_a_row_per_strategy_with_means() -> None:
    table = report.comparison_table({"a": ROWS, "b": ROWS[:2]})
    lines = table.splitlines()
    assert lines[0].startswith("| strategy | eval r0 | eval r1 | eval r2 | Δ eval | client eval")
    # MB up per client: round 1 4 MB / 2 clients, round 2 2 MB / 1 client -> mean 2.00
    # MB down per client: round 1 4 MB / 2 clients, round 2 4 MB / 1 client -> mean 3.00
    assert lines[2] == "| a | 3.0000 | 2.5000 | 2.0000 | -1.0000 | 1.9000 | 2.00 | 3.00 | 15 |"
    assert lines[3] == "| b | 3.0000 | 2.5000 | - | -0.5000 | 2.6000 | 2.00 | 2.00 | 10 |"


def test_plots_are_written(tmp_path: Path) -> None:
    assert report.plot_losses(ROWS, tmp_path / "a.png").stat().st_size > 1000
    assert report.plot_comparison({"a": ROWS}, tmp_path / "b.png").stat().st_size > 1000


def test_a_dp_run_reports_epsilon_with_its_assumptions(tmp_path: Path) -> None:
    dp = {**DP_ROW, "epsilon": 2.5, "sampling_rate": 0.1}
    rows = [
        MetricsRow(round=0, eval_loss=3.0, dp={**dp, "epsilon": 0.0}),
        MetricsRow(round=1, eval_loss=2.9, train_loss=3.1, dp=dp),
    ]

    text = report.summary(rows)

    assert text.splitlines()[0].endswith("ε")
    assert text.splitlines()[2].endswith("2.500")
    assert "ε = 2.500 at δ = 1e-05 (rdp accountant; privacy unit: one client" in text
    assert "z = 1.1 on updates clipped to C = 0.5; poisson q=0.1 sampling" in text
    with_eps = report.plot_losses(rows, tmp_path / "dp.png").stat().st_size
    plain = [MetricsRow(round=0, eval_loss=3.0), MetricsRow(round=1, eval_loss=2.9, train_loss=3.1)]
    without = report.plot_losses(plain, tmp_path / "a.png").stat().st_size
    assert with_eps > without  # the ε axis and line are drawn


def test_metrics_rows_are_strict_json_and_read_back(tmp_path: Path) -> None:
    import json
    import math

    from fedllama.server.metrics import append_row, read_rows, truncate_rows

    def refuse(constant: str) -> float:
        raise ValueError(f"{constant} is not JSON")

    append_row(tmp_path, MetricsRow(round=0, eval_loss=math.nan))  # server.evaluate=false
    append_row(tmp_path, MetricsRow(round=1, eval_loss=2.0, dp={"epsilon": math.inf}))
    truncate_rows(tmp_path, 1)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=refuse) for line in lines]
    assert rows[0]["eval_loss"] is None and rows[1]["dp"]["epsilon"] is None
    back = read_rows(tmp_path)
    assert math.isnan(back[0].eval_loss) and back[1].eval_loss == 2.0
