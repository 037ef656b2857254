"""Run one config under several merge strategies and compare them: a table and a plot.

    .venv/bin/python simulations/compare.py simulations/configs/hetero.yaml \
        [--strategies zero_pad,rank_aware,ffa_lora,rolora] [--seeds 3] [--out runs/compare] \
        [key=value ...]

A sweep over ``strategy.name`` (``fedllama sweep``; ``simulations/sweeps/strategies.yaml`` is the
same sweep as a file): each strategy and seed runs as its own ``fedllama simulate`` process into
``OUT/strategy.name=<strategy>/seed-<s>/`` (a rerun resumes or skips finished ones); then
``OUT/results.md`` (mean ± std over seeds), ``OUT/comparison.md`` and ``OUT/comparison.png``
(eval loss per round) are written (``fedllama.experiments.compare``). Exit code 0 when every
run finished, 1 when one did not (named on stderr), 2 for a bad config or output directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedllama.experiments.compare import (
    ALL_STRATEGIES,
    by_strategy,
    strategy_sweep,
    write_comparison,
)
from fedllama.experiments.results import RESULTS_MD
from fedllama.experiments.sweep import SweepError, run_sweep
from fedllama.runtime import setup_logging, stay_offline


def main() -> int:
    """Run every strategy, then write the comparison; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--strategies", default=",".join(ALL_STRATEGIES))
    parser.add_argument("--seeds", type=int, default=1, help="seeds per strategy (0, 1, ...)")
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args()
    stay_offline()  # before server.app imports transformers
    setup_logging(logging.INFO)
    from server.app import check  # the strategy registry's checks, before any run starts

    out = Path(args.out)
    sweep = strategy_sweep(
        args.config, args.overrides, args.strategies.split(","), out, range(args.seeds)
    )
    try:
        results = run_sweep(sweep, check=check)
    except SweepError as err:
        print(f"compare: {err}", file=sys.stderr)
        if err.hint:
            print(f"compare: to fix: {err.hint}", file=sys.stderr)
        return 2
    print(write_comparison(by_strategy(results), out))
    print(
        f"table: {out / 'comparison.md'}  plot: {out / 'comparison.png'}  sweep: {out / RESULTS_MD}"
    )
    failed = [r.run.label for r in results if r.status != "finished"]
    if failed:
        print(
            f"compare: {len(failed)}/{len(results)} runs failed: {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
