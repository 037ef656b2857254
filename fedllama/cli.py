"""The ``fedllama`` command.

    fedllama simulate CONFIG [key=value ...]   run a federation on Flower's simulation engine
    fedllama prepare  CONFIG [key=value ...]   build the cached base model and demo data only
    fedllama check    CONFIG [key=value ...]   validate a config and print it resolved
    fedllama credentials create|node-key ...   CA, SuperLink certificate, SuperNode keys
    fedllama deploy superlink|supernode|register ...   start a deployment over gRPC (TLS + auth)
    fedllama generate ROUND_DIR --prompt TEXT    answer one prompt with a round's global model
    fedllama chat     ROUND_DIR                  talk to it (lines from stdin, /exit to end)
    fedllama export   ROUND_DIR OUT [--merged]   write it as a PEFT adapter or a merged model
    fedllama leakage  RUN_DIR [--round N]        membership inference against a round's adapter
    fedllama canaries RUN_DIR [--rounds all]     canaries' exposure, an empirical ε lower bound
    fedllama sweep    SWEEP.yaml [key=value ...]  a grid of overrides x seeds, resumable
    fedllama report   RUN_DIR                    the run's report.md (written after every run too)
    fedllama baseline CONFIG [key=value ...] [--kind centralized|local|both]
                                                 centralized and local-only baselines of a run

``simulate`` runs the same ServerApp and ClientApp that ``pyproject.toml`` declares for
``flwr run`` (``server.app:app``, ``clients.app:app``). This module is the composition root: the
one library module that imports the apps (``docs/architecture.md``), and only when a command
needs them, so ``credentials`` and ``deploy`` start without torch or Flower's app API.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
import traceback
from argparse import SUPPRESS
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from fedllama import config as config_lib
from fedllama import progress, research
from fedllama.console import LiveView, RunLog, plain_lines
from fedllama.deploy import cli as deploy_cli
from fedllama.errors import UserError
from fedllama.experiments import report as report_lib
from fedllama.experiments import sweep as sweep_lib
from fedllama.runtime import quiet_libraries, setup_logging, stay_offline

log = logging.getLogger("fedllama.cli")

RUN_LOG = "run.log"
"""In the output directory: every line the libraries printed during ``fedllama simulate``."""


def _load_checked(args: argparse.Namespace) -> config_lib.Config:
    """The command's config, loaded and checked; any refusal is a ConfigError."""
    from server.app import check

    try:
        cfg = config_lib.load(args.config, args.overrides)
        check(cfg)
    except config_lib.ConfigError:
        raise
    except ValueError as err:  # a check across sections, the registry's unknown name
        raise config_lib.ConfigError(str(err)) from err
    return cfg


def prepare(cfg: config_lib.Config) -> None:
    """Build every on-disk cache a run needs (demo data, base model, NF4 base) up front.

    Done once in the launching process so that simulated clients never race to build them. The
    data comes first: a file with no usable rows is found before minutes of model building.
    """
    from fedllama import data, model

    t0 = time.perf_counter()
    pool = data.load_pool(cfg.data, model.cache_root(cfg.model))
    base_dir = model.resolve_base_dir(cfg.model)
    model.get_lora_model(cfg)
    log.info(
        "prepared %s (%s) and %d examples from %d institutions in %.1f s",
        base_dir,
        cfg.model.quantization,
        sum(len(v) for v in pool.values()),
        len(pool),
        time.perf_counter() - t0,
    )


def preflight(cfg: config_lib.Config) -> None:
    """What can be refused before anything is built: an output directory that holds a different
    run, TensorBoard asked for but not installed."""
    from fedllama.server import checkpoint, tensorboard

    checkpoint.check_resumable(Path(cfg.output.dir), cfg)
    if cfg.output.tensorboard:
        tensorboard.require()
    _check_resources(cfg.simulation)


def _check_resources(sim: config_lib.SimulationConfig) -> None:
    """A client's CPUs and GPUs must fit this machine, or Flower's actor pool is empty and its
    runtime crashes mid-run; a cluster's (``simulation.ray_address``) are the cluster's."""
    if sim.ray_address:
        return
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if sim.client_cpus > cpus:
        raise config_lib.ConfigError(
            f"simulation.client_cpus={sim.client_cpus}: this machine has {cpus} CPUs",
            hint=f"simulation.client_cpus={cpus} or less",
        )
    if sim.client_gpus > gpus:
        raise config_lib.ConfigError(
            f"simulation.client_gpus={sim.client_gpus}: this machine has {gpus} CUDA devices",
            hint="simulation.client_gpus=0 (train on the CPU)" if not gpus else
            f"simulation.client_gpus={gpus} or a fraction, e.g. 0.5 (two clients per GPU)",
        )  # fmt: skip


