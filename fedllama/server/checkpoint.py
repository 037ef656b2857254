"""Run directory: per-round PEFT adapters, server state, metrics, and resume.

Layout of ``output.dir``::

    config.yaml              the resolved config of the run
    metrics.jsonl            one JSON object per round (round 0 = before training)
    round-000/               the initial global adapter
    round-NNN/               after round NNN:
        adapter_config.json, adapter_model.safetensors   a PEFT adapter (loads with peft)
        rank-RR/                                         the same at client rank RR (mixed ranks)
        server_state.safetensors                         the strategy's global state
        optimizer_state.safetensors                      the server optimizer's moments
        metrics-row.json                                 the round's metrics row
    loss.png                 eval/train loss per round

A round directory, its metrics row included, is written under a temporary name and renamed when
complete: the round and its row become visible in one step, and a crash never leaves a
half-written round that resume would trust. The row is then appended to ``metrics.jsonl``; a
crash between the two steps (or within the append) is repaired on resume, which rebuilds the
file from the round directories. A round directory that cannot be read back is set aside
(``round-NNN.damaged``), named in the log, and the run resumes from the one before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from safetensors.torch import load_file, save_file

from fedllama.config import Config, ConfigError, from_yaml, to_yaml
from fedllama.merge import (
    AdapterState,
    MergeStrategy,
    ResidualMergeStrategy,
    rank_of,
    residual_view,
    with_residual,
)
from fedllama.model import adapters
from fedllama.server.metrics import MetricsRow, append_row, read_rows, write_rows

log = logging.getLogger(__name__)

SERVER_STATE = "server_state.safetensors"
OPTIMIZER_STATE = "optimizer_state.safetensors"
CONFIG = "config.yaml"
ROW = "metrics-row.json"
_ROUND_DIR = re.compile(r"^round-(\d{3,})$")


def round_dir(out: Path, server_round: int) -> Path:
    """``out/round-NNN``."""
    return out / f"round-{server_round:03d}"


def save_round(
    out: Path,
    server_round: int,
    global_state: AdapterState,
    optimizer_state: AdapterState,
    base_dir: Path,
    peft_adapters: list[tuple[int, AdapterState, dict[str, Any]]],
    row: MetricsRow | None = None,
) -> Path:
    """Write ``round-NNN`` atomically: the global state, the optimizer state, PEFT adapters and
    the round's metrics ``row``; then put the row in ``metrics.jsonl``.

    ``peft_adapters`` holds (client rank, weights, ``peft.LoraConfig`` kwargs); the first is
    written at the top of the round directory, the others as ``rank-RR/``.
    """
    final = round_dir(out, server_round)
    tmp = out / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (_, top, top_lora), *others = peft_adapters
    adapters.save_adapter(tmp, top, top_lora, base_dir)
    save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / SERVER_STATE))
    save_file({k: v.contiguous() for k, v in optimizer_state.items()}, str(tmp / OPTIMIZER_STATE))
    for rank, state, lora in others:
        adapters.save_adapter(tmp / f"rank-{rank:02d}", state, lora, base_dir)
    if row is not None:
        (tmp / ROW).write_text(json.dumps(row.to_json(), allow_nan=False))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if row is not None:
        append_row(out, row)
    return final


def last_round(out: Path) -> int | None:
    """Number of the last complete round directory, or None."""
    if not out.is_dir():
        return None
    rounds = [
        int(m.group(1))
        for p in out.iterdir()
        if (m := _ROUND_DIR.match(p.name)) and (p / SERVER_STATE).is_file()
    ]
    return max(rounds) if rounds else None


def load_global(out: Path, server_round: int) -> tuple[AdapterState, AdapterState]:
    """The strategy's global state and the optimizer state saved after ``server_round``."""
    directory = round_dir(out, server_round)
    return load_file(str(directory / SERVER_STATE)), load_file(str(directory / OPTIMIZER_STATE))


@dataclass
class Recovered:
    """Where a resumed run goes on from: the last intact round and its states."""

    server_round: int
    global_state: AdapterState
    optimizer_state: AdapterState


def recover(out: Path) -> Recovered | None:
    """The last round directory that reads back whole, or None for a new run.

    A round directory that does not (a truncated or corrupt file) is renamed
    ``round-NNN.damaged``, with a warning naming the file, and the one before is tried; then
    ``metrics.jsonl`` is rebuilt from the round directories up to the one recovered.
    """
    while (done := last_round(out)) is not None:
        directory = round_dir(out, done)
        try:
            global_state, optimizer_state = load_global(out, done)
            _row_of(directory)
            adapters.load_adapter(directory)
        except Exception as err:  # safetensors, json and OS errors have no common base
            damaged = directory.with_name(f"{directory.name}.damaged")
            if damaged.exists():
                shutil.rmtree(damaged)
            directory.rename(damaged)
            log.warning(
                "%s cannot be read back (%s: %s); set aside as %s, resuming from the round before",
                directory,
                type(err).__name__,
                err,
                damaged.name,
            )
            continue
        _rebuild_rows(out, done)
        return Recovered(done, global_state, optimizer_state)
    return None


