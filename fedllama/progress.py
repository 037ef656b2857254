"""A run's progress as events: the server says what happens, observers listen.

The server loop and the reply tally report a run's steps here (a round's nodes asked, a client's
reply counted or dropped, a round recorded); the terminal view (:mod:`fedllama.console`) and the
TensorBoard writer (:mod:`fedllama.server.tensorboard`) are observers. With none attached an
event costs one empty loop; an observer that fails is detached with one warning and never stops
a round.

In a simulation a client also says when it starts training, through a marker file in
``$FEDLLAMA_LIVE_DIR`` (set by ``fedllama simulate``; simulated clients run on the same machine):
that is how the terminal tells a training client from one whose message is still queued.
Deployed clients never write one.

Flower-free and torch-free: the ClientApp imports this for :func:`mark_started`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedllama.server.metrics import MetricsRow

log = logging.getLogger(__name__)

LIVE_DIR_ENV = "FEDLLAMA_LIVE_DIR"
"""Where simulated clients mark the start of their training (unset: no markers)."""


class Observer:
    """Hooks for a run's events; override the ones you need (each default does nothing).

    Events come from the server's thread, one at a time, in the order they happen.
    """

    def run_started(self, out: Path, rounds: int, done: int) -> None:
        """The run's directory, its ``server.rounds`` and the rounds already on disk."""

    def round_started(self, server_round: int, nodes: Sequence[int]) -> None:
        """Train messages went to ``nodes`` (an attempt: a retried round starts again)."""

    def client_replied(self, server_round: int, node: int, summary: Mapping[str, Any]) -> None:
        """A reply was counted: ``summary`` holds its metrics (``client-id``, ``train-loss``,
        ``num-examples``, ``seconds``, ...) and ``bytes-up``."""

    def client_dropped(self, server_round: int, node: int, client: int | None, reason: str) -> None:
        """A node's reply was left out (``client`` is its client id once known)."""

    def round_finished(self, row: MetricsRow) -> None:
        """A round (round 0: the initial adapter) was recorded on disk."""

    def run_finished(self, rows: Sequence[MetricsRow]) -> None:
        """The loop ended; ``rows`` are every round's rows."""


class _Observers(Observer):
    """The attached observers, called in turn."""

    def __init__(self) -> None:
        self.attached: list[Observer] = []
        self._lock = threading.Lock()

    def _each(self, hook: str, *args: Any) -> None:
        with self._lock:
            observers = list(self.attached)
        for observer in observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                log.warning("progress: %s failed in %s; detached", type(observer).__name__, hook)
                log.debug("progress observer failure", exc_info=True)
                detach(observer)

    def run_started(self, out: Path, rounds: int, done: int) -> None:
        self._each("run_started", out, rounds, done)

    def round_started(self, server_round: int, nodes: Sequence[int]) -> None:
        self._each("round_started", server_round, list(nodes))

    def client_replied(self, server_round: int, node: int, summary: Mapping[str, Any]) -> None:
        self._each("client_replied", server_round, node, dict(summary))

    def client_dropped(self, server_round: int, node: int, client: int | None, reason: str) -> None:
        self._each("client_dropped", server_round, node, client, reason)

    def round_finished(self, row: MetricsRow) -> None:
        self._each("round_finished", row)

    def run_finished(self, rows: Sequence[MetricsRow]) -> None:
        self._each("run_finished", list(rows))


events = _Observers()
"""Where the server reports: ``progress.events.round_started(...)`` reaches every observer."""


def attach(observer: Observer) -> None:
    """Let ``observer`` hear every later event."""
    with events._lock:
        events.attached.append(observer)


def detach(observer: Observer) -> None:
    """Stop ``observer`` hearing events (no error when it was not attached)."""
    with events._lock, contextlib.suppress(ValueError):
        events.attached.remove(observer)


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[Observer]:
    """``observer`` attached for the block."""
    attach(observer)
    try:
        yield observer
    finally:
        detach(observer)


def mark_started(server_round: int, node: int) -> None:
    """Client side: say that ``node`` started training in ``server_round`` (a simulation only,
    when ``$FEDLLAMA_LIVE_DIR`` is set; a marker that cannot be written is not an error)."""
    live_dir = os.environ.get(LIVE_DIR_ENV)
    if live_dir:
        with contextlib.suppress(OSError):
            Path(live_dir, f"{server_round}-{node}").touch()


def started_nodes(live_dir: Path, server_round: int) -> set[int]:
    """The nodes whose start marker for ``server_round`` is in ``live_dir``."""
    prefix = f"{server_round}-"
    try:
        names = os.listdir(live_dir)
    except OSError:
        return set()
    return {
        int(n[len(prefix) :]) for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit()
    }
