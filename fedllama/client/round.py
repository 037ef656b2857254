"""One client round, independent of Flower: load the view, train, return the encoded delta.

``clients/app.py`` turns Flower messages into a call of :func:`run_round` and back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedllama import data, model
from fedllama.config import Config
from fedllama.data import Encoded, Example
from fedllama.merge import AdapterState, MergeStrategy, frozen_key, robust
from fedllama.model import adapters, replay, train
from fedllama.privacy.dp import privatize
from fedllama.wire.records import PHASES

log = logging.getLogger(__name__)


def _with_local_state(
    view: AdapterState, local: frozenset[str], state_path: Path | None
) -> AdapterState:
    """The view with this client's own saved copy of its local factors, when it has one."""
    if not local or state_path is None or not state_path.is_file():
        return view
    saved = load_file(str(state_path))
    mine = {k: v for k, v in view.items() if frozen_key(k, local)}
    adapters.check_compatible(mine, saved, f"client state {state_path}")
    return {**view, **saved}


def _save_local_state(trained: AdapterState, local: frozenset[str], state_path: Path) -> None:
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in trained.items() if frozen_key(k, local)}, str(tmp))
    tmp.replace(state_path)


@dataclass
class Phases:
    """Wall seconds per phase of one client round (``bench/scale.py`` reads them)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``time-<phase>`` -> seconds."""
        return {f"time-{phase}": seconds for phase, seconds in self.seconds.items()}


@dataclass
class RoundOutput:
    """A client's reply: the encoded delta and its metrics."""

    encoded: AdapterState
    metrics: dict[str, float | int]


def _eval_set(tok: Any, examples: list[Example], cfg: Config, client_id: int) -> list[Encoded]:
    """The client's own eval examples, encoded; none (no client eval this round, logged) when
    every answer lies beyond ``data.max_seq_len``: a client with few examples can draw such an
    eval split, and its training round is still worth sending."""
    try:
        return data.encode_all(tok, examples, cfg.data)
    except data.DataError as err:
        log.info("client %d: no client eval this round: its eval split has %s", client_id, err)
        return []


def run_round(
    cfg: Config,
    merge: MergeStrategy,
    view: AdapterState,
    split: data.Split,
    server_round: int,
    client_id: int,
    rank: int | None = None,
    state_path: Path | None = None,
    residual: AdapterState | None = None,
    phases: Phases | None = None,
) -> RoundOutput:
    """Train from ``view`` (at LoRA rank ``rank``, default ``lora.r``) on ``split.train`` and
    encode the delta (trained - view) of the factors the strategy trains and shares this round.

    Factors the strategy keeps local (``merge.local``) are read from and written back to
    ``state_path``, so they survive rounds and restarts of the client. ``residual`` (exact
    strategies: ``merge.residual_view``) is installed as a frozen second adapter. ``phases``
    collects the time of each phase.
    """
    rank = cfg.lora.r if rank is None else rank
    phases = phases or Phases()
    with phases("model"):
        lora_model, tok = model.get_lora_model(replace(cfg, lora=cfg.lora.at_rank(rank)))
        model.set_residual(lora_model, residual or {}, cfg)
        view = _with_local_state(view, merge.local, state_path)
        adapters.set_adapter_state(lora_model, view)
        frozen = merge.frozen(server_round)
        model.set_frozen(lora_model, frozen)
    with phases("data"):
        eval_set = _eval_set(tok, split.eval[: cfg.train.client_eval_size], cfg, client_id)
        train_set = data.encode_all(tok, split.train, cfg.data)
    seed = replay.round_seed(cfg.data.seed, server_round, client_id)  # leakage replays it
    with phases("train"):
        who = f"client {client_id} round {server_round}"
        result = _train(cfg, lora_model, int(tok.pad_token_id), train_set, seed, who)
    metrics: dict[str, float | int] = {
        "num-examples": result.num_examples,
        "train-loss": result.train_loss,
        "steps": result.steps,
        "seconds": result.seconds,
        "tokens": result.tokens,
        "lora-rank": rank,
        "client-id": client_id,
        "threads": torch.get_num_threads(),  # what a simulation's Ray worker was given
    }
    if eval_set:
        with phases("eval"):
            pad_id = int(tok.pad_token_id)
            batch = cfg.train.eval_batch_size
            metrics["client-eval-loss"] = train.evaluate(lora_model, eval_set, batch, pad_id)
    with phases("encode"):
        trained = adapters.get_adapter_state(lora_model)
        unsent = frozen | merge.local
        delta = adapters.subtract(trained, view)
        delta = {k: v for k, v in delta.items() if not frozen_key(k, unsent)}
        if merge.local and state_path is not None:
            _save_local_state(trained, merge.local, state_path)
        encoded = _encode(cfg, merge, delta, view, result, server_round, client_id)
    return RoundOutput(encoded, metrics)


def _encode(
    cfg: Config,
    merge: MergeStrategy,
    delta: AdapterState,
    view: AdapterState,
    result: train.TrainResult,
    server_round: int,
    client_id: int,
) -> AdapterState:
    """The delta as the strategy encodes it: weighted by examples (1 with
    ``strategy.weighting=uniform``), or under DP weighted 1 and clipped (noised when the noise
    is local)."""
    if not cfg.dp.enabled:
        uniform = cfg.strategy.weighting == "uniform"
        weight = 1.0 if uniform else float(result.num_examples)
        encoded = merge.encode(delta, weight, view)
        if cfg.secagg.enabled and cfg.robust.norm_bound > 0:  # the server checks only the sum
            encoded = bound_own_update(encoded, merge.count_keys, weight, cfg.robust.norm_bound)
        return encoded
    # DP-FedAvg: every client weighs 1, clips its update (and adds noise when it is local)
    encoded = merge.encode(delta, 1.0, view)
    return privatize(encoded, merge.count_keys, cfg.dp, server_round, client_id)


def bound_own_update(
    encoded: AdapterState, count_keys: frozenset[str], weight: float, bound: float
) -> AdapterState:
    """Under secure aggregation with ``robust.norm_bound``: an honest client clips its own
    update (encoding / weight) to the bound, since the server sees only the sum (whose norm it
    checks against what clipped clients can produce)."""
    norm = robust.update_norm(encoded, count_keys, weight)
    if norm <= bound:
        return encoded
    log.info("update norm %.4g clipped to robust.norm_bound=%g", norm, bound)
    return robust.scale_update(encoded, count_keys, bound / norm)


def _train(
    cfg: Config, lora_model: Any, pad_id: int, train_set: list[Encoded], seed: int, who: str
) -> train.TrainResult:
    """``train.local_steps`` steps on the encoded training examples, progress logged."""
    torch.manual_seed(seed)

    def progress(step: int, loss: float) -> None:
        log.info("%s: step %d/%d loss %.4f", who, step, cfg.train.local_steps, loss)

    return train.train_local(
        lora_model, train_set, cfg.train, pad_id=pad_id, seed=seed, progress=progress
    )
