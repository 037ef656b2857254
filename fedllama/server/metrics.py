"""The metrics row of a round: one dataclass, written to ``metrics.jsonl`` and read back.

The server loop writes one :class:`MetricsRow` per round (round 0 is the initial evaluation);
the report and the comparison read them back typed, so nobody guesses at a key. The names of
the JSON keys are part of what users see: they do not change.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"

log = logging.getLogger(__name__)


@dataclass
class MetricsRow:
    """One round in ``metrics.jsonl``.

    Attributes:
        round: the round number; 0 is the initial adapter before any training.
        eval_loss: the global adapter's loss on the server's global eval set (NaN when
            ``server.evaluate`` is off, written as ``null``: the file is strict JSON).
        train_loss: the clients' example-weighted loss during their local steps (None in
            round 0).
        bytes_up, bytes_down: payload bytes clients sent and received this round, all clients.
        seconds: wall time of the round up to its checkpoint (training, aggregation and
            evaluation; the checkpoint is written with the row).
        client_eval_loss: clients' own eval loss after training, example-weighted.
        clients_ok, clients_dropped: replies counted and dropped.
        clients: each counted client's metrics (``node`` plus what it reported).
        dropped: each dropped client: ``node``, ``client-id`` once known, ``reason`` (and the
            SecAgg+ ``stage`` it left at).
        secagg: with secure aggregation, the protocol's figures (neighbours, threshold,
            clipped values, unmasked dropouts, per stage traffic and time).
        dp: with differential privacy, ε at δ after this round and every assumption it rests
            on (accountant, z, C, placement, sampling, the unit of privacy, the round's event).
        robust: with a norm bound or a robust combiner (``robust.*``), what the round's bound
            was and which clients' updates were clipped, dropped or left out by the combiner.
        skipped: set when the round produced no delta (every attempt failed, see
            ``server.failed_round``): why; the global adapter stays and ``eval_loss`` is its
            loss.
        rejected: set when the round's new global adapter was rejected (non-finite, or its
            eval loss over ``server.reject_loss_factor`` times the last one); the round's
            directory then holds the previous adapter and ``eval_loss`` is its loss.
    """

    round: int
    eval_loss: float
    train_loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    client_eval_loss: float | None = None
    clients_ok: int = 0
    clients_dropped: int = 0
    clients: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    secagg: dict[str, Any] | None = None
    dp: dict[str, Any] | None = None
    robust: dict[str, Any] | None = None
    rejected: str | None = None
    """Why the round's new global adapter was rejected (the previous one was kept)."""
    skipped: str | None = None
    """Why the round produced no delta (the previous adapter was kept)."""

    def to_json(self) -> dict[str, Any]:
        """The row as written (``secagg``, ``dp`` and ``robust`` only when they ran)."""
        row = asdict(self)
        for optional in ("secagg", "dp", "robust", "rejected", "skipped"):
            if row[optional] is None:
                del row[optional]
        strict: dict[str, Any] = _strict(row)
        return strict

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> MetricsRow:
        """A row as read back; keys this version does not know are ignored.

        Raises:
            ValueError: ``round`` or ``eval_loss`` is missing.
        """
        missing = [k for k in ("round", "eval_loss") if k not in row]
        if missing:
            raise ValueError(f"metrics row without {missing[0]!r}: {row}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in known}
        if values["eval_loss"] is None:  # not evaluated
            values["eval_loss"] = math.nan
        return cls(**values)


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _line(row: MetricsRow) -> str:
    return json.dumps(row.to_json(), allow_nan=False) + "\n"


def read_rows(out: Path) -> list[MetricsRow]:
    """Every row of ``out/metrics.jsonl`` (empty when absent). A half-written last line (a
    crash while it was written by an older version) is skipped with a warning.

    Raises:
        ValueError: a line other than the last is not a metrics row (names file and line).
    """
    path = out / METRICS
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(MetricsRow.from_json(json.loads(line)))
        except ValueError as err:  # JSONDecodeError is a ValueError
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a metrics row: {err}") from None
            log.warning("%s: the last line is half-written and is skipped (%s)", path, err)
    return rows


def write_rows(out: Path, rows: list[MetricsRow]) -> None:
    """Replace ``out/metrics.jsonl`` with ``rows`` in one atomic step (a temporary file, then
    a rename: a reader sees the old file or the new one, never a part)."""
    tmp = out / f".{METRICS}.tmp"
    tmp.write_text("".join(_line(r) for r in rows))
    os.replace(tmp, out / METRICS)


def truncate_rows(out: Path, upto: int) -> None:
    """Keep only rows of rounds ``<= upto`` (rounds after the last saved one are redone)."""
    write_rows(out, [r for r in read_rows(out) if r.round <= upto])


def append_row(out: Path, row: MetricsRow) -> None:
    """Append one round's row: one line, not a rewrite of the file every round. Durability
    does not rest on it: the row is already in its round directory, and a resumed run rebuilds
    this file from them (a half-written line is skipped by :func:`read_rows`)."""
    with (out / METRICS).open("a") as fh:
        fh.write(_line(row))


def weighted_client_eval(clients: list[dict[str, Any]]) -> float | None:
    """Clients' own eval loss after training (personalised), weighted by examples."""
    scored = [
        (c["num-examples"], c["client-eval-loss"]) for c in clients if "client-eval-loss" in c
    ]
    if not scored:
        return None
    return float(sum(n * loss for n, loss in scored) / sum(n for n, _ in scored))
