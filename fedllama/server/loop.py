"""The server's round loop: bootstrap or resume, one round at a time, record it.

Flower's ``Strategy.start`` always counts rounds from 1 and keeps no state on disk; this loop
drives the same strategy hooks so that a run resumes after its last completed round and every
round lands on disk before the next one starts. How a round's replies become a delta is the
aggregator's business (:mod:`fedllama.server.aggregate`), chosen once per run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedllama import model, progress
from fedllama.config import Config, to_yaml
from fedllama.merge import AdapterState, MergeStrategy
from fedllama.merge.optimizer import ServerOptimizer, build_server_optimizer
from fedllama.merge.update import apply_delta
from fedllama.privacy.dp import UNCLIPPED
from fedllama.server import checkpoint
from fedllama.server.aggregate import (
    Aggregator,
    OnReply,
    RoundFailed,
    RoundRecord,
    build_aggregator,
)
from fedllama.server.dp import PrivacyBudgetSpent, ServerDp
from fedllama.server.evaluator import Evaluator, server_view
from fedllama.server.metrics import (
    MetricsRow,
    read_rows,
    truncate_rows,
    weighted_client_eval,
)
from fedllama.server.strategy import FedLlamaStrategy
from fedllama.server.tensorboard import TensorBoardWriter
from fedllama.wire import codecs

log = logging.getLogger(__name__)

__all__ = ["RoundFailed", "ServerRun", "run_server"]


@dataclass
class ServerRun:
    """Everything a run's rounds share: where they land and the parts that make them."""

    cfg: Config
    merge: MergeStrategy
    out: Path
    base_dir: Path
    evaluator: Evaluator
    optimizer: ServerOptimizer
    strategy: FedLlamaStrategy
    aggregator: Aggregator
    dp: ServerDp | None
    last_eval: float = math.nan
    """The eval loss of the global adapter the next round starts from."""

    @classmethod
    def start(cls, cfg: Config, merge: MergeStrategy) -> ServerRun:
        """Check the run directory, save the config, build the evaluator and the aggregator."""
        out = Path(cfg.output.dir)
        checkpoint.check_resumable(out, cfg)
        checkpoint.write_config(out, cfg)
        dp = ServerDp.start(cfg) if cfg.dp.enabled else None
        strategy = FedLlamaStrategy(
            merge,
            to_yaml(dp.resolved() if dp else cfg),  # clients need a calibrated z
            rank=cfg.lora.r,
            fraction_train=cfg.server.fraction_train,
            min_nodes=cfg.server.min_replies,
            sampler=dp.sampler if dp else None,
            codec=codecs.build(cfg.wire.codec, cfg.wire.topk_fraction),
            downlink=cfg.wire.downlink,
        )
        if dp is not None and cfg.dp.adaptive_clipping:
            strategy.extra_keys = {UNCLIPPED: (1,)}
        return cls(
            cfg=cfg,
            merge=merge,
            out=out,
            base_dir=model.resolve_base_dir(cfg.model),
            evaluator=Evaluator(cfg),
            optimizer=build_server_optimizer(cfg.server),
            strategy=strategy,
            aggregator=build_aggregator(cfg),
            dp=dp,
        )

    def evaluate(self, global_state: AdapterState) -> float:
        """The global model's eval loss (its view at ``lora.r`` and its residual)."""
        return self.evaluator(*server_view(self.cfg, self.merge, global_state))

    def save(self, server_round: int, global_state: AdapterState, row: MetricsRow) -> None:
        """Write the round directory with its metrics row (one atomic step)."""
        checkpoint.save_round(
            self.out,
            server_round,
            global_state,
            self.optimizer.state_dict(),
            self.base_dir,
            checkpoint.round_adapters(self.cfg, self.merge, global_state),
            row,
        )


def run_server(grid: Grid, cfg: Config, merge: MergeStrategy) -> list[MetricsRow]:
    """Run (or resume) ``server.rounds`` rounds; return the metrics rows.

    Raises:
        RoundFailed: with ``server.failed_round=stop``, a round got fewer than
            ``server.min_replies`` good replies, or secure aggregation could not finish; the
            global adapter stays at the previous round.
    """
    run = ServerRun.start(cfg, merge)
    with contextlib.ExitStack() as stack:
        if cfg.output.tensorboard:
            stack.enter_context(progress.observing(TensorBoardWriter(run.out)))
        global_state, done = bootstrap_or_resume(run)
        progress.events.run_started(run.out, cfg.server.rounds, done)
        for server_round in range(done + 1, cfg.server.rounds + 1):
            try:
                global_state = attempt_round(run, grid, global_state, server_round)
            except PrivacyBudgetSpent as err:
                log.warning("dp: %s", err)
                break
        rows = read_rows(run.out)
        progress.events.run_finished(rows)
    return rows


