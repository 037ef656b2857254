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
    loss.png                 eval/train loss per round

A round directory is written under a temporary name and renamed when complete, so a crash never
leaves a half-written round that resume would trust.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict
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

SERVER_STATE = "server_state.safetensors"
OPTIMIZER_STATE = "optimizer_state.safetensors"
CONFIG = "config.yaml"
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
) -> Path:
    """Write ``round-NNN`` atomically: the global state, the optimizer state and PEFT adapters.

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
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
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


_MUST_MATCH = ("model", "lora", "strategy", "data", "dp")


def check_resumable(out: Path, cfg: Config) -> None:
    """Refuse to resume a run whose model, LoRA, strategy, data, DP or optimizer settings differ
    (a privacy ledger composes the rounds of one DP configuration)."""
    saved_path = out / CONFIG
    if not saved_path.is_file():
        return
    saved = from_yaml(saved_path.read_text())
    for section in _MUST_MATCH:
        if getattr(saved, section) != getattr(cfg, section):
            raise ConfigError(
                f"output.dir={str(out)!r} holds a run with different {section} settings "
                f"(saved: {asdict(getattr(saved, section))}); use a new output.dir or the "
                "same settings to resume"
            )
    if saved.server.optimizer != cfg.server.optimizer:
        raise ConfigError(
            f"output.dir={str(out)!r} holds a run with server.optimizer="
            f"{saved.server.optimizer}; its saved moments do not fit {cfg.server.optimizer}"
        )


def write_config(out: Path, cfg: Config) -> None:
    """Save the resolved config next to the rounds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(to_yaml(cfg))


def round_adapters(
    cfg: Config, merge: MergeStrategy, global_state: AdapterState
) -> list[tuple[int, AdapterState, dict[str, Any]]]:
    """The PEFT adapters a round directory holds: (client rank, weights, LoraConfig kwargs),
    at ``lora.r`` first, then at every other rank of ``lora.client_ranks``.

    With a residual (exact strategies) the residual and the view are folded into one adapter
    at peft scale 1 (``merge.with_residual``), so that one ``PeftModel.from_pretrained`` gives
    the whole global model.
    """
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
        out.append((rank, folded, {**cfg.lora.peft_kwargs(), "r": width, "lora_alpha": width}))
    return out
