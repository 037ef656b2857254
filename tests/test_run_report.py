"""The run report: ``report.md`` / ``report.html`` with the config, the per-round table, plots,
leakage and the summary, from a run directory's own files (``fedllama report``)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from fedllama import cli
from fedllama import config as config_lib
from fedllama.experiments import report
from fedllama.server import checkpoint
from fedllama.server.metrics import MetricsRow, append_row
from tests.harness import DP_ROW, TINY_YAML

ROWS = [
    MetricsRow(round=0, eval_loss=3.0, seconds=1.0),
    MetricsRow(
        round=1,
        eval_loss=2.5,
        train_loss=2.8,
        bytes_up=4_000_000,
        bytes_down=6_000_000,
        seconds=10.0,
        client_eval_loss=2.6,
        clients_ok=2,
        clients_dropped=1,
    ),
    MetricsRow(
        round=2,
        eval_loss=2.75,
        train_loss=2.2,
        bytes_up=2_000_000,
        bytes_down=2_000_000,
        seconds=20.0,
        clients_ok=1,
        rejected="eval loss 3.1 over 1.2 x 2.5",
    ),
]


def _run(out: Path, rows: list[MetricsRow], *overrides: str) -> Path:
    checkpoint.write_config(out, config_lib.load(TINY_YAML, [f"output.dir={out}", *overrides]))
    for row in rows:
        append_row(out, row)
    return out


def _leakage(out: Path, server_round: int) -> None:
    attack = {"auc": 0.625, "auc_ci95": [0.5, 0.75], "tpr_at_1pct_fpr": 0.05}
    attack |= {"tpr_at_0.1pct_fpr": None, "tpr_at_0.1pct_fpr_note": "n/a (needs ≥ 1000)"}
    measured = {
        "threat_model": "the attacker holds the adapter",
        "score_orientation": "higher = more likely a member",
        "attacks": {"loss": {"score": "-loss", "paper": "Yeom et al., CSF 2018"}},
        "overall": {"members": 40, "non_members": 40, "attacks": {"loss": attack}},
        "clients": [{"client_id": 1, "client_level": {"p_value": 0.01, "took_part": True}}],
    }
    (out / f"leakage-round-{server_round:03d}.json").write_text(json.dumps(measured))


def _images(text: str) -> list[str]:
    return re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)


def test_the_report_holds_the_round_table_with_its_numbers(tmp_path: Path) -> None:
    out = _run(tmp_path / "run", ROWS)

    text = report.write_run_report(out).read_text()

    lines = text.splitlines()
    header = "| round | train loss | eval loss | client eval loss | clients ok | dropped |"
    assert any(line.startswith(header) for line in lines)
    # round 1: 4 MB up shared by 2 counted clients; 6 MB down to 3 sent (2 ok + 1 dropped)
    assert "| 1 | 2.8000 | 2.5000 | 2.6000 | 2 | 1 | 2 | 2 | 10.0 |  |" in lines
    assert "| 2 | 2.2000 | 2.7500 | - | 1 | 0 | 2 | 2 | 20.0 | rejected: eval loss 3.1" in text
    assert "| 0 | - | 3.0000 | - | 0 | 0 | - | - | 1.0 |  |" in lines
    assert "global eval loss 3.0000 (round 0) -> 2.7500 (round 2): -0.2500; lowest 2.5000" in text
    assert "`fedavg` on `tiny` (none), LoRA r = 4, 3 simulated clients; 2/2 rounds done" in text
    assert "rounds skipped or rejected (adapter kept): [2]" in text
    assert "no differential privacy" in text


def test_the_report_links_plots_that_exist_and_shows_the_config(tmp_path: Path) -> None:
    out = _run(tmp_path / "run", ROWS)

    text = report.write_run_report(out).read_text()

    images = _images(text)
    assert images == ["loss.png", "bytes.png"]
    assert all((out / name).stat().st_size > 1000 for name in images)
    assert "```yaml\nmodel:\n  name: tiny\n" in text
    assert f"  dir: {out}\n" in text
    page = (out / report.REPORT_HTML).read_text()
    assert '<img src="loss.png"' in page and "<td>2.8000</td>" in page
    assert "<h2>Config (<code>config.yaml</code>, resolved)</h2>" in page


def test_a_dp_run_with_leakage_gets_epsilon_and_leakage_plots(tmp_path: Path) -> None:
    rows = [
        MetricsRow(round=0, eval_loss=3.0, dp={**DP_ROW, "epsilon": 0.0}),
        MetricsRow(
            round=1, eval_loss=2.9, train_loss=3.1, clients_ok=2, dp={**DP_ROW, "epsilon": 1.5}
        ),
        MetricsRow(
            round=2, eval_loss=2.8, train_loss=3.0, clients_ok=2, dp={**DP_ROW, "epsilon": 2.5}
        ),
    ]
    out = _run(tmp_path / "run", rows, "dp.enabled=true", "dp.noise_multiplier=1.1")
    _leakage(out, 2)

    text = report.write_run_report(out).read_text()

    assert _images(text) == ["loss.png", "bytes.png", "epsilon.png", "leakage.png"]
    assert all((out / name).stat().st_size > 1000 for name in _images(text))
    assert "| 2 | 3.0000 | 2.8000 | - | 2 | 0 | 0 | 0 | 0.0 | 2.500 |  |" in text
    assert "ε = 2.500 at δ = 1e-05 (rdp accountant; privacy unit: one client" in text
    assert "## Leakage at round 2" in text
    assert "| loss (Yeom et al., CSF 2018) | 0.625 [0.500, 0.750] | 0.050 | n/a (needs" in text
    assert "- client 1: p = 0.0100 -> took part (detected)" in text


def _command(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedllama")
    sub = parser.add_subparsers(dest="command", required=True)
    report.add_report_command(sub)
    return parser.parse_args(argv)


def test_the_command_writes_the_report_without_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run(tmp_path / "run", ROWS)

    code = report.report_command(_command(["report", str(out), "--no-plots", "--no-html"]))

    assert code == 0 and capsys.readouterr().out == f"written: {out / 'report.md'}\n"
    assert _images((out / "report.md").read_text()) == []
    assert not (out / "loss.png").exists() and not (out / "report.html").exists()


def test_the_command_refuses_a_directory_without_a_run_and_says_what_to_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["report", str(tmp_path)])

    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err == [
        f"fedllama: {tmp_path} is not a run directory: no rows in metrics.jsonl",
        f"fedllama: to fix: {report.NOT_A_RUN_HINT}",
    ]


def test_the_command_refuses_a_damaged_metrics_file_naming_its_line(tmp_path: Path) -> None:
    out = _run(tmp_path / "run", ROWS)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(["{not json", *lines]) + "\n")

    with pytest.raises(report.ReportError, match=r"metrics.jsonl:1 is not a metrics row") as err:
        report.report_command(_command(["report", str(out)]))
    assert err.value.hint == ""
