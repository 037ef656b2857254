"""The run as a person watches it: a live view on a terminal, fedllama's own lines elsewhere.

:class:`RunState` keeps what the server's events (:mod:`fedllama.progress`) say: the rounds
done, the current round's clients and their state, each round's eval loss. :class:`LiveView`
draws it with rich, four times a second: a bar over the rounds, the round's clients (waiting,
training, done, dropped) with train loss, examples, bytes and time, the eval loss of every
round, and the summary at the end. Without a terminal, :func:`plain_lines` sends fedllama's log
lines (no control characters) instead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedllama import progress
from fedllama.server.metrics import MetricsRow

STATES = ("training", "dropped", "done", "waiting")
"""A client's states, in the order the table lists them."""
MAX_ROWS = 12
"""Clients shown at most; the rest are counted by state under the table."""
STYLES = {"waiting": "dim", "training": "yellow", "done": "green", "dropped": "red"}


@dataclass
class ClientLine:
    """One client of the current round, as far as the server knows."""

    node: int
    state: str = "waiting"
    client: int | None = None
    train_loss: float | None = None
    examples: float | None = None
    bytes_up: int | None = None
    seconds: float | None = None
    reason: str = ""
    changed: float = 0.0
    """When the state last changed (``time.monotonic``), to list the latest first."""


@dataclass
class Snapshot:
    """A consistent copy of :class:`RunState` for drawing."""

    rounds: int
    done: int
    current: int
    clients: list[ClientLine]
    evals: list[tuple[int, float]]
    elapsed: float
    round_elapsed: float
    finished: bool
    rows: list[MetricsRow] = field(default_factory=list)