def _view(cfg: config_lib.Config, run_log: RunLog, verbose: bool, live_dir: Path) -> Any:
    """How the run shows: with ``-v`` everything as it comes (``run.log`` is echoed); on a
    terminal the live view; elsewhere fedllama's plain lines."""
    if verbose:
        return contextlib.nullcontext()
    if run_log.out.isatty():
        title = (
            f"fedllama simulate: {cfg.strategy.name}, {cfg.simulation.num_clients} clients, "
            f"{cfg.output.dir}  (library output: {cfg.output.dir}/run.log)"
        )
        return LiveView(run_log.out, cfg.server.rounds, title, live_dir)
    return plain_lines(run_log.err)


def _backend_config(sim: config_lib.SimulationConfig) -> dict[str, Any]:
    """Flower's Ray backend: each client's resources, and the cluster to join, if any."""
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus},
        "init_args": {"include_dashboard": False, "logging_level": logging.ERROR},
    }
    if sim.ray_address:  # clients run on an existing cluster's workers
        backend_config["init_args"]["address"] = sim.ray_address
        log.info("simulation: connecting to the Ray cluster at %s", sim.ray_address)
    return backend_config


def simulate(cfg: config_lib.Config, verbose: bool = False) -> int:
    """Run the federation on Flower's simulation engine (Ray); return a process exit code.

    Everything libraries print (Flower, Ray's workers, transformers, warnings) goes to
    ``<output.dir>/run.log``; the terminal shows the live view (or plain lines, or, with
    ``verbose``, everything).
    """
    from flwr.simulation import run_simulation

    import clients.app
    import server.app
    from fedllama.server import checkpoint

    preflight(cfg)
    out = Path(cfg.output.dir)
    t0 = time.perf_counter()
    with (
        RunLog(out / RUN_LOG, echo=verbose) as run_log,
        tempfile.TemporaryDirectory(prefix="fedllama-live-") as live_dir,
        _view(cfg, run_log, verbose, Path(live_dir)),
        tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh,
    ):
        prepare(cfg)
        fh.write(config_lib.to_yaml(cfg))
        fh.flush()
        os.environ["FEDLLAMA_CONFIG"] = fh.name
        os.environ.pop("FEDLLAMA_OVERRIDES", None)
        os.environ[progress.LIVE_DIR_ENV] = live_dir  # Ray's workers inherit it
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # a Ray tip per actor
        crashed = None
        try:
            run_simulation(
                server_app=server.app.app,
                client_app=clients.app.app,
                num_supernodes=cfg.simulation.num_clients,
                backend_config=_backend_config(cfg.simulation),
            )
        except RuntimeError as err:  # Flower's "Simulation Runtime crashed" (Ray did not start)
            crashed = err
        os.environ.pop(progress.LIVE_DIR_ENV, None)
    if crashed is not None:
        _exit_after_crash(crashed, out)
    done = checkpoint.last_round(out) or 0
    print(
        f"{done}/{cfg.server.rounds} rounds in {time.perf_counter() - t0:.0f} s; "
        f"adapters in {out}/round-NNN"
    )
    if (out / "loss.png").is_file():
        print(f"plot: {out / 'loss.png'}")
    print(f"library output (Flower, Ray, transformers): {out / RUN_LOG}")
    if done < cfg.server.rounds:
        print(f"fedllama: the run stopped early; see {out / RUN_LOG}", file=sys.stderr)
    return 0 if done >= cfg.server.rounds else 1


def _exit_after_crash(err: RuntimeError, out: Path) -> NoReturn:
    """End the process when Flower's simulation runtime crashed: its ServerApp thread is left
    waiting for replies that never come (up to ``server.timeout_s``), and it cannot be stopped,
    so a clean return would hang. Ray is shut down first; run.log has the traceback."""
    import ray

    cause: BaseException = err
    while cause.__cause__ is not None:  # Flower wraps the reason twice
        cause = cause.__cause__
    print(f"fedllama: the simulation runtime crashed: {cause}", file=sys.stderr)
    print(f"fedllama: its traceback is in {out / RUN_LOG}", file=sys.stderr)
    ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


ROUND_COMMANDS = ("generate", "chat", "export")
"""Commands over a finished round directory; they take no fedllama config."""


def _device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or value.startswith("cuda:"):
        return value
    raise argparse.ArgumentTypeError(f"got {value!r}, expected auto, cpu, cuda or cuda:N")


