"""Sweeps: the grid's points, resume after an interrupt, the manifest, results and plots.

A fake runner writes a finished run directory (real metrics rows) in place of a federation, so
every test but the last runs in well under a second.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedllama import cli
from fedllama import config as config_lib
from fedllama.experiments import canaries as canaries_lib
from fedllama.experiments import compare
from fedllama.experiments import report as report_lib
from fedllama.experiments import results as results_lib
from fedllama.experiments import sweep as sweep_lib
from fedllama.experiments.sweep import LeakageSettings, PlannedRun, RunFailed, SweepError
from fedllama.server import checkpoint
from fedllama.server.metrics import MetricsRow, append_row, read_rows
from server.app import check
from tests.harness import REPO, TINY_YAML

SWEEPS = sorted((REPO / "simulations" / "sweeps").glob("*.yaml"))
COMPARE_SCRIPT = REPO / "simulations" / "compare.py"


class Interrupted(Exception):
    """Stands in for Ctrl-C or a crash of the sweep's own process."""


def _eval_loss(run: PlannedRun, server_round: int) -> float:
    noise = float(run.point.values.get("dp.noise_multiplier", 0.0))
    return 3.0 - 0.25 * server_round + 0.1 * run.seed + noise


def _dp(run: PlannedRun, server_round: int) -> dict[str, object] | None:
    if not run.point.values.get("dp.enabled", False):
        return None
    epsilon = server_round / float(run.point.values["dp.noise_multiplier"])
    return {**DP, "epsilon": epsilon}


DP = {
    "delta": 1e-5,
    "accountant": "rdp",
    "noise_multiplier": 0.5,
    "clip_norm": 0.1,
    "placement": "central",
    "sampling": "poisson",
    "sampling_rate": 0.25,
    "unit": "client (add/remove one)",
}


def _write_round(run: PlannedRun, server_round: int) -> None:
    directory = checkpoint.round_dir(run.directory, server_round)
    directory.mkdir(parents=True)
    (directory / checkpoint.SERVER_STATE).write_bytes(b"")  # what last_round looks for
    row = MetricsRow(
        round=server_round,
        eval_loss=_eval_loss(run, server_round),
        train_loss=None if server_round == 0 else 3.0,
        bytes_up=2000 * server_round,
        bytes_down=3000 * server_round,
        seconds=1.5,
        clients_ok=2 if server_round else 0,
        dp=_dp(run, server_round),
    )
    append_row(run.directory, row)


class FakeRunner:
    """Writes each round of a run as the server would (resuming after the last one there);
    raises :class:`Interrupted` after round ``interrupt_at[1]`` of the run ``interrupt_at[0]``
    (0-based call count), and fails the runs labelled in ``fail``."""

    def __init__(
        self, interrupt_at: tuple[int, int] | None = None, fail: frozenset[str] = frozenset()
    ) -> None:
        self.calls: list[str] = []
        self.leakage_calls: list[str] = []
        self.canary_calls: list[str] = []
        self.interrupt_at = interrupt_at
        self.fail = fail

    def simulate(self, run: PlannedRun) -> None:
        self.calls.append(run.label)
        if run.label in self.fail:
            raise RunFailed(f"{run.label}: exit code 1")
        done = checkpoint.last_round(run.directory)
        for server_round in range(0 if done is None else done + 1, run.rounds + 1):
            _write_round(run, server_round)
            if self.interrupt_at == (len(self.calls) - 1, server_round):
                raise Interrupted

    def leakage(self, run: PlannedRun, settings: LeakageSettings) -> None:
        self.leakage_calls.append(run.label)
        auc = 0.5 + 0.01 * run.seed
        attacks = {"loss": {"auc": auc, "tpr_at_1pct_fpr": 0.02}, "reference": {"auc": 0.4}}
        text = json.dumps({"overall": {"attacks": attacks}})
        (run.directory / f"leakage-round-{run.rounds:03d}.json").write_text(text)

    def canaries(self, run: PlannedRun) -> None:
        self.canary_calls.append(run.label)
        canaries_lib.write(_canary_report(run.seed), run.directory, run.rounds)


