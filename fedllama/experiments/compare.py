"""Run one config under several merge strategies and compare them: a sweep over
``strategy.name`` (``fedllama/experiments/sweep.py``), plus a per-round comparison table and plot.

Each strategy runs as its own ``fedllama simulate`` process into
``OUT/strategy.name=<strategy>/seed-<s>`` (a rerun skips finished runs and resumes an
interrupted one); then the sweep's ``OUT/results.csv``, ``OUT/results.md`` and
``OUT/utility-per-strategy.png`` (mean ± std over seeds), and ``OUT/comparison.md`` and
``OUT/comparison.png`` (eval loss per round, the first seed) are written. The runner is
``simulations/compare.py``; ``simulations/sweeps/strategies.yaml`` is the same sweep as a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedllama.experiments import report
from fedllama.experiments.results import RunResult
from fedllama.experiments.sweep import Check, Runner, Sweep, run_sweep
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


def strategy_sweep(
    config_path: str | Path,
    overrides: Sequence[str],
    strategies: Sequence[str],
    out: Path,
    seeds: Sequence[int] = (0,),
) -> Sweep:
    """The sweep of ``config_path`` (with ``overrides``) over ``strategies`` × ``seeds``."""
    return Sweep(
        base=Path(config_path),
        grid={"strategy.name": list(strategies)},
        seeds=list(seeds),
        out=out,
        overrides=list(overrides),
    )


def by_strategy(results: Sequence[RunResult]) -> dict[str, list[MetricsRow]]:
    """Each strategy's metrics rows at its first seed (a run that did not start: none)."""
    runs: dict[str, list[MetricsRow]] = {}
    for r in results:
        name = str(r.run.point.values["strategy.name"])
        if name not in runs:
            runs[name] = read_rows(r.run.directory)
    return runs


def run_strategies(
    config_path: str | Path,
    overrides: Sequence[str],
    strategies: Sequence[str],
    out: Path,
    seeds: Sequence[int] = (0,),
    runner: Runner | None = None,
    check: Check | None = None,
) -> dict[str, list[MetricsRow]]:
    """Run ``config_path`` once per strategy and seed (the sweep's results written into
    ``out``); each strategy's metrics rows at its first seed.

    Every run's config is checked (with ``check`` too: ``server.app.check``) before the first
    starts. A run that fails is reported and the others go on.

    Raises:
        SweepError: a bad override, or ``out`` holds a different sweep.
    """
    sweep = strategy_sweep(config_path, overrides, strategies, out, seeds)
    return by_strategy(run_sweep(sweep, runner, check))


def write_comparison(runs: dict[str, list[MetricsRow]], out: Path) -> str:
    """``out/comparison.md`` and ``out/comparison.png``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = report.comparison_table(runs)
    (out / "comparison.md").write_text(table + "\n")
    report.plot_comparison(runs, out / "comparison.png")
    return table
