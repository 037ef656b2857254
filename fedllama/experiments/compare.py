"""Run one config under several merge strategies and compare them: a table and a plot.

Each strategy runs as its own ``fedllama simulate`` process into ``OUT/<strategy>/`` (a rerun
resumes or skips finished ones); then ``OUT/comparison.md`` and ``OUT/comparison.png`` are
written from their ``metrics.jsonl``. The runner is ``simulations/compare.py``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fedllama import config
from fedllama.experiments import report
from fedllama.server.metrics import MetricsRow, read_rows

ALL_STRATEGIES = (
    "zero_pad",
    "rank_aware",
    "hetlora",
    "ffa_lora",
    "rolora",
    "fedsa_lora",
    "flexlora",
    "flora",
    "fedex_lora",
)


def run_strategies(
    config_path: str, overrides: Sequence[str], strategies: Sequence[str], out: Path
) -> dict[str, list[MetricsRow]]:
    """Run ``config_path`` once per strategy into ``out/<strategy>``; their metrics rows.

    Every override is checked before the first run starts. A run that fails is reported and
    the others go on.
    """
    for name in strategies:  # fail on a bad key before any run starts
        config.load(config_path, [*overrides, f"strategy.name={name}", f"output.dir={out / name}"])
    runs = {}
    for name in strategies:
        run_dir = out / name
        args = [*overrides, f"strategy.name={name}", f"output.dir={run_dir}"]
        print(f"== {name} -> {run_dir}", flush=True)
        cmd = [sys.executable, "-m", "fedllama.cli", "simulate", config_path, *args]
        if subprocess.run(cmd).returncode != 0:
            print(f"{name}: run failed; see its log above", file=sys.stderr)
        runs[name] = read_rows(run_dir)
    return runs


def write_comparison(runs: dict[str, list[MetricsRow]], out: Path) -> str:
    """``out/comparison.md`` and ``out/comparison.png``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = report.comparison_table(runs)
    (out / "comparison.md").write_text(table + "\n")
    report.plot_comparison(runs, out / "comparison.png")
    return table