def _canary_report(seed: int) -> dict[str, object]:
    """A ``canaries-round-NNN.json`` with known figures: seed 0 and 1 average to inserted 6.50,
    held out 1.40 bits, audit ε 1.00 ± 0.71."""
    inserted, held_out = [5.0 + seed, 7.0 + seed], [1.0 + 0.4 * seed, 1.4 + 0.4 * seed]
    return {
        "exposure": {
            "inserted": inserted,
            "held_out": held_out,
            "inserted_mean": statistics.fmean(inserted),
            "held_out_mean": statistics.fmean(held_out),
            "max_bits": math.log2(101),
            "assumes": "sampled exposure",
        },
        "audit": {"epsilon": 0.5 + seed, "correct": 4, "guesses": 4, "confidence": 0.95},
        "accountant": None,
    }


def _sweep_file(tmp_path: Path, grid: str, seeds: str = "2", extra: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"base: {TINY_YAML}\n"
        "overrides: [server.rounds=2]\n"
        f"grid:\n{grid}\n"
        f"seeds: {seeds}\n"
        f"out: {tmp_path / 'out'}\n{extra}"
    )
    return path


STRATEGIES = "  strategy.name: [fedavg, ffa_lora]"
DP_GRID = "  dp.enabled: [true]\n  dp.noise_multiplier: [0.5, 1.0]"


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / results_lib.RESULTS_CSV).open() as fh:
        return list(csv.DictReader(fh))


def test_points_are_the_grid_product_with_readable_names(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, "  strategy.name: [fedavg]\n  lora.client_ranks: [[2, 4], [4]]")

    sweep = sweep_lib.load_sweep(path)
    runs = sweep.planned()

    names = [p.name for p in sweep.points()]
    assert names == [
        "strategy.name=fedavg,lora.client_ranks=_2,_4_",
        "strategy.name=fedavg,lora.client_ranks=_4_",
    ]
    assert [r.seed for r in runs] == [0, 1, 0, 1]
    assert runs[1].directory == tmp_path / "out" / names[0] / "seed-1"
    assert runs[1].overrides == (
        "server.rounds=2",
        "strategy.name=fedavg",
        "lora.client_ranks=[2, 4]",
        "data.seed=1",
        "dp.seed=1",
        f"output.dir={runs[1].directory}",
    )
    assert runs[1].rounds == 2


def test_an_interrupted_sweep_resumes_without_rerunning_finished_runs(tmp_path: Path) -> None:
    sweep = sweep_lib.load_sweep(_sweep_file(tmp_path, STRATEGIES))
    first = FakeRunner(interrupt_at=(2, 1))  # the third run stops after its round 1 of 2

    with pytest.raises(Interrupted):
        sweep_lib.run_sweep(sweep, first)
    second = FakeRunner()
    results = sweep_lib.run_sweep(sweep_lib.load_sweep(_sweep_file(tmp_path, STRATEGIES)), second)

    labels = [r.label for r in sweep.planned()]
    assert first.calls == labels[:3]
    assert second.calls == labels[2:]  # the two finished runs are skipped
    assert [r.status for r in results] == ["finished"] * 4
    resumed = sweep.planned()[2].directory
    assert [r.round for r in read_rows(resumed)] == [0, 1, 2]
    assert len(_rows(sweep.out)) == 4


def test_a_rerun_of_a_finished_sweep_runs_nothing(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, STRATEGIES)
    sweep_lib.run_sweep(sweep_lib.load_sweep(path), FakeRunner())
    again = FakeRunner()

    sweep_lib.run_sweep(sweep_lib.load_sweep(path), again)

    assert again.calls == []


