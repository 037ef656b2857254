"""The server's round loop: configure, stream replies, merge, step, evaluate, checkpoint.

Flower's ``Strategy.start`` always counts rounds from 1 and keeps no state on disk; this loop
drives the same strategy hooks (``configure_train`` / ``aggregate_train``) so that a run resumes
after its last completed round and every round lands on disk before the next one starts.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedllama import adapters, checkpoint, data, model, report, secagg, train
from fedllama.adapters import AdapterState
from fedllama.config import Config, to_yaml
from fedllama.flower import FedLlamaStrategy, stream_replies
from fedllama.merge import (
    MergeStrategy,
    ResidualMergeStrategy,
    add_residual,
    rank_of,
    residual_view,
    split_residual,
    with_prefix,
    with_residual,
)
from fedllama.optimizer import ServerOptimizer, build_server_optimizer

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """Too few good replies; the global adapter stays as it was after the previous round."""


class Evaluator:
    """Scores global adapters on the global eval split with the server's own model copy."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.model, self.tokenizer = model.get_lora_model(cfg)
        pool = data.load_pool(cfg.data, model.cache_root(cfg.model))
        held, _ = data.hold_out_global(pool, cfg.data.global_eval_size, cfg.data.seed)
        self.examples = data.encode_all(self.tokenizer, held, cfg.data)

    def initial_adapter(self) -> AdapterState:
        """A freshly initialised adapter (peft's init: A random, B zero) from ``data.seed``."""
        return model.fresh_adapter(self.model, self.cfg.data.seed)

    def __call__(self, adapter: AdapterState, residual: AdapterState | None = None) -> float:
        if not self.cfg.server.evaluate:
            return float("nan")
        model.set_residual(self.model, residual or {}, self.cfg)
        adapters.set_adapter_state(self.model, adapter)
        return train.evaluate(
            self.model,
            self.examples,
            self.cfg.train.eval_batch_size,
            int(self.tokenizer.pad_token_id),
        )


def _log_reply(server_round: int, total: int) -> Any:
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


def _weighted_client_eval(clients: list[dict[str, Any]]) -> float | None:
    """Clients' own eval loss after training (personalised), weighted by examples."""
    scored = [
        (c["num-examples"], c["client-eval-loss"]) for c in clients if "client-eval-loss" in c
    ]
    if not scored:
        return None
    return float(sum(n * loss for n, loss in scored) / sum(n for n, _ in scored))


def _server_view(
    cfg: Config, merge: MergeStrategy, global_state: AdapterState
) -> tuple[AdapterState, AdapterState]:
    """What the evaluator scores: the view at ``lora.r`` and its residual."""
    return merge.client_view(global_state, cfg.lora.r), residual_view(
        merge, global_state, cfg.lora.r
    )


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


def apply_delta(
    global_state: AdapterState, delta: AdapterState, optimizer: ServerOptimizer
) -> AdapterState:
    """The next global state: the optimizer steps the trainable adapter, and a residual
    increment (exact strategies) is added to the residual's product."""
    lora, residual = split_residual(global_state)
    lora_delta, increment = split_residual(delta)
    stepped = optimizer.step(lora, lora_delta)
    if increment:
        residual = add_residual(residual, increment)
    return {**stepped, **with_prefix(residual)}


