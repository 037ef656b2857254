"""A sweep's results: each run directory read into a row, ``results.csv`` (one row per run),
``results.md`` (mean ± std over seeds per point, the assumptions under it) and the plots: eval
loss against ε, leakage against ε, canary exposure against ε and eval loss per strategy, each
only when its axis varies (``results.md`` says which were skipped). The sweep itself (its file,
points and runs) is ``fedllama/experiments/sweep.py``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllama.experiments import report
from fedllama.server.metrics import MetricsRow, read_rows

if TYPE_CHECKING:  # sweep.py imports this module: the types only, for annotations
    from fedllama.experiments.sweep import PlannedRun, Point, Sweep

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"

# --------------------------------------------------------------------------- one row per run


@dataclass
class RunResult:
    """What one run directory holds, as ``results.csv`` reports it."""

    run: PlannedRun
    status: str
    """``finished``, ``incomplete`` (some rounds), ``not run`` or ``unreadable: <why>``."""
    rounds_done: int = 0
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    """The lowest eval loss of a trained round (round 1 on)."""
    dp: dict[str, Any] | None = None
    """The last row's DP record: ε and every assumption it rests on."""
    bytes_up: float | None = None
    bytes_down: float | None = None
    """Per client per round (``report.bytes_per_client``)."""
    leakage: dict[str, Any] | None = None
    """The last leakage measurement: round, the attack with the highest overall AUC, its AUC
    and its TPR at 1 % FPR."""
    canaries: dict[str, Any] | None = None
    """The last canary measurement: round, the mean exposure of the inserted and of the
    held-out canaries, the most bits measurable and the one-run audit's ε lower bound."""
    seconds: float = 0.0
    """The rounds' wall time (start-up not counted)."""

    @property
    def epsilon(self) -> float:
        """ε after the last round; ``inf`` without DP."""
        eps = (self.dp or {}).get("epsilon")
        return float(eps) if eps is not None else math.inf


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _leakage_summary(directory: Path) -> dict[str, Any] | None:
    measured = report.read_leakage(directory)
    if not measured:
        return None
    server_round, last = list(measured.items())[-1]
    name, best = max(last["overall"]["attacks"].items(), key=lambda kv: kv[1]["auc"])
    return {
        "round": server_round,
        "attack": name,
        "auc": best["auc"],
        "tpr_at_1pct_fpr": best.get("tpr_at_1pct_fpr"),
    }


def _canaries_summary(directory: Path) -> dict[str, Any] | None:
    measured = report.read_canaries(directory)
    if not measured:
        return None
    server_round, last = list(measured.items())[-1]
    exposure = last["exposure"]
    return {
        "round": server_round,
        "inserted_mean": exposure["inserted_mean"],
        "held_out_mean": exposure["held_out_mean"],
        "max_bits": exposure["max_bits"],
        "epsilon_lower_bound": last["audit"]["epsilon"],
    }


def collect(run: PlannedRun) -> RunResult:
    """Read one run's directory (whatever state it is in)."""
    try:
        rows: list[MetricsRow] = read_rows(run.directory)
        measured = _leakage_summary(run.directory)
        canaries = _canaries_summary(run.directory)
    except (ValueError, KeyError, OSError) as err:
        return RunResult(run, f"unreadable: {err}")
    done = run.last_round()
    if done is None:
        return RunResult(run, "not run")
    trained = [r.eval_loss for r in rows if r.round > 0 and math.isfinite(r.eval_loss)]
    up, down = report.bytes_per_client(rows)
    return RunResult(
        run,
        "finished" if done >= run.rounds else "incomplete",
        rounds_done=done,
        final_eval_loss=_finite(rows[-1].eval_loss) if rows else None,
        best_eval_loss=min(trained) if trained else None,
        dp=next((r.dp for r in reversed(rows) if r.dp and r.dp.get("epsilon") is not None), None),
        bytes_up=up,
        bytes_down=down,
        leakage=measured,
        canaries=canaries,
        seconds=sum(r.seconds for r in rows),
    )