def bootstrap_or_resume(run: ServerRun) -> tuple[AdapterState, int]:
    """The global state to go on from and the last completed round.

    A new run evaluates and saves the initial adapter as round 0; a resumed one loads its last
    intact round directory, with ``metrics.jsonl`` rebuilt up to it (later rounds are redone).
    """
    out, cfg = run.out, run.cfg
    recovered = checkpoint.recover(out)
    if recovered is not None:
        done, global_state = recovered.server_round, recovered.global_state
        run.optimizer.load_state_dict(recovered.optimizer_state)
        rows = read_rows(out)
        run.last_eval = rows[-1].eval_loss if rows else math.nan
        if run.dp is not None:
            run.dp.resume(rows)
        if done >= cfg.server.rounds:
            log.info("%s already holds %d rounds; nothing to do", out, done)
        else:
            log.info("resuming %s after round %d", out, done)
        return global_state, done
    global_state = run.merge.init_global(run.evaluator.initial_adapter())
    t0 = time.perf_counter()
    eval_loss = run.last_eval = run.evaluate(global_state)
    truncate_rows(out, -1)
    dp = run.dp.summary(0.0) if run.dp else None
    row = MetricsRow(round=0, eval_loss=eval_loss, seconds=time.perf_counter() - t0, dp=dp)
    run.save(0, global_state, row)
    progress.events.round_finished(row)
    log.info("round 0 (initial adapter): eval_loss %.4f", eval_loss)
    return global_state, 0


def attempt_round(
    run: ServerRun, grid: Grid, global_state: AdapterState, server_round: int
) -> AdapterState:
    """One round, as ``server.failed_round`` says when it produces no delta: retried without
    the nodes the failure names (``server.round_retries`` times), then skipped; skipped; or
    the run stopped (:class:`RoundFailed` raised). A skipped round's directory holds the
    adapter it started from and its row says why (``skipped``).

    Under DP a failed attempt released nothing: the plain path discards its noised sum, the
    secure path fails before unmasking (or, for a weight no client declared, keeps the sum
    to the server, which DP's central placement trusts anyway).
    """
    server = run.cfg.server
    retries = server.round_retries if server.failed_round == "retry" else 0
    excluded: set[int] = set()
    failures: list[str] = []
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        try:
            return one_round(run, grid, global_state, server_round, frozenset(excluded))
        except RoundFailed as err:
            if server.failed_round == "stop":
                raise
            failures.append(str(err) if attempt == 0 else f"retry {attempt}: {err}")
            excluded |= err.suspects
            if attempt < retries:
                left_out = f" without nodes {sorted(excluded)}" if excluded else ""
                log.warning(
                    "round %d failed: %s; retrying%s (%d of server.round_retries=%d)",
                    server_round,
                    err,
                    left_out,
                    attempt + 1,
                    retries,
                )
    log.warning("round %d skipped: %s; the run goes on", server_round, failures[-1])
    row = MetricsRow(
        round=server_round,
        eval_loss=run.last_eval,
        seconds=time.perf_counter() - t0,
        skipped=" | ".join(failures),
    )
    run.save(server_round, global_state, row)
    progress.events.round_finished(row)
    return global_state


def one_round(
    run: ServerRun,
    grid: Grid,
    global_state: AdapterState,
    server_round: int,
    excluded: frozenset[int] = frozenset(),
) -> AdapterState:
    """Train, aggregate, step, evaluate, save and record one round; the new global state.
    Nodes in ``excluded`` are not asked."""
    t0 = time.perf_counter()
    record, delta = aggregate_round(run, grid, global_state, server_round, excluded)
    before = copy.deepcopy(run.optimizer.state_dict())
    candidate = apply_delta(global_state, delta, run.optimizer)
    eval_loss = run.evaluate(candidate)
    rejected = rejection(run, candidate, eval_loss)
    if rejected is None:
        global_state, run.last_eval = candidate, eval_loss
    else:
        log.warning(
            "round %d rejected: %s; the global adapter stays as it was", server_round, rejected
        )
        run.optimizer.load_state_dict(before)
        eval_loss = run.last_eval
    row = MetricsRow(
        round=server_round,
        eval_loss=eval_loss,
        train_loss=record.train_loss if record.ok else None,  # none counted: DP noise only
        bytes_up=record.bytes_up,
        bytes_down=record.bytes_down,
        seconds=time.perf_counter() - t0,
        client_eval_loss=weighted_client_eval(record.clients),
        clients_ok=record.ok,
        clients_dropped=record.dropped,
        clients=record.clients,
        dropped=record.dropped_clients,
        secagg=record.secagg,
        dp=record.dp,
        robust=record.robust,
        rejected=rejected,
    )
    run.save(server_round, global_state, row)
    progress.events.round_finished(row)
    log.info(
        "round %d/%d done in %.1f s: eval_loss %.4f, train_loss %.4f, %d ok, %d dropped",
        server_round,
        run.cfg.server.rounds,
        row.seconds,
        eval_loss if math.isfinite(eval_loss) else float("nan"),
        record.train_loss,
        record.ok,
        record.dropped,
    )
    return global_state


