"""Metrics -> a loss-per-round plot and a terminal summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Series = tuple[str, str, list[tuple[int, float]]]  # label, matplotlib style, (round, value)


def _plot(series: list[Series], path: Path, title: str, ylabel: str) -> Path:
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["round"]), float(r[key])) for r in rows if _finite(r.get(key))]


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "fedllama") -> Path:
    """Eval and train loss per round as a PNG."""
    series = [
        ("global eval loss", "o-", _points(rows, "eval_loss")),
        ("client train loss (during the round)", "s--", _points(rows, "train_loss")),
    ]
    return _plot(series, path, title, "loss (per answer token)")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summary(rows: list[dict[str, Any]]) -> str:
    """A short table: eval loss, train loss, bytes and seconds per round."""
    header = ("round", "eval_loss", "train_loss", "MB up", "MB down", "s")
    widths = (5, 9, 10, 7, 7, 6)
    lines = ["  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True))]
    for r in rows:
        ev = f"{r['eval_loss']:.4f}" if _finite(r.get("eval_loss")) else "-"
        tr = f"{r['train_loss']:.4f}" if _finite(r.get("train_loss")) else "-"
        lines.append(
            f"{r['round']:>5}  {ev:>9}  {tr:>10}  {r.get('bytes_up', 0) / 1e6:>7.2f}  "
            f"{r.get('bytes_down', 0) / 1e6:>7.2f}  {r.get('seconds', 0):>6.1f}"
        )
    evals = [r for r in rows if _finite(r.get("eval_loss"))]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        change = last["eval_loss"] - first["eval_loss"]
        lines.append(
            f"eval loss {first['eval_loss']:.4f} (round {first['round']}) -> "
            f"{last['eval_loss']:.4f} (round {last['round']}): {change:+.4f}"
        )
    return "\n".join(lines)


def comparison_table(runs: dict[str, list[dict[str, Any]]]) -> str:
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
    for name, rows in runs.items():
        evals = [r["eval_loss"] if _finite(r.get("eval_loss")) else None for r in rows]
        cells = [f"{e:.4f}" if e is not None else "-" for e in evals]
        cells += ["-"] * (rounds - len(cells))
        trained = [r for r in rows if r["round"] > 0]
        first, final = (evals[0], evals[-1]) if evals else (None, None)
        change = f"{final - first:+.4f}" if first is not None and final is not None else "-"
        n = max(len(trained), 1)
        up = sum(r["bytes_up"] / max(r.get("clients_ok", 1), 1) for r in trained) / n / 1e6
        sent_to = [max(r.get("clients_ok", 1) + r.get("clients_dropped", 0), 1) for r in trained]
        down = sum(r["bytes_down"] / m for r, m in zip(trained, sent_to, strict=True)) / n / 1e6
        secs = sum(r["seconds"] for r in trained) / n
        client_eval = trained[-1].get("client_eval_loss") if trained else None
        client = f"{client_eval:.4f}" if _finite(client_eval) else "-"
        row = [*cells, change, client, f"{up:.2f}", f"{down:.2f}", f"{secs:.0f}"]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_comparison(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Global eval loss per round, one line per strategy."""
    series = [(name, "o-", _points(rows, "eval_loss")) for name, rows in runs.items()]
    return _plot(series, path, "merge strategies", "global eval loss (per answer token)")
