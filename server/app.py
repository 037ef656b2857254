"""ServerApp: read the config, build the merge strategy, run the rounds.

The config comes from the run config (``flwr run . --run-config 'config="my.yaml"
overrides="server.rounds=2 lora.r=16"'``; a relative path is taken from the app directory) or,
for ``fedllama simulate`` (whose in-process engine passes no run config), from the
``FEDLLAMA_CONFIG`` environment variable.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import strategies
from fedllama import config as config_lib
from fedllama.config import Config
from fedllama.experiments import report
from fedllama.merge import MergeStrategy
from fedllama.runtime import setup_logging, stay_offline
from fedllama.server.metrics import MetricsRow

APP_DIR = Path(__file__).resolve().parent.parent
log = logging.getLogger("fedllama.server")

stay_offline()  # before transformers is imported
app = ServerApp()


def _able(cfg: Config, accepts: Callable[[MergeStrategy], bool]) -> str:
    """The registered strategies ``accepts`` admits under ``cfg``, for an error message."""
    return ", ".join(n for n, build in sorted(strategies.REGISTRY.items()) if accepts(build(cfg)))


def check(cfg: Config) -> None:
    """Checks that need the strategy registry (run before any model or data is loaded)."""
    strategy = strategies.build(cfg)
    if cfg.secagg.enabled and not strategy.summable:
        name = strategy.name
        if name == "flexlora":
            name += f" (strategy.flexlora_form={cfg.strategy.flexlora_form}; dense is summable)"
        raise config_lib.ConfigError(
            f"secagg.enabled: strategy {name} is a trusted-server rule: it needs each client's "
            "own encoding (summable = False), and secure aggregation shows the server only "
            f"their sum; use a summable strategy ({_able(cfg, lambda s: s.summable)}) or "
            "secagg.enabled=false"
        )
    mixed = sorted(set(cfg.lora.client_ranks) - {cfg.lora.r})
    if mixed and not strategy.mixed_ranks:
        raise config_lib.ConfigError(
            f"lora.client_ranks: strategy {strategy.name} needs every client at lora.r="
            f"{cfg.lora.r}, but client_ranks has {mixed}; use a mixed-rank strategy "
            f"({_able(cfg, lambda s: s.mixed_ranks)})"
        )
    if cfg.dp.enabled and strategy.dp_refusal:
        raise config_lib.ConfigError(
            f"dp.enabled: strategy {strategy.name} cannot be made differentially private: "
            f"{strategy.dp_refusal}; use one of {_able(cfg, lambda s: not s.dp_refusal)}"
        )
    if cfg.robust.combiner != "mean" and strategy.robust_refusal:
        raise config_lib.ConfigError(
            f"robust.combiner: {cfg.robust.combiner} cannot stand in for strategy "
            f"{strategy.name}'s merge: {strategy.robust_refusal}; use one of "
            f"{_able(cfg, lambda s: not s.robust_refusal)}"
        )
    if cfg.robust.bounded and strategy.dp_refusal:
        raise config_lib.ConfigError(
            f"robust.norm_bound: strategy {strategy.name}'s encoding is not its weight times "
            f"the client's update, so the server cannot bound the update's norm: "
            f"{strategy.dp_refusal}; use one of {_able(cfg, lambda s: not s.dp_refusal)}"
        )
    _check_adapter(cfg, strategy)
    if strategy.residual and (cfg.server.optimizer != "sgd" or cfg.server.lr != 1.0):
        raise config_lib.ConfigError(
            f"server.optimizer: strategy {strategy.name} is exact (each round's merged update is "
            f"folded into a frozen residual adapter), which a server optimizer step would break; "
            f"it needs server.optimizer=sgd and server.lr=1.0, got {cfg.server.optimizer} with "
            f"lr {cfg.server.lr}"
        )


def _check_adapter(cfg: Config, strategy: MergeStrategy) -> None:
    """DoRA, expert LoRA and the dense adapter kinds against the strategy
    (docs/adapters.md)."""
    if cfg.adapter.dense and strategy.dense_refusal:
        raise config_lib.ConfigError(
            f"adapter.kind: strategy {strategy.name} cannot merge a {cfg.adapter.kind} adapter: "
            f"{strategy.dense_refusal}; use one of {_able(cfg, lambda s: not s.dense_refusal)}"
        )
    if cfg.lora.parameters() and strategy.name != "fedavg":
        raise config_lib.ConfigError(
            f"lora.target_parameters: strategy {strategy.name} cannot merge expert LoRA: peft "
            "keeps every expert's rank slots in one factor, which rank slots, zero padding "
            "and B·A products read as one rank-r factor; use fedavg (A and B averaged "
            "separately, as peft trains them)"
        )
    if cfg.lora.use_dora and strategy.dora_refusal:
        raise config_lib.ConfigError(
            f"lora.use_dora: strategy {strategy.name} cannot merge DoRA's magnitude vectors: "
            f"{strategy.dora_refusal}; use one of {_able(cfg, lambda s: not s.dora_refusal)}"
        )


def load_run_config(run_config: dict[str, object]) -> Config:
    """The fedllama config named by the run config, or by ``FEDLLAMA_CONFIG``."""
    path = run_config.get("config") or os.environ.get("FEDLLAMA_CONFIG")
    if not isinstance(path, str) or not path:
        raise config_lib.ConfigError(
            "no config: set run config 'config' (flwr run) or FEDLLAMA_CONFIG"
        )
    overrides = str(run_config.get("overrides") or os.environ.get("FEDLLAMA_OVERRIDES", ""))
    p = Path(path)
    cfg = config_lib.load(p if p.is_absolute() else APP_DIR / p, shlex.split(overrides))
    check(cfg)
    return cfg


def serve(grid: Grid, cfg: Config) -> list[MetricsRow]:
    """Run or resume the rounds, then write the run's report (``report.md``, its plots) and
    summarise them; the metrics rows."""
    from fedllama.server.loop import run_server  # imports transformers: after stay_offline()

    rows = run_server(grid, cfg, strategies.build(cfg))
    out = Path(cfg.output.dir)
    try:  # the rounds are saved: a report that cannot be written does not fail the run
        written = report.write_run_report(out, plots=cfg.output.plot)
    except (OSError, ValueError) as err:
        log.warning("no report written (%s); `fedllama report %s` retries it", err, out)
    else:
        log.info("report: %s", written)
    log.info("finished; metrics in %s\n%s", out / "metrics.jsonl", report.summary(rows))
    return rows


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run or resume the federation described by the config."""
    setup_logging()
    serve(grid, load_run_config(dict(context.run_config)))
