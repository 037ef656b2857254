"""Metrics rows -> a loss-per-round plot, a terminal summary, a comparison across runs, and
a run directory's report (``report.md``, ``report.html``, plots; ``fedllama report``)."""

from __future__ import annotations

import argparse
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from fedllama.config import Config, ConfigError, from_yaml
from fedllama.errors import UserError
from fedllama.server.metrics import METRICS, MetricsRow, read_rows

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


def plot_losses(
    rows: list[MetricsRow], path: Path, title: str = "fedllama", extra: Sequence[Series] = ()
) -> Path:
    """Eval and train loss per round as a PNG; with DP, ε per round on a second axis;
    ``extra`` series (a baseline's curve) beside them."""
    series = [
        ("global eval loss", "o-", _eval_points(rows)),
        ("client train loss (during the round)", "s--", _train_points(rows)),
        *extra,
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
        lines.append(epsilon_line(last_dp))
    return "\n".join(lines)


def epsilon_line(dp: dict[str, Any]) -> str:
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


def bytes_per_client(rows: list[MetricsRow]) -> tuple[float, float]:
    """Bytes up and down per client per trained round, averaged over the rounds: a round's
    upload is shared by the clients counted, its download by every client sent the model
    (counted and dropped)."""
    trained = [r for r in rows if r.round > 0]
    n = max(len(trained), 1)
    up = sum(r.bytes_up / max(r.clients_ok, 1) for r in trained) / n
    down = sum(r.bytes_down / max(r.clients_ok + r.clients_dropped, 1) for r in trained) / n
    return up, down


def _comparison_row(name: str, rows: list[MetricsRow], rounds: int) -> str:
    """One strategy's cells: eval per round, its change, the clients' own eval after the last
    round, upload and download per client per round, seconds per round."""
    evals = [r.eval_loss if _finite(r.eval_loss) else None for r in rows]
    cells = [f"{e:.4f}" if e is not None else "-" for e in evals]
    cells += ["-"] * (rounds - len(cells))
    trained = [r for r in rows if r.round > 0]
    first, final = (evals[0], evals[-1]) if evals else (None, None)
    change = f"{final - first:+.4f}" if first is not None and final is not None else "-"
    up, down = (b / 1e6 for b in bytes_per_client(rows))
    secs = sum(r.seconds for r in trained) / max(len(trained), 1)
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


# --------------------------------------------------------------------------- the run report

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = {
    "loss": "loss.png",
    "bytes": "bytes.png",
    "epsilon": "epsilon.png",
    "leakage": "leakage.png",
}
"""The run report's plots, written beside it (``loss.png`` is the one a run always had)."""


NOT_A_RUN_HINT = (
    "pass a run's directory: the output.dir it ran with (e.g. runs/demo), holding metrics.jsonl"
)
"""What to do about a directory that holds no run (a :class:`ReportError`'s default hint)."""


class ReportError(UserError, ValueError):
    """A directory holds no run to report on (or its files cannot be read); ``hint`` says
    what to do."""

    def __init__(self, message: str, hint: str = NOT_A_RUN_HINT) -> None:
        super().__init__(message, hint)


@dataclass(frozen=True)
class Block:
    """One block of the report, rendered as Markdown and as HTML.

    ``kind`` is ``h1``, ``h2``, ``p`` (a paragraph), ``code`` (``text`` verbatim), ``ul``
    (``rows`` are one-cell items), ``table`` (``rows[0]`` is the header) or ``img`` (``text``
    is the alt text, ``rows[0][0]`` the file).
    """

    kind: str
    text: str = ""
    rows: tuple[tuple[str, ...], ...] = ()


def to_markdown(blocks: list[Block]) -> str:
    """The blocks as Markdown, a blank line between them."""
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"{'#' * int(b.kind[1])} {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "code":
            out.append(f"```{b.rows[0][0] if b.rows else ''}\n{b.text.rstrip()}\n```")
        elif b.kind == "ul":
            out.append("\n".join(f"- {item[0]}" for item in b.rows))
        elif b.kind == "table":
            head, *body = b.rows
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out.append("\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]))
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.rows[0][0]})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def to_html(blocks: list[Block], title: str) -> str:
    """The blocks as one self-contained HTML page (the images beside it)."""
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "code":
            out.append(f"<pre><code>{html.escape(b.text.rstrip())}</code></pre>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i[0])}</li>" for i in b.rows) + "</ul>")
        elif b.kind == "table":
            head, *body = b.rows
            cells = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
            cells += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("<table>" + "".join(cells) + "</table>")
        elif b.kind == "img":
            out.append(
                f'<p><img src="{html.escape(b.rows[0][0])}" alt="{html.escape(b.text)}"></p>'
            )
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}pre{background:#f6f6f6;padding:8px;overflow-x:auto}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def _num(x: float | None, spec: str) -> str:
    return f"{x:{spec}}" if x is not None and _finite(x) else "-"


def _round_cells(r: MetricsRow, dp: bool) -> tuple[str, ...]:
    sent = max(r.clients_ok + r.clients_dropped, 1)
    eps = r.dp.get("epsilon") if r.dp else None
    note = f"skipped: {r.skipped}" if r.skipped else f"rejected: {r.rejected}" if r.rejected else ""
    cells = [
        str(r.round),
        _num(r.train_loss, ".4f"),
        _num(r.eval_loss, ".4f"),
        _num(r.client_eval_loss, ".4f"),
        str(r.clients_ok),
        str(r.clients_dropped),
        f"{r.bytes_up / max(r.clients_ok, 1) / 1e6:.4g}" if r.round else "-",
        f"{r.bytes_down / sent / 1e6:.4g}" if r.round else "-",
        f"{r.seconds:.1f}",
        *((_num(eps, ".3f"),) if dp else ()),
        note.replace("|", "/"),
    ]
    return tuple(cells)


def round_table(rows: list[MetricsRow]) -> Block:
    """The per-round table: losses, clients counted and dropped, MB per client, s, ε."""
    dp = any(r.dp is not None for r in rows)
    header = (
        "round",
        "train loss",
        "eval loss",
        "client eval loss",
        "clients ok",
        "dropped",
        "MB up/client",
        "MB down/client",
        "s",
        *(("ε",) if dp else ()),
        "note",
    )
    return Block("table", rows=(header, *(_round_cells(r, dp) for r in rows)))


def _bytes_points(rows: list[MetricsRow]) -> tuple[list[tuple[int, float]], ...]:
    trained = [r for r in rows if r.round > 0]
    up = [(r.round, r.bytes_up / max(r.clients_ok, 1) / 1e6) for r in trained]
    sent = [max(r.clients_ok + r.clients_dropped, 1) for r in trained]
    down = [(r.round, r.bytes_down / m / 1e6) for r, m in zip(trained, sent, strict=True)]
    return up, down


def _read_rounds(run_dir: Path, prefix: str) -> dict[int, dict[str, Any]]:
    """Round -> the ``<prefix>-round-NNN.json`` in ``run_dir``, in round order."""
    found = {}
    for path in run_dir.glob(f"{prefix}-round-*.json"):
        number = path.stem.removeprefix(f"{prefix}-round-")
        if number.isdigit():
            found[int(number)] = json.loads(path.read_text())
    return dict(sorted(found.items()))


def read_leakage(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Round -> the ``leakage-round-NNN.json`` measurement in ``run_dir`` (``fedllama
    leakage``), in round order."""
    return _read_rounds(run_dir, "leakage")


def read_canaries(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Round -> the ``canaries-round-NNN.json`` measurement in ``run_dir`` (``fedllama
    canaries``: exposure and the one-run ε lower bound), in round order."""
    return _read_rounds(run_dir, "canaries")


# --------------------------------------------------------------------------- baselines

BASELINES = {"centralized": "baselines/centralized.json", "local": "baselines/local.json"}
"""Where ``fedllama baseline`` writes its results in a run directory (``model/baseline.py``)."""
_BASELINE_KEYS = {
    "centralized": {"config", "eval0", "eval_loss", "steps", "assumption", "curve"},
    "local": {"config", "clients", "steps_per_client", "mean"},
}
SHARE_FORMULA = "(eval₀ − eval_fed) / (eval₀ − eval_central)"


def share_of_gain(eval0: float, federated: float, central: float) -> float | None:
    """The share of the centralized gain a federated run reached, ``(eval0 − federated) /
    (eval0 − central)``; None when the centralized baseline gained nothing."""
    gain = eval0 - central
    if not (_finite(eval0) and _finite(federated) and _finite(central)) or gain <= 0:
        return None
    return (eval0 - federated) / gain


def baseline_differences(recorded: dict[str, Any], cfg: Config, limit: int = 3) -> str:
    """``key: baseline's value, run's value`` for the first ``limit`` of a baseline's recorded
    config keys (dotted, e.g. ``train.lr``) that the run's config does not share ("" when all
    match)."""
    differ = []
    for dotted, value in recorded.items():
        here: Any = cfg
        for part in dotted.split("."):
            here = getattr(here, part, None)
        if is_dataclass(here) and not isinstance(here, type):  # a nested section (data.canary)
            here = asdict(here)
        if json.loads(json.dumps(here, default=str)) != value:
            differ.append(f"{dotted}: {value!r} in the baseline, {here!r} in the run")
    more = f"; and {len(differ) - limit} more" if len(differ) > limit else ""
    return "; ".join(differ[:limit]) + more


def read_baselines(run_dir: Path, cfg: Config | None) -> tuple[dict[str, dict[str, Any]], str]:
    """Kind -> the baseline JSON in ``run_dir/baselines`` that was measured under the run's
    config, and a note naming any that was not (left out)."""
    found, notes = {}, []
    for kind, name in BASELINES.items():
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            measured = json.loads(path.read_text())
            missing = sorted(_BASELINE_KEYS[kind] - set(measured))
        except (ValueError, TypeError) as err:  # not JSON, or not an object
            missing = [f"({type(err).__name__})"]
        if missing:
            notes.append(f"{name} left out: not a baseline (no {', '.join(missing)})")
            continue
        differ = baseline_differences(measured["config"], cfg) if cfg else "no config.yaml"
        if differ:
            notes.append(f"{name} left out: measured under another config ({differ})")
        else:
            found[kind] = measured
    return found, "; ".join(notes)


def _baseline_items(rows: list[MetricsRow], baselines: dict[str, dict[str, Any]]) -> list[str]:
    items = []
    kept = [r for r in rows if _finite(r.eval_loss) and not (r.rejected or r.skipped)]
    fed = kept[-1] if kept else None  # the global adapter the run ended with
    central = baselines.get("centralized")
    if central is not None:
        eval0 = float(central["eval0"])
        items.append(f"eval₀ (the initial adapter, round 0): {eval0:.4f}")
        if fed is not None:
            items.append(f"federated (round {fed.round}): {fed.eval_loss:.4f}")
        items.append(
            f"centralized (pooled data, {central['steps']} steps: {central['assumption']}): "
            f"{float(central['eval_loss']):.4f}"
        )
        first = rows[0] if rows and rows[0].round == 0 else None
        # eval₀ and round 0 are the same adapter on the same set: a gap means they were scored
        # differently (another version, device or dtype) and the share is off by as much
        if first is not None and _finite(first.eval_loss) and abs(first.eval_loss - eval0) > 1e-3:
            items.append(f"note: the run's round 0 eval loss is {first.eval_loss:.4f}, not eval₀")
        share = share_of_gain(eval0, fed.eval_loss, central["eval_loss"]) if fed else None
        items.append(
            f"share of the centralized gain {SHARE_FORMULA} = "
            + (f"{share:.1%}" if share is not None else "- (no centralized gain)")
        )
    local = baselines.get("local")
    if local is not None:
        mean = local["mean"]
        items.append(
            f"local-only ({len(local['clients'])} clients alone, {local['steps_per_client']} "
            f"steps each), mean weighted by {mean['weights']}: global eval "
            f"{mean['global_eval_loss']:.4f}, own eval {mean['own_eval_loss']:.4f}"
        )
    return items


def _baseline_blocks(rows: list[MetricsRow], run_dir: Path, cfg: Config | None) -> list[Block]:
    baselines, note = read_baselines(run_dir, cfg)
    if not baselines and not note:
        return []
    blocks = [Block("h2", "Baselines (`fedllama baseline`)")]
    items = _baseline_items(rows, baselines)
    if items:
        blocks.append(Block("ul", rows=tuple((item,) for item in items)))
    if note:
        blocks.append(Block("p", note))
    return blocks


def baseline_summary(run_dir: Path) -> list[str]:
    """The report's baseline lines for ``run_dir`` (none when it holds no baseline)."""
    _, cfg = _read_config(run_dir)
    baselines, note = read_baselines(run_dir, cfg)
    return _baseline_items(read_rows(run_dir), baselines) + ([note] if note else [])


def _centralized_curve(run_dir: Path, cfg: Config | None) -> list[Series]:
    central = read_baselines(run_dir, cfg)[0].get("centralized")
    if central is None:
        return []
    points = [(int(r), float(loss)) for r, loss in central["curve"] if _finite(float(loss))]
    return [("centralized baseline eval loss", "d-.", points)]


def _run_plots(
    rows: list[MetricsRow],
    leakage: dict[int, dict[str, Any]],
    run_dir: Path,
    title: str,
    extra: Sequence[Series] = (),
) -> list[Block]:
    """The report's plots, written into ``run_dir``: an image block each."""
    loss = plot_losses(rows, run_dir / PLOTS["loss"], title, extra)
    made = [("eval and train loss per round", loss)]
    up, down = _bytes_points(rows)
    if up:
        series = [("upload per client", "o-", up), ("download per client", "s--", down)]
        path = _plot(series, run_dir / PLOTS["bytes"], "payload per round", "MB per client")
        made.append(("payload per client per round", path))
    epsilon = _epsilon_points(rows)
    if epsilon:
        dp = next(r.dp for r in rows if r.dp is not None)
        label = f"ε at δ={dp['delta']:g} ({dp['accountant']})"
        path = _plot([(label, "^-", epsilon)], run_dir / PLOTS["epsilon"], "privacy spent", "ε")
        made.append(("ε after each round", path))
    if leakage:
        attacks = next(iter(leakage.values()))["overall"]["attacks"]
        series = [
            (name, "o-", [(n, m["overall"]["attacks"][name]["auc"]) for n, m in leakage.items()])
            for name in attacks
        ]
        path = _plot(
            series, run_dir / PLOTS["leakage"], "membership inference", "AUC (0.5 = chance)"
        )
        made.append(("membership-inference AUC per attacked round", path))
    return [Block("img", alt, ((path.name,),)) for alt, path in made]


def _summary_items(rows: list[MetricsRow], cfg: Config | None) -> list[str]:
    """The run in a few lines: what ran, how far, the loss, the traffic, ε."""
    items = []
    trained = [r for r in rows if r.round > 0]
    if cfg is not None:
        items.append(
            f"strategy `{cfg.strategy.name}` on `{cfg.model.path or cfg.model.name}` "
            f"({cfg.model.quantization}), LoRA r = {cfg.lora.r}, "
            f"{cfg.simulation.num_clients} simulated clients; "
            f"{len(trained)}/{cfg.server.rounds} rounds done"
        )
    evals = [r for r in rows if _finite(r.eval_loss)]
    if evals:
        first, last = evals[0], evals[-1]
        best = min(evals, key=lambda r: r.eval_loss)
        items.append(
            f"global eval loss {first.eval_loss:.4f} (round {first.round}) -> "
            f"{last.eval_loss:.4f} (round {last.round}): {last.eval_loss - first.eval_loss:+.4f};"
            f" lowest {best.eval_loss:.4f} (round {best.round})"
        )
    if trained:
        up, down = bytes_per_client(rows)
        items.append(
            f"payload per client per round: {up / 1e6:.4g} MB up, {down / 1e6:.4g} MB down; "
            f"{sum(r.clients_dropped for r in trained)} replies dropped; "
            f"{sum(r.seconds for r in rows):.0f} s in rounds"
        )
    failed = [r.round for r in trained if r.skipped or r.rejected]
    if failed:
        items.append(f"rounds skipped or rejected (adapter kept): {failed}")
    last_dp = next((r.dp for r in reversed(rows) if r.dp and r.dp.get("epsilon") is not None), None)
    items.append(epsilon_line(last_dp) if last_dp is not None else "no differential privacy")
    return items


def _ci_cell(value: float | None, ci: list[float] | None, note: str | None = None) -> str:
    if value is None:
        return note or "-"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _leakage_blocks(server_round: int, m: dict[str, Any]) -> list[Block]:
    """One leakage measurement: the threat model, the overall table, the client-level test."""
    overall = m["overall"]
    header = ("attack", "AUC [95% CI]", "TPR @ 1% FPR", "TPR @ 0.1% FPR")
    body = [
        (
            f"{name} ({m['attacks'][name]['paper']})" if name in m.get("attacks", {}) else name,
            _ci_cell(a["auc"], a.get("auc_ci95")),
            *(
                _ci_cell(a.get(k), a.get(f"{k}_ci95"), a.get(f"{k}_note"))
                for k in ("tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")
            ),
        )
        for name, a in overall["attacks"].items()
    ]
    verdicts = [
        (
            f"client {c['client_id']}: p = {c['client_level']['p_value']:.4f} -> "
            + ("took part (detected)" if c["client_level"]["took_part"] else "not detected"),
        )
        for c in m.get("clients", [])
        if "client_level" in c
    ]
    blocks = [
        Block("h2", f"Leakage at round {server_round}"),
        Block(
            "p",
            f"Threat model: {m.get('threat_model', '-')}. {overall['members']} members, "
            f"{overall['non_members']} non-members; {m.get('score_orientation', '')}.",
        ),
        Block("table", rows=(header, *body)),
    ]
    if verdicts:
        blocks += [Block("p", "Client-level inference:"), Block("ul", rows=tuple(verdicts))]
    return blocks


def _read_config(run_dir: Path) -> tuple[str, Config | None]:
    from fedllama.server.checkpoint import CONFIG  # torch and peft: only when a report is made

    path = run_dir / CONFIG
    if not path.is_file():
        return "", None
    text = path.read_text()
    try:
        return text, from_yaml(text)
    except ConfigError:
        return text, None  # a config of another version: shown as it is


def run_report(run_dir: Path, plots: bool = True) -> list[Block]:
    """The report's blocks; with ``plots`` its PNG files are written into ``run_dir``.

    Raises:
        ReportError: ``run_dir`` holds no ``metrics.jsonl`` rows.
    """
    rows = read_rows(run_dir)
    if not rows:
        raise ReportError(f"{run_dir} is not a run directory: no rows in {METRICS}")
    text, cfg = _read_config(run_dir)
    leakage = read_leakage(run_dir)
    title = f"fedllama: {cfg.strategy.name}" if cfg is not None else "fedllama"
    blocks = [
        Block("h1", f"Run report: {run_dir}"),
        Block("h2", "Summary"),
        Block("ul", rows=tuple((item,) for item in _summary_items(rows, cfg))),
        Block("h2", "Per round"),
        Block("p", "Round 0 is the initial adapter. MB per client: upload shared by the "
                   "clients counted, download by every client sent the model."),
        round_table(rows),
    ]  # fmt: skip
    blocks += _baseline_blocks(rows, run_dir, cfg)
    if plots:
        curve = _centralized_curve(run_dir, cfg)
        blocks += [Block("h2", "Plots"), *_run_plots(rows, leakage, run_dir, title, curve)]
    for server_round, measured in leakage.items():
        blocks += _leakage_blocks(server_round, measured)
    if text:
        blocks += [
            Block("h2", "Config (`config.yaml`, resolved)"),
            Block("code", text, (("yaml",),)),
        ]
    return blocks


def write_run_report(run_dir: Path, plots: bool = True, html_too: bool = True) -> Path:
    """``run_dir/report.md`` (and ``report.html``) with the plots beside it; its path.

    Raises:
        ReportError: ``run_dir`` holds no ``metrics.jsonl`` rows.
    """
    blocks = run_report(run_dir, plots)
    path = run_dir / REPORT_MD
    path.write_text(to_markdown(blocks))
    if html_too:
        (run_dir / REPORT_HTML).write_text(to_html(blocks, f"fedllama run {run_dir.name}"))
    return path


def add_report_command(sub: Any) -> None:
    """``fedllama report RUN_DIR [--no-plots] [--no-html]``."""
    p = sub.add_parser("report", help="write a run directory's report.md (and report.html)")
    p.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/demo")
    p.add_argument("--no-plots", action="store_true", help="the tables only")
    p.add_argument("--no-html", action="store_true", help="report.md only")


def report_command(args: argparse.Namespace) -> int:
    """``fedllama report``: write the report and print its path.

    Raises:
        ReportError: ``args.run_dir`` holds no run, or its files cannot be read (``fedllama``
            prints it and its hint, exit code 2).
    """
    try:
        path = write_run_report(args.run_dir, not args.no_plots, not args.no_html)
    except UserError:
        raise
    except (ValueError, OSError) as err:  # a damaged metrics.jsonl: ValueError
        raise ReportError(str(err), hint="") from err
    print(f"written: {path}" + ("" if args.no_html else f", {path.with_name(REPORT_HTML)}"))
    return 0