def _keys(results: Sequence[RunResult]) -> list[str]:
    keys: dict[str, None] = {}
    for r in results:
        keys.update(dict.fromkeys(r.run.point.values))
    return list(keys)


def _csv_row(r: RunResult, keys: Sequence[str]) -> list[Any]:
    dp, leak, canary = r.dp or {}, r.leakage or {}, r.canaries or {}
    cells = [
        r.run.point.name,
        *(r.run.point.value(k) for k in keys),
        r.run.seed,
        r.status,
        r.rounds_done,
        r.final_eval_loss,
        r.best_eval_loss,
        dp.get("epsilon"),
        dp.get("delta"),
        dp.get("accountant"),
        r.bytes_up,
        r.bytes_down,
        leak.get("round"),
        leak.get("attack"),
        leak.get("auc"),
        leak.get("tpr_at_1pct_fpr"),
        canary.get("round"),
        canary.get("inserted_mean"),
        canary.get("held_out_mean"),
        canary.get("epsilon_lower_bound"),
        round(r.seconds, 1),
        r.run.directory,
    ]
    return ["" if c is None else c for c in cells]


CSV_COLUMNS = (
    "seed",
    "status",
    "rounds_done",
    "final_eval_loss",
    "best_eval_loss",
    "epsilon",
    "delta",
    "accountant",
    "bytes_up_per_client_round",
    "bytes_down_per_client_round",
    "leakage_round",
    "leakage_attack",
    "leakage_auc",
    "leakage_tpr_at_1pct_fpr",
    "canary_round",
    "canary_exposure_inserted",
    "canary_exposure_held_out",
    "canary_epsilon_lower_bound",
    "round_seconds",
    "run_dir",
)
"""``results.csv``'s columns after ``point`` and the grid's keys. ε is client-level at
``delta`` under ``accountant`` (empty without DP); leakage is the attack with the highest AUC;
the canary columns are the last ``canaries-round-NNN.json``: the mean exposure (bits) of the
inserted and of the held-out canaries, and the one-run audit's ε lower bound (δ = 0)."""


def write_csv(results: Sequence[RunResult], path: Path) -> Path:
    """``results.csv``: one row per run."""
    keys = _keys(results)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["point", *keys, *CSV_COLUMNS])
        writer.writerows(_csv_row(r, keys) for r in results)
    return path


# --------------------------------------------------------------------------- per point

MEASURED = {
    "auc": "leakage",
    "tpr_at_1pct_fpr": "leakage",
    "inserted_mean": "canaries",
    "held_out_mean": "canaries",
    "epsilon_lower_bound": "canaries",
}
"""A measured figure -> the :class:`RunResult` field whose summary holds it."""


@dataclass
class PointStats:
    """One point's finished runs, summarised over seeds."""

    point: Point
    runs: list[RunResult]

    @property
    def finished(self) -> list[RunResult]:
        """The runs that hold every round."""
        return [r for r in self.runs if r.status == "finished"]

    def values(self, what: str) -> list[float]:
        """A finished run's figure (``final_eval_loss``, ``epsilon``, ``auc``,
        ``inserted_mean``, ...: a field or a key of :data:`MEASURED`), per seed, where there is
        one."""
        out = []
        for r in self.finished:
            if what in MEASURED:
                value = (getattr(r, MEASURED[what]) or {}).get(what)
            else:
                value = getattr(r, what, None)
            if value is not None:
                out.append(float(value))
        return out

    def mean_std(self, what: str) -> tuple[float, float] | None:
        """Mean and sample standard deviation (0 for one seed) over seeds, or None."""
        xs = self.values(what)
        if not xs:
            return None
        if not all(math.isfinite(x) for x in xs):  # ε without DP
            return math.inf, 0.0
        return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def point_stats(results: Sequence[RunResult]) -> list[PointStats]:
    """The results grouped by point, in the sweep's order."""
    groups: dict[str, PointStats] = {}
    for r in results:
        groups.setdefault(r.run.point.name, PointStats(r.run.point, [])).runs.append(r)
    return list(groups.values())