def test_a_different_grid_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    sweep_lib.run_sweep(sweep_lib.load_sweep(_sweep_file(tmp_path, STRATEGIES)), FakeRunner())
    other = sweep_lib.load_sweep(_sweep_file(tmp_path, "  strategy.name: [fedavg, flora]"))
    runner = FakeRunner()

    with pytest.raises(SweepError, match=r"holds a different sweep \(grid: saved .*ffa_lora"):
        sweep_lib.run_sweep(other, runner)
    assert runner.calls == []


def test_more_seeds_extend_a_sweep(tmp_path: Path) -> None:
    sweep_lib.run_sweep(sweep_lib.load_sweep(_sweep_file(tmp_path, STRATEGIES)), FakeRunner())
    runner = FakeRunner()

    sweep_lib.run_sweep(sweep_lib.load_sweep(_sweep_file(tmp_path, STRATEGIES, "3")), runner)

    assert runner.calls == ["strategy.name=fedavg seed 2", "strategy.name=ffa_lora seed 2"]


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    sweep = sweep_lib.load_sweep(_sweep_file(tmp_path, STRATEGIES))
    runner = FakeRunner(fail=frozenset({"strategy.name=fedavg seed 1"}))

    results = sweep_lib.run_sweep(sweep, runner)

    assert len(runner.calls) == 4
    assert [r.status for r in results] == ["finished", "not run", "finished", "finished"]
    assert "| fedavg | 1/2 |" in (sweep.out / results_lib.RESULTS_MD).read_text()


def test_results_hold_each_run_and_mean_std_over_seeds(tmp_path: Path) -> None:
    sweep = sweep_lib.load_sweep(_sweep_file(tmp_path, DP_GRID))

    sweep_lib.run_sweep(sweep, FakeRunner())

    rows = _rows(sweep.out)
    first = rows[0]
    assert first["point"] == "dp.enabled=true,dp.noise_multiplier=0.5"
    assert first["dp.noise_multiplier"] == "0.5" and first["seed"] == "0"
    assert float(first["final_eval_loss"]) == pytest.approx(3.0 - 0.5 + 0.5)
    assert float(first["best_eval_loss"]) == pytest.approx(3.0)
    assert float(first["epsilon"]) == 4.0 and first["delta"] == "1e-05"
    assert first["accountant"] == "rdp"
    # bytes per client per round: round 1 2000/2, round 2 4000/2 -> 1500 up; 2250 down
    assert float(first["bytes_up_per_client_round"]) == 1500.0
    assert float(first["bytes_down_per_client_round"]) == 2250.0
    assert float(first["round_seconds"]) == 4.5
    std = statistics.stdev([3.0, 3.1])
    table = (sweep.out / results_lib.RESULTS_MD).read_text()
    assert f"| true | 0.5 | 2/2 | 3.0500 ± {std:.4f} |" in table
    assert "| 4.000 ± 0.000 (δ=1e-05, rdp) |" in table
    assert "ε = 4.000 at δ = 1e-05 (rdp accountant; privacy unit: one client" in table


def test_plots_are_drawn_when_their_axis_varies(tmp_path: Path) -> None:
    sweep = sweep_lib.load_sweep(
        _sweep_file(tmp_path, DP_GRID, extra="include: [{dp.enabled: false}]\n")
    )

    sweep_lib.run_sweep(sweep, FakeRunner())

    assert (sweep.out / "utility-vs-epsilon.png").stat().st_size > 1000
    assert not (sweep.out / "utility-per-strategy.png").exists()
    table = (sweep.out / results_lib.RESULTS_MD).read_text()
    assert "![eval loss against ε](utility-vs-epsilon.png)" in table
    assert "eval loss per strategy: skipped (strategy.name does not vary)" in table
    assert "leakage against ε: skipped (no leakage measured" in table
    assert "canary exposure against ε: skipped (no canaries measured" in table
    assert "| false |  | 2/2 | 2.5500 ± 0.0707 | 2.5500 ± 0.0707 | ∞ (no DP) |" in table


