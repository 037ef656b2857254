"""Run one config under several merge strategies and compare them: a table and a plot.

    .venv/bin/python simulations/compare.py simulations/configs/hetero.yaml \
        [--strategies zero_pad,rank_aware,ffa_lora,rolora] [--out runs/compare] [key=value ...]

Each strategy runs as its own ``fedllama simulate`` process into ``OUT/<strategy>/`` (a rerun
resumes or skips finished ones); then ``OUT/comparison.md`` and ``OUT/comparison.png`` are
written from their ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fedllama import checkpoint, config, report


def main() -> int:
    """Run every strategy, then write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument(
        "--strategies",
        default="zero_pad,rank_aware,hetlora,ffa_lora,rolora,fedsa_lora,flexlora,flora,fedex_lora",
    )
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args()
    out = Path(args.out)
    runs = {}
    for name in args.strategies.split(","):
        run_dir = out / name
        overrides = [*args.overrides, f"strategy.name={name}", f"output.dir={run_dir}"]
        config.load(args.config, overrides)  # fail on a bad key before any run starts
        print(f"== {name} -> {run_dir}", flush=True)
        cmd = [sys.executable, "-m", "fedllama.cli", "simulate", args.config, *overrides]
        if subprocess.run(cmd).returncode != 0:
            print(f"{name}: run failed; see its log above", file=sys.stderr)
        runs[name] = checkpoint.read_metrics(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = report.comparison_table(runs)
    (out / "comparison.md").write_text(table + "\n")
    report.plot_comparison(runs, out / "comparison.png")
    print(table)
    print(f"table: {out / 'comparison.md'}  plot: {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