def _cell(stats: PointStats, what: str, spec: str, scale: float = 1.0) -> str:
    ms = stats.mean_std(what)
    if ms is None:
        return "-"
    mean, std = ms[0] * scale, ms[1] * scale
    if len(stats.values(what)) == 1:
        return f"{mean:{spec}}"
    return f"{mean:{spec}} ± {std:{spec}}"


def _epsilon_cell(stats: PointStats) -> str:
    if not stats.finished:
        return "-"
    dps = [r.dp for r in stats.finished if r.dp]
    if not dps:
        return "∞ (no DP)"
    cell = _cell(stats, "epsilon", ".3f")
    return f"{cell} (δ={dps[0]['delta']:g}, {dps[0]['accountant']})"


def _exposure_cell(stats: PointStats) -> str:
    """Mean exposure over seeds, inserted / held out (bits)."""
    means = [stats.mean_std(what) for what in ("inserted_mean", "held_out_mean")]
    if not any(means):
        return "-"
    return " / ".join("-" if m is None else f"{m[0]:.2f}" for m in means)


def _table_row(stats: PointStats, keys: Sequence[str], leakage: bool, canaries: bool) -> str:
    named = [stats.point.value(k) for k in keys] or [stats.point.name]
    cells = [
        *named,
        f"{len(stats.finished)}/{len(stats.runs)}",
        _cell(stats, "final_eval_loss", ".4f"),
        _cell(stats, "best_eval_loss", ".4f"),
        _epsilon_cell(stats),
        _cell(stats, "bytes_up", ".4g", 1e-6),
        _cell(stats, "bytes_down", ".4g", 1e-6),
    ]
    if leakage:
        cells += [_cell(stats, "auc", ".3f"), _cell(stats, "tpr_at_1pct_fpr", ".3f")]
    if canaries:
        cells += [_exposure_cell(stats), _cell(stats, "epsilon_lower_bound", ".2f")]
    cells.append(_cell(stats, "seconds", ".0f"))
    return "| " + " | ".join(cells) + " |"