def test_strategies_get_a_bar_plot_and_leakage_is_measured_once(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, STRATEGIES, extra="leakage: {enabled: true, max_examples: 50}\n")
    runner = FakeRunner()

    sweep_lib.run_sweep(sweep_lib.load_sweep(path), runner)
    sweep_lib.run_sweep(sweep_lib.load_sweep(path), runner)

    out = tmp_path / "out"
    assert len(runner.leakage_calls) == 4  # not again on the rerun
    assert (out / "utility-per-strategy.png").stat().st_size > 1000
    rows = _rows(out)
    assert rows[1]["leakage_attack"] == "loss" and float(rows[1]["leakage_auc"]) == 0.51
    assert "| fedavg | 2/2 | 2.5500 ± 0.0707 |" in (out / results_lib.RESULTS_MD).read_text()


def test_canaries_are_measured_once_per_finished_run_when_enabled(tmp_path: Path) -> None:
    off, on = FakeRunner(), FakeRunner()

    sweep_lib.run_sweep(sweep_lib.load_sweep(_sweep_file(tmp_path, STRATEGIES)), off)
    on_file = _sweep_file(tmp_path, STRATEGIES, extra="canaries: true\n")
    sweep_lib.run_sweep(sweep_lib.load_sweep(on_file), on)  # same points: not refused
    sweep_lib.run_sweep(sweep_lib.load_sweep(on_file), on)

    planned = sweep_lib.load_sweep(on_file).planned()
    assert off.canary_calls == [] and len(off.calls) == 4
    assert on.calls == [] and on.canary_calls == [r.label for r in planned]  # once, not rerun
    assert all(list(report_lib.read_canaries(r.directory)) == [2] for r in planned)


@pytest.mark.parametrize("canaries", ["false", "{enabled: false}"])
def test_canaries_are_not_measured_when_disabled(canaries: str, tmp_path: Path) -> None:
    runner = FakeRunner()
    path = _sweep_file(tmp_path, STRATEGIES, extra=f"canaries: {canaries}\n")

    sweep_lib.run_sweep(sweep_lib.load_sweep(path), runner)

    assert runner.canary_calls == [] and len(runner.calls) == 4
    table = (tmp_path / "out" / results_lib.RESULTS_MD).read_text()
    assert "canary exposure inserted" not in table and "Canaries" not in table


def test_results_carry_the_canary_figures_and_their_plot(tmp_path: Path) -> None:
    sweep = sweep_lib.load_sweep(
        _sweep_file(tmp_path, DP_GRID, extra="canaries: {enabled: true}\n")
    )

    sweep_lib.run_sweep(sweep, FakeRunner())

    rows = _rows(sweep.out)
    assert [r["canary_round"] for r in rows] == ["2"] * 4
    assert [float(r["canary_exposure_inserted"]) for r in rows[:2]] == [6.0, 7.0]
    assert [float(r["canary_exposure_held_out"]) for r in rows[:2]] == pytest.approx([1.2, 1.6])
    assert [float(r["canary_epsilon_lower_bound"]) for r in rows[:2]] == [0.5, 1.5]
    table = (sweep.out / results_lib.RESULTS_MD).read_text()
    assert "| canary exposure inserted / held out (bits) | audit ε ≥ | s/run |" in table
    assert table.count("| 6.50 / 1.40 | 1.00 ± 0.71 |") == 2  # each point: its seeds' mean
    assert "(Carlini et al. 2019, §4.2)" in table and "at most log2(n+1) bits (6.66 here)" in table
    assert "never saw has 1.44 bits" in table and "Thm 3.1), pure ε-DP (δ = 0), 95 %" in table
    assert (sweep.out / "canaries-vs-epsilon.png").stat().st_size > 1000
    assert "![canary exposure against ε](canaries-vs-epsilon.png)" in table


def test_unknown_canaries_keys_are_refused_naming_them(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, STRATEGIES, extra="canaries: {enabled: true, rounds: all}\n")

    with pytest.raises(SweepError, match="canaries.rounds: unknown key; expected enabled"):
        sweep_lib.load_sweep(path)


