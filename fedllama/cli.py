"""The ``fedllama`` command.

    fedllama simulate CONFIG [key=value ...]   run a federation on Flower's simulation engine
    fedllama prepare  CONFIG [key=value ...]   build the cached base model and demo data only
    fedllama check    CONFIG [key=value ...]   validate a config and print it resolved
    fedllama credentials create|node-key ...   CA, SuperLink certificate, SuperNode keys
    fedllama deploy superlink|supernode|register ...   start a deployment over gRPC (TLS + auth)

``simulate`` runs the same ServerApp and ClientApp that ``pyproject.toml`` declares for
``flwr run`` (``server.app:app``, ``clients.app:app``). This module is the composition root: the
one library module that imports the apps (``docs/architecture.md``), and only when a command
needs them, so ``credentials`` and ``deploy`` start without torch or Flower's app API.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedllama import config as config_lib
from fedllama.deploy import cli as deploy_cli
from fedllama.runtime import setup_logging, stay_offline

log = logging.getLogger("fedllama.cli")


def _load_checked(args: argparse.Namespace) -> config_lib.Config:
    from server.app import check

    cfg = config_lib.load(args.config, args.overrides)
    check(cfg)
    return cfg


def prepare(cfg: config_lib.Config) -> None:
    """Build every on-disk cache a run needs (base model, NF4 base, demo data) up front.

    Done once in the launching process so that simulated clients never race to build them.
    """
    from fedllama import data, model

    t0 = time.perf_counter()
    base_dir = model.resolve_base_dir(cfg.model)
    model.get_lora_model(cfg)
    pool = data.load_pool(cfg.data, model.cache_root(cfg.model))
    log.info(
        "prepared %s (%s) and %d examples from %d institutions in %.1f s",
        base_dir,
        cfg.model.quantization,
        sum(len(v) for v in pool.values()),
        len(pool),
        time.perf_counter() - t0,
    )


def simulate(cfg: config_lib.Config) -> int:
    """Run the federation on Flower's simulation engine (Ray); return a process exit code."""
    from flwr.simulation import run_simulation

    import clients.app
    import server.app
    from fedllama.server import checkpoint

    prepare(cfg)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(config_lib.to_yaml(cfg))
    os.environ["FEDLLAMA_CONFIG"] = fh.name
    os.environ.pop("FEDLLAMA_OVERRIDES", None)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray tip per actor
    backend_config: Any = {
        "client_resources": {
            "num_cpus": cfg.simulation.client_cpus,
            "num_gpus": cfg.simulation.client_gpus,
        },
        "init_args": {"include_dashboard": False, "logging_level": logging.ERROR},
    }
    if cfg.simulation.ray_address:  # clients run on an existing cluster's workers
        backend_config["init_args"]["address"] = cfg.simulation.ray_address
        log.info("simulation: connecting to the Ray cluster at %s", cfg.simulation.ray_address)
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server.app.app,
            client_app=clients.app.app,
            num_supernodes=cfg.simulation.num_clients,
            backend_config=backend_config,
        )
    finally:
        os.unlink(fh.name)
    out = Path(cfg.output.dir)
    done = checkpoint.last_round(out) or 0
    print(
        f"{done}/{cfg.server.rounds} rounds in {time.perf_counter() - t0:.0f} s; "
        f"adapters in {out}/round-NNN"
    )
    if (out / "loss.png").is_file():
        print(f"plot: {out / 'loss.png'}")
    return 0 if done >= cfg.server.rounds else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedllama`` command."""
    parser = argparse.ArgumentParser(prog="fedllama", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("simulate", "run a federation on Flower's simulation engine"),
        ("prepare", "build the cached base model and demo data"),
        ("check", "validate a config and print it resolved"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config, e.g. simulations/configs/demo.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. server.rounds=2")
    deploy_cli.add_commands(sub)  # these take no fedllama config
    args = parser.parse_args(argv)
    stay_offline()
    setup_logging()
    if args.command in deploy_cli.COMMANDS:
        return deploy_cli.run_command(args)
    try:
        cfg = _load_checked(args)
    except (config_lib.ConfigError, ValueError) as err:
        print(f"fedllama: config error: {err}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(config_lib.to_yaml(cfg), end="")
        return 0
    if args.command == "prepare":
        prepare(cfg)
        return 0
    return simulate(cfg)


if __name__ == "__main__":
    sys.exit(main())