def _row_of(directory: Path) -> MetricsRow | None:
    """The metrics row saved in a round directory (None for one written before rows were)."""
    path = directory / ROW
    if not path.is_file():
        return None
    return MetricsRow.from_json(json.loads(path.read_text()))


def _rebuild_rows(out: Path, upto: int) -> None:
    """``metrics.jsonl`` with the row of every round directory up to ``upto`` (a round written
    before rows were saved with it keeps its line from the old file)."""
    try:
        old = {r.round: r for r in read_rows(out)}
    except ValueError as err:
        log.warning("%s; rebuilding it from the round directories", err)
        old = {}
    rows = []
    for server_round in range(upto + 1):
        directory = round_dir(out, server_round)
        row = _row_of(directory) if directory.is_dir() else None
        row = row or old.get(server_round)
        if row is not None:
            rows.append(row)
    write_rows(out, rows)


_MUST_MATCH = ("model", "lora", "strategy", "data", "dp")


def check_resumable(out: Path, cfg: Config) -> None:
    """Refuse to resume a run whose model, LoRA, strategy, data, DP or optimizer settings differ
    (a privacy ledger composes the rounds of one DP configuration)."""
    saved_path = out / CONFIG
    if not saved_path.is_file():
        return
    saved = from_yaml(saved_path.read_text())
    for section in _MUST_MATCH:
        differ = _differences(asdict(getattr(saved, section)), asdict(getattr(cfg, section)))
        if differ:
            raise ConfigError(
                f"output.dir={str(out)!r} holds a different run: its {section} settings differ "
                f"({differ})",
                hint=_new_dir_hint(out, saved_path),
            )
    if saved.server.optimizer != cfg.server.optimizer:
        raise ConfigError(
            f"output.dir={str(out)!r} holds a run with server.optimizer="
            f"{saved.server.optimizer}; its saved moments do not fit {cfg.server.optimizer}",
            hint=_new_dir_hint(out, saved_path),
        )


_MAY_DIFFER = frozenset({"cache_dir"})
"""Keys that say where things are, not what the run is: a run resumes with its cache moved."""


def _differences(saved: dict[str, Any], now: dict[str, Any], limit: int = 3) -> str:
    """``key: saved -> now`` for the first ``limit`` keys that differ ("" when none do)."""
    keys = [k for k in saved if saved.get(k) != now.get(k) and k not in _MAY_DIFFER]
    shown = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _new_dir_hint(out: Path, saved_path: Path) -> str:
    return (
        f"pass a new output.dir (e.g. output.dir={out}-2) to start a new run, or resume this "
        f"one with its own settings ({saved_path})"
    )


def write_config(out: Path, cfg: Config) -> None:
    """Save the resolved config next to the rounds (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{CONFIG}.tmp"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, out / CONFIG)


def round_adapters(
    cfg: Config, merge: MergeStrategy, global_state: AdapterState
) -> list[tuple[int, AdapterState, dict[str, Any]]]:
    """The PEFT adapters a round directory holds: (client rank, weights, peft config kwargs),
    at ``lora.r`` first, then at every other rank of ``lora.client_ranks``; a dense adapter
    (``adapter.kind``) is the global state itself, once.

    With a residual (exact strategies) the residual and the view are folded into one adapter
    at peft scale 1 (``merge.with_residual``), so that one ``PeftModel.from_pretrained`` gives
    the whole global model.
    """
    if cfg.adapter.dense:  # one shape on every client; LLaMA-Adapter: a gate per layer
        layers = sum(key.endswith("adaption_gate") for key in global_state)
        return [(cfg.lora.r, dict(global_state), cfg.adapter.peft_kwargs(layers))]
    out = []
    for rank in [cfg.lora.r, *sorted(set(cfg.lora.client_ranks) - {cfg.lora.r})]:
        view = merge.client_view(global_state, rank)
        residual = residual_view(merge, global_state, rank)
        if not residual:
            out.append((rank, view, cfg.lora.at_rank(rank).peft_kwargs()))
            continue
        scale = cast(ResidualMergeStrategy, merge).scale
        folded = with_residual(view, residual, scale)
        width = rank_of(folded)
        plain = {"r": width, "lora_alpha": width, "use_rslora": False, "use_dora": False}
        out.append((rank, folded, {**cfg.lora.peft_kwargs(), **plain}))  # peft scale 1
    return out