def run_server(grid: Grid, cfg: Config, merge: MergeStrategy) -> list[dict[str, Any]]:
    """Run (or resume) ``server.rounds`` rounds; return the metrics rows.

    Raises:
        RoundFailed: a round got fewer than ``server.min_replies`` good replies.
    """
    out = Path(cfg.output.dir)
    checkpoint.check_resumable(out, cfg)
    checkpoint.write_config(out, cfg)
    base_dir = model.resolve_base_dir(cfg.model)
    evaluator = Evaluator(cfg)
    optimizer = build_server_optimizer(cfg.server)
    strategy = FedLlamaStrategy(
        merge,
        to_yaml(cfg),
        rank=cfg.lora.r,
        fraction_train=cfg.server.fraction_train,
        min_nodes=cfg.server.min_replies,
    )

    done = checkpoint.last_round(out)
    if done is None:
        global_state = merge.init_global(evaluator.initial_adapter())
        t0 = time.perf_counter()
        eval_loss = evaluator(*_server_view(cfg, merge, global_state))
        checkpoint.save_round(
            out,
            0,
            global_state,
            optimizer.state_dict(),
            base_dir,
            round_adapters(cfg, merge, global_state),
        )
        checkpoint.truncate_metrics(out, -1)
        checkpoint.append_metrics(
            out,
            {
                "round": 0,
                "eval_loss": eval_loss,
                "train_loss": None,
                "bytes_up": 0,
                "bytes_down": 0,
                "seconds": time.perf_counter() - t0,
            },
        )
        log.info("round 0 (initial adapter): eval_loss %.4f", eval_loss)
        done = 0
    else:
        global_state, optimizer_state = checkpoint.load_global(out, done)
        optimizer.load_state_dict(optimizer_state)
        checkpoint.truncate_metrics(out, done)
        if done >= cfg.server.rounds:
            log.info("%s already holds %d rounds; nothing to do", out, done)
        else:
            log.info("resuming %s after round %d", out, done)

    for server_round in range(done + 1, cfg.server.rounds + 1):
        t0 = time.perf_counter()
        strategy.set_global(global_state, server_round)
        messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        log.info(
            "round %d/%d: training on %d clients", server_round, cfg.server.rounds, len(messages)
        )
        strategy.on_reply = _log_reply(server_round, len(messages))
        figures: dict[str, Any] | None = None
        if cfg.secagg.enabled:  # same messages and decode, but the server only sees the sum
            try:
                rep, figures = secagg.run_round(
                    grid, strategy, messages, cfg.secagg, server_round, cfg.server.timeout_s
                )
            except secagg.SecAggAbort as err:
                raise RoundFailed(
                    f"round {server_round}: secure aggregation failed: {err}; the global "
                    f"adapter stays at round {server_round - 1} in {out}"
                ) from None
        else:
            replies = stream_replies(grid, messages, cfg.server.timeout_s)
            strategy.aggregate_train(server_round, replies)
            rep = strategy.report
        if rep.ok < cfg.server.min_replies or rep.delta is None:
            raise RoundFailed(
                f"round {server_round}: {rep.ok} good replies ({rep.dropped} dropped, "
                f"{len(messages) - rep.ok - rep.dropped} missing), server.min_replies="
                f"{cfg.server.min_replies}; the global adapter stays at round {server_round - 1} "
                f"in {out}"
            )
        global_state = apply_delta(global_state, rep.delta, optimizer)
        eval_loss = evaluator(*_server_view(cfg, merge, global_state))
        checkpoint.save_round(
            out,
            server_round,
            global_state,
            optimizer.state_dict(),
            base_dir,
            round_adapters(cfg, merge, global_state),
        )
        row: dict[str, Any] = {
            "round": server_round,
            "eval_loss": eval_loss,
            "train_loss": rep.train_loss,
            "bytes_up": rep.bytes_up,
            "bytes_down": rep.bytes_down,
            "seconds": time.perf_counter() - t0,
            "client_eval_loss": _weighted_client_eval(rep.clients),
            "clients_ok": rep.ok,
            "clients_dropped": rep.dropped,
            "clients": rep.clients,
        }
        if figures is not None:
            row["secagg"] = figures
        checkpoint.append_metrics(out, row)
        log.info(
            "round %d/%d done in %.1f s: eval_loss %.4f, train_loss %.4f, %d ok, %d dropped",
            server_round,
            cfg.server.rounds,
            row["seconds"],
            eval_loss if math.isfinite(eval_loss) else float("nan"),
            rep.train_loss,
            rep.ok,
            rep.dropped,
        )

    rows = checkpoint.read_metrics(out)
    if cfg.output.plot:
        report.plot_losses(rows, out / "loss.png", title=f"fedllama: {cfg.strategy.name}")
    return rows
