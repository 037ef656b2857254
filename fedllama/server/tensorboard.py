"""Each round's scalars for TensorBoard (``output.tensorboard``), written as the round lands.

An observer (:mod:`fedllama.progress`): the event files under ``<output.dir>/tensorboard`` hold,
per round (the step), the global eval loss, the clients' train and own eval loss, bytes up and
down per client, wall time, clients counted and dropped, and ε under differential privacy (at the
δ the run's ``dp`` row names, with its accountant). A resumed run drops what an earlier process
wrote after the round it resumes from (``purge_step``), so a redone round has one value.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedllama.config import ConfigError
from fedllama.progress import Observer
from fedllama.server.metrics import MetricsRow

SUBDIR = "tensorboard"


def require() -> None:
    """Refuse ``output.tensorboard=true`` without the package that writes its files."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "output.tensorboard=true needs the tensorboard package, which is not installed",
            hint="pip install 'fedllama[tensorboard]' (or set output.tensorboard=false)",
        )


def scalars(row: MetricsRow) -> dict[str, float]:
    """A row's scalars by TensorBoard tag (only those the round has)."""
    per_client = max(row.clients_ok, 1)
    values: dict[str, float | None] = {
        "loss/eval": row.eval_loss,
        "loss/train": row.train_loss,
        "loss/client_eval": row.client_eval_loss,
        "bytes/up_per_client": row.bytes_up / per_client if row.round else None,
        "bytes/down_per_client": row.bytes_down / per_client if row.round else None,
        "clients/ok": float(row.clients_ok) if row.round else None,
        "clients/dropped": float(row.clients_dropped) if row.round else None,
        "time/round_seconds": row.seconds,
    }
    if row.dp is not None and row.dp.get("epsilon") is not None:
        values["privacy/epsilon"] = float(row.dp["epsilon"])
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


class TensorBoardWriter(Observer):
    """Writes :func:`scalars` of every recorded round under ``out/tensorboard``."""

    def __init__(self, out: Path) -> None:
        require()
        self.directory = out / SUBDIR
        self._writer: Any = None

    def run_started(self, out: Path, rounds: int, done: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.directory), purge_step=done + 1)

    def round_finished(self, row: MetricsRow) -> None:
        if self._writer is None:  # round 0 lands before the run starts: open now
            self.run_started(self.directory.parent, 0, row.round - 1)
        assert self._writer is not None
        for tag, value in scalars(row).items():
            self._writer.add_scalar(tag, value, row.round)
        self._writer.flush()

    def run_finished(self, rows: Sequence[MetricsRow]) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