def _add_round_commands(sub: Any) -> None:
    help_round = "a round directory, e.g. runs/demo/round-003"
    gen = sub.add_parser("generate", help="answer one prompt with a round's global model")
    gen.add_argument("round_dir", type=Path, help=help_round)
    gen.add_argument("--prompt", required=True, help="the user's message")
    chat = sub.add_parser("chat", help="talk to a round's global model (stdin, /exit to end)")
    chat.add_argument("round_dir", type=Path, help=help_round)
    for p in (gen, chat):
        p.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit")
        p.add_argument("--device", type=_device, help="auto, cpu, cuda or cuda:N (default: run's)")
    exp = sub.add_parser("export", help="write a round as a PEFT adapter or a merged model")
    exp.add_argument("round_dir", type=Path, help=help_round)
    exp.add_argument("out", type=Path, help="output directory (empty or new)")
    exp.add_argument("--merged", action="store_true", help="merge the adapter into the base")
    exp.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype")
    exp.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def _stdin_lines() -> Iterator[str]:
    """Lines of stdin: read as they come when piped, with a prompt on a terminal."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    print("fedllama chat: one message per line; /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def _round_command(args: argparse.Namespace) -> int:
    """Run ``generate``, ``chat`` or ``export``; a bad round, base or output is one line on
    stderr and exit code 2."""
    from fedllama.model import ModelError, serve
    from fedllama.model import export as export_lib
    from fedllama.model.adapters import AdapterError

    try:
        source = serve.open_round(args.round_dir)
        if args.command == "export":
            write = export_lib.export_merged if args.merged else export_lib.export_adapter
            out = write(source, args.out, args.dtype, args.force)
            print(f"{'merged model' if args.merged else 'PEFT adapter'} written to {out}")
            return 0
        if args.max_new_tokens < 1:
            raise serve.ServeError(f"--max-new-tokens: got {args.max_new_tokens}, expected >= 1")
        model, tokenizer = serve.load_round_model(source, args.device)
        system = source.system_prompt
        if args.command == "generate":
            messages = serve.conversation(system, [{"role": "user", "content": args.prompt}])
            print(serve.answer(model, tokenizer, messages, args.max_new_tokens))
        else:
            serve.chat(model, tokenizer, _stdin_lines(), sys.stdout, system, args.max_new_tokens)
        return 0
    except (serve.ServeError, ModelError, AdapterError, config_lib.ConfigError, OSError) as err:
        print(f"fedllama: {err}", file=sys.stderr)
        return 2


def _add_baseline_command(sub: Any) -> None:
    p = sub.add_parser("baseline", help="centralized and local-only baselines of a config")
    p.add_argument("config", help="YAML config, e.g. simulations/configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as the run had them")
    p.add_argument("--kind", default="both", help="centralized, local or both (default)")


def _baseline_command(args: argparse.Namespace) -> int:
    """``fedllama baseline``: measure the baselines into ``<output.dir>/baselines/``, refresh
    the run's report when the directory holds a run, and print the comparison."""
    from fedllama.model import baseline

    if args.kind not in baseline.KINDS:
        raise config_lib.ConfigError(
            f"--kind {args.kind!r}: expected one of {', '.join(baseline.KINDS)}",
            hint="e.g. --kind centralized",
        )
    cfg = _load_checked(args)
    out = Path(cfg.output.dir)
    saved = out / "config.yaml"
    if saved.is_file():  # a baseline beside a run must be of the run's config
        differ = report_lib.baseline_differences(
            baseline.resolved_keys(cfg), config_lib.from_yaml(saved.read_text())
        )
        if differ:
            raise config_lib.ConfigError(
                f"output.dir={str(out)!r} holds a run of another config ({differ})",
                hint=f"pass the run's own config and overrides, or a new output.dir ({saved})",
            )
    for path in baseline.run_baselines(cfg, args.kind):
        print(f"written: {path}")
    if (out / "metrics.jsonl").is_file():
        print(f"report: {report_lib.write_run_report(out, cfg.output.plot)}")
        for line in report_lib.baseline_summary(out):
            print(line)
    return 0


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
    _add_round_commands(sub)
    research.add_commands(sub)
    sweep_lib.add_sweep_command(sub)
    report_lib.add_report_command(sub)
    _add_baseline_command(sub)
    verbose = "show tracebacks, and every library's output as it comes (simulate)"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    for command in sub.choices.values():  # after the command too: fedllama simulate X -v
        command.add_argument("-v", "--verbose", action="store_true", default=SUPPRESS, help=verbose)
    args = parser.parse_args(argv)
    stay_offline()
    setup_logging()
    try:
        return _run_command(args)
    except UserError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"fedllama: {err}", file=sys.stderr)
        if err.hint:
            print(f"fedllama: to fix: {err.hint}", file=sys.stderr)
        return 2


def _run_command(args: argparse.Namespace) -> int:
    if args.command in deploy_cli.COMMANDS:
        return deploy_cli.run_command(args)
    if args.command in (*ROUND_COMMANDS, *research.COMMANDS, "baseline") and not args.verbose:
        quiet_libraries()  # their output is the answer; simulate keeps the chatter in run.log
        if args.command in ROUND_COMMANDS:  # and the answer alone: no "base model loaded"
            logging.getLogger("fedllama").setLevel(logging.WARNING)
    if args.command in ROUND_COMMANDS:
        return _round_command(args)
    if args.command in research.COMMANDS:
        return research.run_command(args)
    if args.command == "sweep":
        from server.app import check

        return sweep_lib.sweep_command(args, check=check)
    if args.command == "report":
        return report_lib.report_command(args)
    if args.command == "baseline":
        return _baseline_command(args)
    cfg = _load_checked(args)
    if args.command == "check":
        print(config_lib.to_yaml(cfg), end="")
        return 0
    if args.command == "prepare":
        preflight(cfg)
        prepare(cfg)
        return 0
    return simulate(cfg, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
