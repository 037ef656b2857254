"""The research commands: ``fedllama leakage`` (membership inference against a round's global
adapter) and ``fedllama canaries`` (canaries' exposure and the one-run ε lower bound). Each
rebuilds what a run trained on from its saved config and measures it under the round's global
model (docs/leakage.md); the composition root (``fedllama/cli.py``) adds and dispatches them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedllama import config as config_lib

log = logging.getLogger("fedllama.cli")

COMMANDS = ("leakage", "canaries")


def add_commands(sub: Any) -> None:
    """Add ``leakage`` and ``canaries`` to the ``fedllama`` command's subparsers."""
    _add_leakage(sub)
    _add_canaries(sub)


def run_command(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; its exit status."""
    return _leakage(args) if args.command == "leakage" else _canaries(args)


def _add_leakage(sub: Any) -> None:
    p = sub.add_parser("leakage", help="membership inference against a round's global adapter")
    p.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/demo")
    p.add_argument("--round", type=int, help="the round to attack (default: the last)")
    p.add_argument(
        "--max-examples", type=int, default=200, help="members per client at most (default 200)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the balancing and the bootstrap")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the run's)")


def _leakage(args: argparse.Namespace) -> int:
    """``fedllama leakage``: rebuild each client's members and non-members, measure them under
    the round's global model and its base, print the table, write ``leakage-round-NNN.json``."""
    from fedllama import data, model
    from fedllama.experiments import leakage
    from fedllama.model import likelihood, replay, serve

    def progress(done: int, total: int) -> None:  # a line per 32 examples, and the last
        if done == total or done // 32 > (done - cfg.train.eval_batch_size) // 32:
            seconds = time.perf_counter() - started
            log.info("leakage: measured %d/%d examples in %.0f s", done, total, seconds)

    try:
        if args.max_examples < 1 or args.resamples < 1:
            raise leakage.LeakageError("--max-examples and --resamples must be >= 1")
        run = leakage.open_run(args.run_dir, args.round)
        cfg = run.cfg
        lm, tok = serve.load_round_model(serve.open_round(run.round_dir), args.device)
        cache = model.cache_root(cfg.model)
        federation = data.build_federation(cfg.data, cfg.simulation.num_clients, cache)
        clients = replay.membership(cfg, tok, federation, run.participation())
        leakage.check_rebuilt(run, {c.client_id: c.train_size for c in clients})
        picked = [
            leakage.balance(c.members, c.non_members, args.max_examples, f"{args.seed}-{i}")
            for i, c in enumerate(clients)
        ]
        flat = [x for members, non_members in picked for x in (*members, *non_members)]
        log.info("leakage: measuring %d examples with and without the adapter", len(flat))
        started = time.perf_counter()
        stats = iter(likelihood.answer_stats(lm, tok, flat, cfg.train.eval_batch_size, progress))
        samples = []
        for c, (members, non_members) in zip(clients, picked, strict=True):
            measured_m = [next(stats) for _ in members]  # flat's order: members, non-members
            measured_n = [next(stats) for _ in non_members]
            available = (len(c.members), len(c.non_members))
            samples.append(
                leakage.ClientSample(c.client_id, c.institutions, measured_m, measured_n, available)
            )
        report = leakage.build_report(run, samples, args.seed, args.resamples, args.max_examples)
    except (leakage.LeakageError, serve.ServeError, model.ModelError, data.DataError) as err:
        print(f"fedllama: {err}", file=sys.stderr)
        return 2
    print(leakage.format_report(report))
    print(f"written: {leakage.write_report(report, run.directory, run.server_round)}")
    return 0


def _add_canaries(sub: Any) -> None:
    p = sub.add_parser("canaries", help="canaries' exposure and an empirical ε lower bound")
    p.add_argument("run_dir", type=Path, help="a run made with data.canary.count > 0")
    p.add_argument("--rounds", default="last", help="last (default), all, or e.g. 0,1,3")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the run's)")


def _canary_rounds(run_dir: Path, wanted: str) -> list[int]:
    from fedllama.server import checkpoint

    last = checkpoint.last_round(run_dir)
    if last is None:
        raise config_lib.ConfigError(
            f"{run_dir} holds no finished round", hint="pass a run's output.dir (e.g. runs/demo)"
        )
    if wanted in ("last", "all"):
        return [last] if wanted == "last" else list(range(last + 1))
    try:
        rounds = sorted({int(r) for r in wanted.split(",")})
    except ValueError:
        rounds = [-1]
    if not all(0 <= r <= last for r in rounds):
        raise config_lib.ConfigError(
            f"--rounds {wanted!r}: rounds 0..{last} are on disk", hint="e.g. --rounds all"
        )
    return rounds


def _canaries(args: argparse.Namespace) -> int:
    """``fedllama canaries``: each round's exposure of the inserted canaries, the held-out
    ones as the baseline, the one-run ε lower bound beside the accountant's ε."""
    from fedllama import data
    from fedllama.data import canaries as canary_data
    from fedllama.experiments import canaries
    from fedllama.model import likelihood, serve
    from fedllama.server.checkpoint import round_dir
    from fedllama.server.metrics import read_rows

    cfg = config_lib.from_yaml((args.run_dir / "config.yaml").read_text())
    spec = cfg.data.canary
    if not spec.count:
        raise config_lib.ConfigError(
            f"{args.run_dir} was run without canaries (data.canary.count=0)",
            hint="run it with data.canary.count=20 (and data.canary.repeats, data.canary.client)",
        )
    rows = {r.round: r for r in read_rows(args.run_dir)}
    candidates = canary_data.candidates(spec)
    for server_round in _canary_rounds(args.run_dir, args.rounds):
        source = serve.open_round(round_dir(args.run_dir, server_round))
        lm, tok = serve.load_round_model(source, args.device)
        examples = [
            c.example(secret)
            for c in candidates
            for secret in (c.secret, *canary_data.references(spec, c))
        ]
        encoded = data.encode_all(tok, examples, cfg.data)
        if len(encoded) != len(examples):  # a canary is a few dozen tokens: never cut
            raise data.DataError(f"data.max_seq_len={cfg.data.max_seq_len} cuts a canary")
        stats = likelihood.answer_stats(
            lm, tok, encoded, cfg.train.eval_batch_size, with_base=False
        )
        losses = [-float(s.logprob.sum()) for s in stats]
        step = 1 + spec.references
        report = canaries.measure(
            [(c.inserted, losses[i * step], losses[i * step + 1 : (i + 1) * step])
             for i, c in enumerate(candidates)],
            rows[server_round].dp if server_round in rows else None,
        )  # fmt: skip
        print(canaries.format_line(server_round, report))
        canaries.write(report, args.run_dir, server_round)
    return 0