def results_table(results: Sequence[RunResult]) -> str:
    """The Markdown table: one row per point, mean ± std over its finished seeds."""
    keys = _keys(results)
    leakage = any(r.leakage for r in results)
    canaries = any(r.canaries for r in results)
    header = [
        *(keys or ["point"]),
        "seeds done",
        "final eval loss",
        "best eval loss",
        "ε (δ, accountant)",
        "MB up/client/round",
        "MB down/client/round",
        *(("leakage AUC", "TPR @ 1% FPR") if leakage else ()),
        *(("canary exposure inserted / held out (bits)", "audit ε ≥") if canaries else ()),
        "s/run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_table_row(s, keys, leakage, canaries) for s in point_stats(results)]
    return "\n".join(lines)


def _assumptions(results: Sequence[RunResult]) -> list[str]:
    lines = [
        "Each cell: mean ± sample standard deviation over the finished seeds (one seed: its "
        "value). Eval loss: the global adapter's loss per answer token on the server's held-out "
        "set after the last round (final) and its lowest over rounds 1.. (best). Bytes: payload "
        "per client per round, averaged over rounds. s/run: the rounds' wall time.",
    ]
    dps = [
        (s.point.name, next((r.dp for r in s.finished if r.dp), None)) for s in point_stats(results)
    ]
    if any(dp for _, dp in dps):
        lines += ["", "ε of each point with DP (its first seed's assumptions):", ""]
        lines += [f"- {name}: {report.epsilon_line(dp)}" for name, dp in dps if dp]
    if any(r.leakage for r in results):
        lines.append(
            "\nLeakage: membership inference against the last round's adapter "
            "(`fedllama leakage`); per run, the attack with the highest overall AUC, and its "
            "TPR at 1 % FPR; the threat model and the members are in each run's "
            "leakage-round-NNN.json."
        )
    if any(r.canaries for r in results):
        lines.append(_canary_assumptions(results))
    return lines


def _canary_assumptions(results: Sequence[RunResult]) -> str:
    from fedllama.experiments.canaries import BASELINE_BITS  # its module loads torch

    most = sorted({r.canaries["max_bits"] for r in results if r.canaries})
    return (
        "\nCanaries (`fedllama canaries`, the last round): exposure is sampled (Carlini et al. "
        "2019, §4.2): each secret ranked among n random ones, at most log2(n+1) bits "
        f"({', '.join(f'{b:.2f}' for b in most)} here); a secret the model never saw has "
        f"{BASELINE_BITS:.2f} bits on average, where held-out canaries should sit. Audit ε ≥: "
        "the one-run lower bound (Steinke, Nasr & Jagielski 2023, Thm 3.1), pure ε-DP (δ = 0), "
        "95 % confidence, to set beside the accountant's ε at its δ; per seed, the exposures "
        "and the guesses are in each run's canaries-round-NNN.json."
    )


def write_tables(
    sweep: Sweep, results: Sequence[RunResult], plots: Sequence[str] = ()
) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` (the table, its assumptions, ``plots`` lines)."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(results, sweep.out / RESULTS_CSV)
    head = [
        f"# Sweep {sweep.out.name}",
        "",
        f"Base config: `{sweep.base}`; overrides for every run: "
        f"`{' '.join(sweep.overrides) or '(none)'}`; seeds {sweep.seeds} written to "
        f"{', '.join(f'`{k}`' for k in sweep.seed_keys)}. Every run: `{RESULTS_CSV}`.",
        "",
        results_table(results),
        "",
        *_assumptions(results),
    ]
    if plots:
        head += ["", "## Plots", "", *plots]
    md_path = sweep.out / RESULTS_MD
    md_path.write_text("\n".join(head) + "\n")
    return csv_path, md_path


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write (120 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(stats: Sequence[PointStats]) -> dict[str, list[PointStats]]:
    """Points grouped by strategy when ``strategy.name`` varies, else one group."""
    names = {s.point.values.get("strategy.name") for s in stats}
    if len(names) < 2:
        return {"": list(stats)}
    groups: dict[str, list[PointStats]] = {}
    for s in stats:
        groups.setdefault(str(s.point.values.get("strategy.name", "base")), []).append(s)
    return groups


def _log_epsilon(epsilons: Sequence[float]) -> bool:
    """ε drawn on a log axis: the finite values span two decades or more (a sweep of noise
    multipliers gives ε from tens to tens of thousands)."""
    finite = [e for e in epsilons if math.isfinite(e) and e > 0]
    return len(finite) >= 2 and max(finite) >= 100 * min(finite)


def _infinity(epsilons: Sequence[float]) -> float:
    """Where ε = ∞ (no DP) is drawn: right of the largest finite ε."""
    finite = [e for e in epsilons if math.isfinite(e)]
    if not finite or max(finite) <= 0:
        return 1.0
    return max(finite) * (8.0 if _log_epsilon(epsilons) else 1.25)


def _epsilon_axis(ax: Any, epsilons: Sequence[float]) -> None:
    """A log ε axis when ε spans decades; ε = ∞ (no DP) labelled at the right edge when a
    point has no DP."""
    right = _infinity(epsilons)
    if _log_epsilon(epsilons):
        ax.set_xscale("log")
        low = min(e for e in epsilons if math.isfinite(e) and e > 0)
        ax.set_xlim(low / 2, right * 2)
    if any(not math.isfinite(e) for e in epsilons):
        low_edge = ax.get_xlim()[0]
        gap = 0.5 if _log_epsilon(epsilons) else 0.9  # no tick crowding the ∞ label
        ticks = [t for t in ax.get_xticks() if max(0, low_edge) <= t < right * gap]
        ax.set_xticks([*ticks, right], [*(f"{t:g}" for t in ticks), "∞\n(no DP)"])


def _against_epsilon(
    ax: Any,
    stats: Sequence[PointStats],
    what: str,
    ylabel: str,
    marker: str = "o",
    label: str = "",
    colour: int = 0,
) -> None:
    """``what`` (mean ± std over seeds) against ε, a line per strategy through the points
    with DP; a point without DP is a lone marker at the right edge (ε = ∞). ``label``
    prefixes each line's legend entry and ``colour`` offsets its colour, for a second series
    on the same axes."""
    done = [s for s in stats if s.mean_std(what) is not None]
    eps = {s.point.name: (s.mean_std("epsilon") or (math.inf, 0.0))[0] for s in done}
    infinity = _infinity(list(eps.values()))
    for i, (strategy, group) in enumerate(_series(done).items()):
        group.sort(key=lambda s: eps[s.point.name])
        labelled = False
        for with_dp in (True, False):
            part = [s for s in group if math.isfinite(eps[s.point.name]) == with_dp]
            if not part:
                continue
            ms = [s.mean_std(what) or (math.nan, 0.0) for s in part]
            ax.errorbar(
                [eps[s.point.name] if with_dp else infinity for s in part],
                [m[0] for m in ms],
                yerr=[m[1] for m in ms],
                fmt=f"{marker}-" if with_dp else marker,
                color=f"C{colour + i}",
                capsize=3,
                label=None if labelled else " ".join(x for x in (label, strategy) if x),
            )
            labelled = True
    ax.set_xlabel("ε (client-level; no DP = ∞)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _epsilon_axis(ax, list(eps.values()))


def _dp_caption(stats: Sequence[PointStats]) -> str:
    dp = next((r.dp for s in stats for r in s.finished if r.dp), None)
    return f" (δ = {dp['delta']:g}, {dp['accountant']} accountant)" if dp else ""


def plot_utility_vs_epsilon(stats: Sequence[PointStats], path: Path) -> Path:
    """Final eval loss (mean ± std over seeds) against ε, one line per strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    _against_epsilon(ax, stats, "final_eval_loss", "final global eval loss")
    ax.set_title("utility against privacy" + _dp_caption(stats))
    if len(_series(stats)) > 1:
        ax.legend()
    return _save(plt, fig, path)


def plot_leakage_vs_epsilon(stats: Sequence[PointStats], path: Path) -> Path:
    """Membership-inference AUC and TPR at 1 % FPR (mean ± std over seeds) against ε."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _against_epsilon(left, stats, "auc", "attack AUC (best attack)")
    left.axhline(0.5, color="grey", ls=":", label="chance")
    _against_epsilon(right, stats, "tpr_at_1pct_fpr", "TPR at 1 % FPR", marker="s")
    right.axhline(0.01, color="grey", ls=":", label="chance")
    if all(s.mean_std("tpr_at_1pct_fpr") is None for s in stats):
        note = "n/a at every point:\nTPR at 1 % FPR needs ≥ 100 non-members"
        right.text(0.5, 0.5, note, ha="center", va="center", transform=right.transAxes)
    left.legend()
    fig.suptitle("membership inference against privacy" + _dp_caption(stats))
    return _save(plt, fig, path)


def plot_canaries_vs_epsilon(stats: Sequence[PointStats], path: Path) -> Path:
    """Mean exposure of the inserted and of the held-out canaries (mean ± std over seeds)
    against ε, with the exposure of a secret never seen."""
    from fedllama.experiments.canaries import BASELINE_BITS  # its module loads torch

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ylabel = "mean canary exposure (bits)"
    _against_epsilon(ax, stats, "inserted_mean", ylabel, label="inserted")
    lines = len(_series([s for s in stats if s.values("inserted_mean")]))
    _against_epsilon(ax, stats, "held_out_mean", ylabel, "s", label="held out", colour=lines)
    ax.axhline(BASELINE_BITS, color="grey", ls=":", label=f"never seen ({BASELINE_BITS:.2f})")
    ax.legend()
    ax.set_title("canary exposure against privacy" + _dp_caption(stats))
    return _save(plt, fig, path)


def _bar_label(point: Point) -> str:
    """The strategy, then each other override as ``last key part=value``, a line each."""
    others = [
        f"{k.rsplit('.', 1)[-1]}={point.value(k)}" for k in point.values if k != "strategy.name"
    ]
    return "\n".join([str(point.values.get("strategy.name", "(base)")), *others])


def plot_utility_per_strategy(stats: Sequence[PointStats], path: Path) -> Path:
    """Final eval loss per point (bars, std over seeds as error bars), ordered by strategy."""
    plt = _pyplot()
    done = [s for s in stats if s.mean_std("final_eval_loss") is not None]
    done.sort(key=lambda s: str(s.point.values.get("strategy.name", "")))
    labels = [_bar_label(s.point) for s in done]
    ms = [s.mean_std("final_eval_loss") or (math.nan, 0.0) for s in done]
    lines = max(label.count("\n") for label in labels)
    fig, ax = plt.subplots(
        figsize=(max(6.0, (1.6 if lines else 0.9) * len(done)), 4.5 + 0.2 * lines)
    )
    bars = ax.bar(range(len(done)), [m[0] for m in ms], yerr=[m[1] for m in ms], capsize=3)
    ax.bar_label(bars, [f"{m[0]:.4f}" for m in ms], fontsize=8)
    low, high = min(m[0] - m[1] for m in ms), max(m[0] + m[1] for m in ms)
    pad = max((high - low) * 0.25, abs(high) * 1e-3)
    ax.set_ylim(low - pad, high + pad)  # the differences, not the distance from 0
    ax.set_xticks(
        range(len(done)),
        labels,
        rotation=30 if not lines else 0,
        ha="right" if not lines else "center",
        fontsize=8 if lines else None,
    )
    ax.set_ylabel("final global eval loss (axis not from 0)")
    ax.set_title("utility per strategy (mean ± std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, path)


def write_plots(sweep: Sweep, stats: Sequence[PointStats]) -> list[str]:
    """Each plot whose axis varies; a Markdown line per plot, written or skipped (and why)."""
    epsilons = {round(m[0], 6) for s in stats if (m := s.mean_std("epsilon")) is not None}
    strategies = {s.point.values.get("strategy.name") for s in stats if s.finished}
    measured = any(s.values("auc") for s in stats)
    canaries = any(s.values("inserted_mean") for s in stats)
    lines = []
    plots = (
        ("utility-vs-epsilon.png", "eval loss against ε", plot_utility_vs_epsilon,
         "ε is the same at every point" if len(epsilons) < 2 else ""),
        ("leakage-vs-epsilon.png", "leakage against ε", plot_leakage_vs_epsilon,
         "no leakage measured (leakage.enabled)" if not measured
         else "ε is the same at every point" if len(epsilons) < 2 else ""),
        ("canaries-vs-epsilon.png", "canary exposure against ε", plot_canaries_vs_epsilon,
         "no canaries measured (canaries: true)" if not canaries
         else "ε is the same at every point" if len(epsilons) < 2 else ""),
        ("utility-per-strategy.png", "eval loss per strategy", plot_utility_per_strategy,
         "strategy.name does not vary" if len(strategies) < 2 else ""),
    )  # fmt: skip
    for name, title, plot, skip in plots:
        if skip:
            lines.append(f"- {title}: skipped ({skip})")
            continue
        plot(stats, sweep.out / name)
        lines.append(f"- {title}: ![{title}]({name})")
    return lines


def write_results(sweep: Sweep, results: Sequence[RunResult]) -> list[Path]:
    """``results.csv``, ``results.md`` and the plots whose axes vary."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(sweep, point_stats(results))
    return [*write_tables(sweep, results, plots)]
