"""Metrics rows -> a loss-per-round plot, a terminal summary, and a comparison across runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedllama.server.metrics import MetricsRow

Series = tuple[str, str, list[tuple[int, float]]]  # label, matplotlib style, (round, value)


def _plot(
    series: list[Series],
    path: Path,
    title: str,
    ylabel: str,
    right: tuple[str, list[tuple[int, float]]] | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, style, pts in series:
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        label, pts = right
        twin = ax.twinx()
        twin.plot([p[0] for p in pts], [p[1] for p in pts], "^:", color="tab:red", label=label)
        twin.set_ylabel("ε (client-level)")
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _eval_points(rows: list[MetricsRow]) -> list[tuple[int, float]]:
    return [(r.round, r.eval_loss) for r in rows if _finite(r.eval_loss)]


def _train_points(rows: list[MetricsRow]) -> list[tuple[int, float]]:
    return [
        (r.round, r.train_loss) for r in rows if r.train_loss is not None and _finite(r.train_loss)
    ]


def _epsilon_points(rows: list[MetricsRow]) -> list[tuple[int, float]]:
    return [
        (r.round, float(r.dp["epsilon"]))
        for r in rows
        if r.dp is not None and r.dp.get("epsilon") is not None
    ]


def plot_losses(rows: list[MetricsRow], path: Path, title: str = "fedllama") -> Path:
    """Eval and train loss per round as a PNG; with DP, ε per round on a second axis."""
    series = [
        ("global eval loss", "o-", _eval_points(rows)),
        ("client train loss (during the round)", "s--", _train_points(rows)),
    ]
    epsilon = _epsilon_points(rows)
    if epsilon:
        dp = next(r.dp for r in rows if r.dp is not None)
        label = f"ε at δ={dp['delta']:g} ({dp['accountant']}, {dp['sampling']} sampling)"
        return _plot(series, path, title, "loss (per answer token)", (label, epsilon))
    return _plot(series, path, title, "loss (per answer token)")


def _loss(x: float | None, width: int) -> str:
    return f"{x:>{width}.4f}" if x is not None and _finite(x) else f"{'-':>{width}}"


def summary(rows: list[MetricsRow]) -> str:
    """A short table: eval loss, train loss, bytes and seconds per round."""
    dp = any(r.dp is not None for r in rows)
    header = ("round", "eval_loss", "train_loss", "MB up", "MB down", "s") + (("ε",) if dp else ())
    widths = (5, 9, 10, 7, 7, 6) + ((8,) if dp else ())
    lines = ["  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True))]
    for r in rows:
        line = (
            f"{r.round:>5}  {_loss(r.eval_loss, 9)}  {_loss(r.train_loss, 10)}  "
            f"{r.bytes_up / 1e6:>7.2f}  {r.bytes_down / 1e6:>7.2f}  {r.seconds:>6.1f}"
        )
        if dp:
            eps = r.dp.get("epsilon") if r.dp else None
            line += f"  {eps:>8.3f}" if eps is not None else f"  {'-':>8}"
        lines.append(line)
    evals = [r for r in rows if _finite(r.eval_loss)]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        change = last.eval_loss - first.eval_loss
        lines.append(
            f"eval loss {first.eval_loss:.4f} (round {first.round}) -> "
            f"{last.eval_loss:.4f} (round {last.round}): {change:+.4f}"
        )
    last_dp = next((r.dp for r in reversed(rows) if r.dp and r.dp.get("epsilon") is not None), None)
    if last_dp is not None:
        lines.append(_epsilon_line(last_dp))
    return "\n".join(lines)


def _epsilon_line(dp: dict[str, Any]) -> str:
    """ε with the assumptions it rests on."""
    sampling = dp["sampling"] + (f" q={dp['sampling_rate']:g}" if dp.get("sampling_rate") else "")
    noise = f"{dp['placement']} Gaussian noise"
    if dp.get("distributed"):
        dist = dp["distributed"]
        noise = (
            f"distributed discrete Gaussian noise modulo 2^{dist['bits']} from the "
            f"{dist['survivors']} clients in the last sum"
        )
    return (
        f"ε = {dp['epsilon']:.3f} at δ = {dp['delta']:g} ({dp['accountant']} accountant; "
        f"privacy unit: one {dp['unit']}; {noise} z = "
        f"{dp['noise_multiplier']:.4g} on updates clipped to C = {dp['clip_norm']:g}; "
        f"{sampling} sampling; the clients' metrics are sent in the clear and not covered)"
    )


def _comparison_row(name: str, rows: list[MetricsRow], rounds: int) -> str:
    """One strategy's cells: eval per round, its change, the clients' own eval after the last
    round, upload and download per client per round, seconds per round."""
    evals = [r.eval_loss if _finite(r.eval_loss) else None for r in rows]
    cells = [f"{e:.4f}" if e is not None else "-" for e in evals]
    cells += ["-"] * (rounds - len(cells))
    trained = [r for r in rows if r.round > 0]
    first, final = (evals[0], evals[-1]) if evals else (None, None)
    change = f"{final - first:+.4f}" if first is not None and final is not None else "-"
    n = max(len(trained), 1)
    up = sum(r.bytes_up / max(r.clients_ok, 1) for r in trained) / n / 1e6
    sent_to = [max(r.clients_ok + r.clients_dropped, 1) for r in trained]
    down = sum(r.bytes_down / m for r, m in zip(trained, sent_to, strict=True)) / n / 1e6
    secs = sum(r.seconds for r in trained) / n
    client_eval = trained[-1].client_eval_loss if trained else None
    client = f"{client_eval:.4f}" if client_eval is not None and _finite(client_eval) else "-"
    row = [*cells, change, client, f"{up:.2f}", f"{down:.2f}", f"{secs:.0f}"]
    return f"| {name} | " + " | ".join(row) + " |"


def comparison_table(runs: dict[str, list[MetricsRow]]) -> str:
    """Markdown table: global eval loss per round and its change, the clients' own eval loss
    after the last round, upload and download per client per round, seconds per round."""
    rounds = max((len(rows) for rows in runs.values()), default=0)
    header = [
        "strategy",
        *[f"eval r{i}" for i in range(rounds)],
        "Δ eval",
        "client eval (last)",
        "MB up/client/round",
        "MB down/client/round",
        "s/round",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_comparison_row(name, rows, rounds) for name, rows in runs.items()]
    return "\n".join(lines)


def plot_comparison(runs: dict[str, list[MetricsRow]], path: Path) -> Path:
    """Global eval loss per round, one line per strategy."""
    series = [(name, "o-", _eval_points(rows)) for name, rows in runs.items()]
    return _plot(series, path, "merge strategies", "global eval loss (per answer token)")
