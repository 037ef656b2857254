"""Run one config under several merge strategies and compare them: a table and a plot.

    .venv/bin/python simulations/compare.py simulations/configs/hetero.yaml \
        [--strategies zero_pad,rank_aware,ffa_lora,rolora] [--out runs/compare] [key=value ...]

Each strategy runs as its own ``fedllama simulate`` process into ``OUT/<strategy>/`` (a rerun
resumes or skips finished ones); then ``OUT/comparison.md`` and ``OUT/comparison.png`` are
written from their ``metrics.jsonl`` (``fedllama.experiments.compare``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedllama.experiments.compare import ALL_STRATEGIES, run_strategies, write_comparison


def main() -> int:
    """Run every strategy, then write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--strategies", default=",".join(ALL_STRATEGIES))
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args()
    out = Path(args.out)
    runs = run_strategies(args.config, args.overrides, args.strategies.split(","), out)
    print(write_comparison(runs, out))
    print(f"table: {out / 'comparison.md'}  plot: {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