def _command(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedllama")
    sub = parser.add_subparsers(dest="command", required=True)
    sweep_lib.add_sweep_command(sub)
    return parser.parse_args(argv)


def _no_sweep_file(tmp_path: Path) -> Path:
    return tmp_path / "sweeep.yaml"


def _a_bad_grid_key(tmp_path: Path) -> Path:
    return _sweep_file(tmp_path, "  strategy.nme: [fedavg]")


def _grid_values_not_a_list(tmp_path: Path) -> Path:
    return _sweep_file(tmp_path, "  strategy.name: fedavg")


def _another_sweep_there(tmp_path: Path) -> Path:
    sweep_lib.run_sweep(sweep_lib.load_sweep(_sweep_file(tmp_path, STRATEGIES)), FakeRunner())
    return _sweep_file(tmp_path, "  strategy.name: [fedavg, flora]")


SWEEP_MISTAKES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    # name: (sweep file, what the error says, what the fix line says)
    "no such sweep file": (
        _no_sweep_file,
        "sweep file '.*sweeep.yaml' does not exist",
        "pass a sweep file, e.g. simulations/sweeps/strategies.yaml",
    ),
    "a grid key the config lacks": (
        _a_bad_grid_key,
        "point strategy.nme=fedavg seed 0: strategy.nme: unknown key",
        "the sweep file's grid, include or overrides",
    ),
    "grid values that are not a list": (
        _grid_values_not_a_list,
        "grid.strategy.name: expected a non-empty list",
        r"e\.g\. strategy.name: \[fedavg\]",
    ),
    "a different sweep in the directory": (
        _another_sweep_there,
        r"out holds a different sweep \(grid: saved",
        r"pass another out directory \(e\.g\. --out .*out-2\)",
    ),
}


@pytest.mark.parametrize("mistake", sorted(SWEEP_MISTAKES))
def test_the_command_ends_a_bad_sweep_with_what_to_do(
    mistake: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, says, fix = SWEEP_MISTAKES[mistake]
    path = build(tmp_path)

    code = cli.main(["sweep", str(path)])  # refused before a run: no simulation starts

    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("fedllama: ")]  # not the log lines
    assert code == 2 and len(lines) == 2 and not any("Traceback" in x for x in err), err
    assert lines[0].startswith("fedllama: ") and re.search(says, lines[0]), lines[0]
    assert lines[1].startswith("fedllama: to fix: ") and re.search(fix, lines[1]), lines[1]


def test_the_command_overrides_the_sweep_file_and_lists_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _sweep_file(tmp_path, STRATEGIES)

    code = sweep_lib.sweep_command(_command(["sweep", str(path), "seeds=[7]", "--dry-run"]))

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines == [
        f"1/2 strategy.name=fedavg seed 7: not run -> {tmp_path}/out/strategy.name=fedavg/seed-7",
        f"2/2 strategy.name=ffa_lora seed 7: not run -> "
        f"{tmp_path}/out/strategy.name=ffa_lora/seed-7",
    ]


def test_a_point_the_strategy_registry_refuses_stops_the_sweep_before_any_run(
    tmp_path: Path,
) -> None:
    path = _sweep_file(tmp_path, "  strategy.name: [fedavg, flora]\n  server.optimizer: [adam]")
    runner = FakeRunner()

    with pytest.raises(SweepError, match="point strategy.name=flora,server.optimizer=adam seed 0:"):
        sweep_lib.run_sweep(sweep_lib.load_sweep(path), runner, check)
    assert runner.calls == []


def test_unknown_sweep_keys_name_the_key(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, STRATEGIES, extra="seed: 3\n")

    with pytest.raises(SweepError, match="unknown key 'seed'; expected base, overrides"):
        sweep_lib.load_sweep(path)