class RunState(progress.Observer):
    """What the server's events say about the run (thread-safe: events arrive on the server's
    thread, drawing happens on rich's).

    Args:
        live_dir: where simulated clients mark the start of their training
            (:func:`fedllama.progress.mark_started`); None: a client shows as waiting until
            its reply.
    """

    def __init__(self, rounds: int, live_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self.rounds = rounds
        self.done = 0
        self.current = 0
        self.clients: dict[int, ClientLine] = {}
        self.names: dict[int, int] = {}
        """Node -> client id, from every reply so far (a node keeps its client)."""
        self.evals: list[tuple[int, float]] = []
        self.rows: list[MetricsRow] = []
        self.finished = False
        self.live_dir = live_dir
        self._t0 = time.monotonic()
        self._round_t0 = self._t0

    def run_started(self, out: Path, rounds: int, done: int) -> None:
        with self._lock:
            self.rounds, self.done = rounds, done

    def round_started(self, server_round: int, nodes: Sequence[int]) -> None:
        now = time.monotonic()
        with self._lock:
            self.current, self._round_t0 = server_round, now
            self.clients = {n: ClientLine(n, client=self.names.get(n), changed=now) for n in nodes}

    def client_replied(self, server_round: int, node: int, summary: Mapping[str, Any]) -> None:
        with self._lock:
            if server_round != self.current:
                return
            line = self.clients.setdefault(node, ClientLine(node))
            line.state, line.changed = "done", time.monotonic()
            line.client = _int(summary.get("client-id"))
            if line.client is not None:
                self.names[node] = line.client
            line.train_loss = _float(summary.get("train-loss"))
            line.examples = _float(summary.get("num-examples"))
            line.bytes_up = _int(summary.get("bytes-up"))
            line.seconds = _float(summary.get("seconds"))

    def client_dropped(self, server_round: int, node: int, client: int | None, reason: str) -> None:
        with self._lock:
            if server_round != self.current:
                return
            line = self.clients.setdefault(node, ClientLine(node))
            line.state, line.reason, line.changed = "dropped", reason, time.monotonic()
            line.client = client if client is not None else line.client

    def round_finished(self, row: MetricsRow) -> None:
        with self._lock:
            self.done = max(self.done, row.round)
            if math.isfinite(row.eval_loss):
                self.evals = [e for e in self.evals if e[0] != row.round] + [
                    (row.round, row.eval_loss)
                ]

    def run_finished(self, rows: Sequence[MetricsRow]) -> None:
        with self._lock:
            self.finished, self.rows = True, list(rows)

    def _mark_training(self) -> None:
        """Waiting clients whose start marker is there are training (the lock held)."""
        if self.live_dir is None or not self.current:
            return
        waiting = [c for c in self.clients.values() if c.state == "waiting"]
        if waiting:
            started = progress.started_nodes(self.live_dir, self.current)
            now = time.monotonic()
            for line in waiting:
                if line.node in started:
                    line.state, line.changed = "training", now

    def snapshot(self) -> Snapshot:
        """The state now, copied."""
        with self._lock:
            self._mark_training()
            now = time.monotonic()
            return Snapshot(
                rounds=self.rounds,
                done=self.done,
                current=self.current,
                clients=[replace(c) for c in self.clients.values()],
                evals=list(self.evals),
                elapsed=now - self._t0,
                round_elapsed=now - self._round_t0,
                finished=self.finished,
                rows=list(self.rows),
            )


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def shown(clients: Sequence[ClientLine], limit: int = MAX_ROWS) -> list[ClientLine]:
    """The clients worth a row: training, dropped, the latest done, then waiting."""
    order = {s: i for i, s in enumerate(STATES)}
    ranked = sorted(clients, key=lambda c: (order[c.state], -c.changed, c.node))
    return ranked[:limit]


def render(snap: Snapshot, title: str) -> RenderableType:
    """The live view of ``snap``: the round bar, the round's clients, the eval losses."""
    parts: list[RenderableType] = [Text(title, style="bold")]
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        Text("rounds"),
        ProgressBar(total=max(snap.rounds, 1), completed=snap.done, width=30),
        Text(f"{snap.done}/{snap.rounds}"),
        Text(_clock(snap.elapsed), style="cyan"),
    )
    parts.append(bar)
    if snap.current and not snap.finished:
        counts = {s: sum(c.state == s for c in snap.clients) for s in STATES}
        table = Table(
            title=f"round {snap.current}: "
            + ", ".join(f"{counts[s]} {s}" for s in STATES)
            + f" ({_clock(snap.round_elapsed)})",
            title_justify="left",
            expand=False,
        )
        for name, justify in (
            ("client", "right"),
            ("node", "right"),
            ("state", "left"),
            ("train loss", "right"),
            ("examples", "right"),
            ("bytes up", "right"),
            ("time", "right"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        rows = shown(snap.clients)
        for c in rows:
            state = Text(c.state if not c.reason else f"dropped: {c.reason}"[:60])
            state.stylize(STYLES[c.state])
            table.add_row(
                "" if c.client is None else str(c.client),
                str(c.node),
                state,
                "" if c.train_loss is None else f"{c.train_loss:.4f}",
                "" if c.examples is None else f"{c.examples:g}",
                _bytes(c.bytes_up),
                "" if c.seconds is None else f"{c.seconds:.1f} s",
            )
        parts.append(table)
        if len(snap.clients) > len(rows):
            listed_nodes = {c.node for c in rows}
            rest = [c for c in snap.clients if c.node not in listed_nodes]
            more = {s: sum(c.state == s for c in rest) for s in STATES}
            listed = ", ".join(f"{n} {s}" for s, n in more.items() if n)
            parts.append(Text(f"... and {len(rest)} more ({listed})", style="dim"))
    if snap.evals:
        history = "  ".join(f"{r}: {loss:.4f}" for r, loss in snap.evals[-8:])
        parts.append(Text(f"eval loss by round  {history}"))
    return Group(*parts)


class LiveView(RunState):
    """:class:`RunState` drawn on a terminal with rich until the block ends.

    fedllama's warnings (a dropped client, a failed round) print above the view; its other log
    lines stay in ``run.log``.
    """

    def __init__(
        self, terminal: TextIO, rounds: int, title: str, live_dir: Path | None = None
    ) -> None:
        super().__init__(rounds, live_dir)
        self.title = title
        self.console = Console(file=terminal, force_terminal=True)
        self._live = Live(
            console=self.console,
            get_renderable=lambda: render(self.snapshot(), self.title),
            refresh_per_second=4,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._handler = _ConsoleHandler(self.console)

    def __enter__(self) -> LiveView:
        logging.getLogger("fedllama").addHandler(self._handler)
        progress.attach(self)
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        progress.detach(self)
        logging.getLogger("fedllama").removeHandler(self._handler)
        self._live.refresh()
        self._live.stop()
        rows = self.snapshot().rows
        if rows:
            from fedllama.experiments.report import summary

            self.console.print(summary(rows))


class _ConsoleHandler(logging.Handler):
    """fedllama's warnings, printed above the live view."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(Text(self.format(record), style="yellow"))


class plain_lines:
    """fedllama's log lines (INFO and up) on ``stream``, without control characters, for the
    block: what a run shows when its output is not a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.handler = logging.StreamHandler(stream)
        self.handler.setFormatter(logging.Formatter("%(asctime)s fedllama %(message)s", "%H:%M:%S"))

    def __enter__(self) -> plain_lines:
        logging.getLogger("fedllama").addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("fedllama").removeHandler(self.handler)
        self.handler.flush()