def rejection(run: ServerRun, candidate: AdapterState, eval_loss: float) -> str | None:
    """Why ``candidate`` must not become the global adapter, or None: a non-finite value, a
    non-finite eval loss, or one over ``server.reject_loss_factor`` times the last."""
    for key, value in candidate.items():
        if not bool(torch.isfinite(value).all()):
            return f"the new global adapter has NaN or Inf values in {key}"
    if not run.cfg.server.evaluate:
        return None
    if not math.isfinite(eval_loss):
        return f"the new global adapter's eval loss is {eval_loss}"
    factor, last = run.cfg.server.reject_loss_factor, run.last_eval
    if factor and math.isfinite(last) and eval_loss > factor * last:
        return (
            f"the new global adapter's eval loss {eval_loss:.4f} is over "
            f"server.reject_loss_factor={factor:g} times the last one ({last:.4f})"
        )
    return None


def aggregate_round(
    run: ServerRun,
    grid: Grid,
    global_state: AdapterState,
    server_round: int,
    excluded: frozenset[int] = frozenset(),
) -> tuple[RoundRecord, AdapterState]:
    """Sample nodes (none of ``excluded``), send the train messages, and aggregate the
    replies: (record, delta).

    Raises:
        RoundFailed: fewer than ``server.min_replies`` replies counted, or the aggregator could
            not produce a delta.
    """
    cfg, out = run.cfg, run.out
    strategy = run.strategy
    strategy.clip_norm = run.dp.clip_norm if run.dp is not None else None
    strategy.set_global(global_state, server_round)
    messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
    messages = [m for m in messages if m.metadata.dst_node_id not in excluded]
    log.info("round %d/%d: training on %d clients", server_round, cfg.server.rounds, len(messages))
    progress.events.round_started(server_round, [m.metadata.dst_node_id for m in messages])
    plan = strategy.plan(server_round, messages, _log_reply(server_round, len(messages)))
    plan.max_examples = cfg.server.max_examples
    plan.uniform = cfg.strategy.weighting == "uniform"
    plan.robust = cfg.robust if cfg.robust.enabled else None
    needed = cfg.server.min_replies
    if run.dp is not None:
        count_keys = run.merge.count_keys
        payload = sum(math.prod(s) for k, s in plan.spec.shapes.items() if k not in count_keys)
        plan.release = run.dp.release(
            count_keys, strategy.population, server_round, len(messages), payload
        )
        run.dp.check_budget(server_round, strategy.population, plan.release)
        needed = min(needed, len(messages))  # a small Poisson sample still releases its sum
    kept = f"the global adapter stays at round {server_round - 1} in {out}"
    try:
        record = run.aggregator.aggregate(grid, plan)
    except RoundFailed as err:
        raise RoundFailed(f"{err}; {kept}", err.suspects) from None
    if record.delta is None or (record.ok < needed and not record.noise_only):
        missing = len(messages) - record.ok - record.dropped
        raise RoundFailed(
            f"round {server_round}: {record.ok} good replies ({record.dropped} dropped, "
            f"{missing} missing), server.min_replies={cfg.server.min_replies}; {kept}",
            frozenset(record.dropped_nodes),
        )
    if run.dp is not None and plan.release is not None:
        record.dp = run.dp.record(strategy.population, len(messages), plan.release)
    return record, record.delta


def _log_reply(server_round: int, total: int) -> OnReply:
    seen = 0

    def on_reply(summary: dict[str, Any]) -> None:
        nonlocal seen
        seen += 1
        log.info(
            "round %d: client %s (node %s) done %d/%d: train_loss %.4f, %d examples, "
            "%d steps in %.1f s",
            server_round,
            summary.get("client-id", "?"),
            summary["node"],
            seen,
            total,
            summary["train-loss"],
            summary["num-examples"],
            summary.get("steps", 0),
            summary.get("seconds", 0.0),
        )

    return on_reply