def test_the_strategy_comparison_is_a_sweep_over_strategies(tmp_path: Path) -> None:
    runner = FakeRunner()
    out = tmp_path / "compare"
    strategies = ["fedavg", "ffa_lora"]

    runs = compare.run_strategies(TINY_YAML, ["server.rounds=2"], strategies, out, (0, 1), runner)
    table = compare.write_comparison(runs, out)

    assert runner.calls == [
        "strategy.name=fedavg seed 0",
        "strategy.name=fedavg seed 1",
        "strategy.name=ffa_lora seed 0",
        "strategy.name=ffa_lora seed 1",
    ]
    assert list(runs) == ["fedavg", "ffa_lora"] and [r.round for r in runs["fedavg"]] == [0, 1, 2]
    assert "| fedavg | 3.0000 | 2.7500 | 2.5000 | -0.5000 |" in table
    assert (out / "utility-per-strategy.png").is_file() and (out / "comparison.png").is_file()
    assert "| ffa_lora | 2/2 | 2.5500 ± 0.0707 |" in (out / results_lib.RESULTS_MD).read_text()


def test_the_compare_script_exits_1_naming_the_runs_that_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("compare_script", COMPARE_SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    runner = FakeRunner(fail=frozenset({"strategy.name=fedavg seed 1"}))
    monkeypatch.setattr(sweep_lib, "SubprocessRunner", lambda: runner)  # no processes
    monkeypatch.setattr(script, "setup_logging", lambda level: None)  # the suite's logging
    argv = [str(TINY_YAML), "server.rounds=2", "--strategies", "fedavg,ffa_lora", "--seeds", "2"]
    monkeypatch.setattr(sys, "argv", ["compare.py", *argv, "--out", str(tmp_path / "out")])

    code = script.main()

    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[-1] == "compare: 1/4 runs failed: strategy.name=fedavg seed 1"
    assert (tmp_path / "out" / "comparison.md").is_file()


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_loads_and_says_how_to_run_it(path: Path) -> None:
    text = path.read_text()

    runs = sweep_lib.load_sweep(path).planned()

    assert text.startswith("#") and f"fedllama sweep simulations/sweeps/{path.name}" in text
    assert runs
    for run in runs:  # the checks `fedllama simulate` makes with the strategy registry
        check(config_lib.load(run.config, run.overrides))


@pytest.mark.slow
def test_a_real_sweep_of_the_tiny_config_runs_and_resumes(cache_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny-sweep.yaml"
    path.write_text(
        f"base: {TINY_YAML}\n"
        f"overrides: [server.rounds=1, simulation.num_clients=2, model.cache_dir={cache_dir}]\n"
        "grid:\n  strategy.name: [fedavg, ffa_lora]\n"
        f"seeds: 1\nout: {tmp_path / 'out'}\n"
    )
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "fedllama.cli", "sweep", str(path)]  # `fedllama sweep`

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "sweep: 1/2 strategy.name=fedavg seed 0 ->" in log
    rows = _rows(tmp_path / "out")
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert all(float(r["final_eval_loss"]) > 0 for r in rows)
    assert again.returncode == 0 and again.stderr.count("finished, skipped") == 2
    assert (tmp_path / "out" / "strategy.name=fedavg" / "seed-0" / "report.md").is_file()


def test_epsilon_is_drawn_on_a_log_axis_when_it_spans_decades() -> None:
    from fedllama.experiments import results

    spread = [16.5, 534.9, 44111.8, math.inf]  # z = 1, 0.1, 0.01 and no DP
    assert results._log_epsilon(spread) and results._infinity(spread) == 44111.8 * 8
    assert not results._log_epsilon([2.0, 8.0, math.inf])
    assert results._infinity([2.0, 8.0, math.inf]) == 8.0 * 1.25
    plt = results._pyplot()
    fig, ax = plt.subplots()
    ax.plot([16.5, 534.9, 44111.8], [0.57, 0.54, 0.58])
    results._epsilon_axis(ax, spread)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    plt.close(fig)
    assert ax.get_xscale() == "log" and labels[-1] == "∞\n(no DP)" and "100" in labels
