"""Sweeps: a grid of config overrides × seeds, run into one directory, resumed, tabulated.

A sweep file is OmegaConf YAML::

    base: ../configs/tiny.yaml           # the config every run starts from (relative to this file)
    overrides: [server.rounds=1]         # applied to every run, before the point's own
    grid:                                # dotted config key -> values; the points are the product
      strategy.name: [fedavg, ffa_lora]
      dp.noise_multiplier: [0.5, 1.0]
    include: [{dp.enabled: false}]       # extra points besides the product (optional)
    seeds: 3                             # a count (0, 1, 2) or a list: [0, 7]
    seed_keys: [data.seed, dp.seed]      # the config keys each seed is written to
    out: runs/sweeps/mine                # the sweep's directory (relative to where it runs)
    leakage: {enabled: false, max_examples: 200, seed: 0, resamples: 1000}
    canaries: false                      # or {enabled: false}; needs data.canary.count > 0

Each point × seed is one run, as ``fedllama simulate`` would run it, into
``OUT/<point>/seed-<s>``; the point's name is its overrides (``strategy.name=fedavg,
dp.noise_multiplier=0.5``, characters a file name should not hold replaced by ``_``).
``OUT/points.json`` records what defines the points: a rerun with a different base, overrides,
grid, include or seed keys in the same directory is refused, so results never mix. A rerun
skips finished runs (every round there) and resumes an interrupted one from its last round (the
run directory's own resumption, ``fedllama/server/checkpoint.py``). With ``leakage.enabled`` a
finished run's last round is measured as ``fedllama leakage`` measures it; with ``canaries``, as
``fedllama canaries`` measures it (exposure and the one-run ε lower bound). Neither is part of
what defines the points: a rerun measures the finished runs that lack a measurement.

Written into ``OUT`` after every run: ``results.csv``, ``results.md`` and the plots
(``fedllama/experiments/results.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedllama import config
from fedllama.errors import UserError
from fedllama.experiments import report
from fedllama.experiments.results import (
    RESULTS_CSV,
    RESULTS_MD,
    RunResult,
    collect,
    results_table,
    write_results,
    write_tables,
)

log = logging.getLogger("fedllama.sweep")

MANIFEST = "points.json"
SWEEP_KEYS = (
    "base", "overrides", "grid", "include", "seeds", "seed_keys", "out", "leakage", "canaries",
)  # fmt: skip
DEFAULT_SEED_KEYS = ("data.seed", "dp.seed")
"""A seed is one replicate: it draws the data split, the clients' batches and the adapter's
initialisation (``data.seed``) and, with DP, the sampling and the noise (``dp.seed``)."""
Check = Callable[[config.Config], None]
"""Refuses a config with :class:`fedllama.config.ConfigError` (``server.app.check``)."""
POINT_HINT = (
    "fix the key or value it names in the sweep file's grid, include or overrides "
    "(docs/config.md lists the keys and their values)"
)
"""What to do about a point whose config does not load (when the error has no hint)."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 160


class SweepError(UserError, ValueError):
    """A sweep file, its points or its output directory cannot be used; the message says why,
    ``hint`` what to do."""


class RunFailed(RuntimeError):
    """One run of a sweep failed; the sweep goes on with the next."""


def last_round(directory: Path) -> int | None:
    """The last complete round in a run directory (``checkpoint.last_round``), or None."""
    from fedllama.server import checkpoint  # torch: not for parsing `fedllama`'s arguments

    return checkpoint.last_round(directory)


# --------------------------------------------------------------------------- the points


def override_value(value: Any) -> str:
    """``value`` as the right-hand side of a ``key=value`` override that reads back equal."""
    text = str(value) if not isinstance(value, (bool, list, dict)) and value is not None else ""
    if text:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)
        if cast(dict[str, Any], parsed)["v"] == value:
            return text
    return json.dumps(value)  # JSON is YAML's flow style: true, null, [4, 8], "0.5"


def point_name(values: Mapping[str, Any]) -> str:
    """A point's directory name: its overrides, ``key=value`` joined by ``,``; ``base`` for
    none. Characters a file name should not hold become ``_``; a long name is cut and ends in a
    hash of the whole."""
    if not values:
        return "base"
    name = _UNSAFE.sub("_", ",".join(f"{k}={override_value(v)}" for k, v in values.items()))
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}-{digest}"
    return name


@dataclass(frozen=True)
class Point:
    """One set of overrides from the grid; its runs differ only in their seed."""

    name: str
    values: dict[str, Any]

    def overrides(self) -> list[str]:
        """``key=value`` overrides for ``fedllama simulate``."""
        return [f"{k}={override_value(v)}" for k, v in self.values.items()]

    def value(self, key: str) -> str:
        """``key``'s value as its override writes it; ``""`` where this point leaves it."""
        return override_value(self.values[key]) if key in self.values else ""


@dataclass(frozen=True)
class LeakageSettings:
    """``fedllama leakage``'s options for each finished run (off unless ``enabled``)."""

    enabled: bool = False
    max_examples: int = 200
    seed: int = 0
    resamples: int = 1000


@dataclass(frozen=True)
class PlannedRun:
    """One point at one seed: the command line it runs with and where it writes."""

    point: Point
    seed: int
    config: Path
    overrides: tuple[str, ...]
    """Everything after the config on ``fedllama simulate``'s command line."""
    directory: Path
    rounds: int

    @property
    def label(self) -> str:
        """``<point> seed <s>`` for log lines."""
        return f"{self.point.name} seed {self.seed}"

    def last_round(self) -> int | None:
        """The last complete round in its run directory, or None (not started)."""
        return last_round(self.directory)

    def finished(self) -> bool:
        """Whether its run directory holds every round."""
        return (self.last_round() or 0) >= self.rounds


@dataclass
class Sweep:
    """A sweep file, resolved: the base config, the grid, the seeds and where runs go."""

    base: Path
    grid: dict[str, list[Any]]
    seeds: list[int]
    out: Path
    overrides: list[str] = field(default_factory=list)
    include: list[dict[str, Any]] = field(default_factory=list)
    seed_keys: list[str] = field(default_factory=lambda: list(DEFAULT_SEED_KEYS))
    leakage: LeakageSettings = field(default_factory=LeakageSettings)
    canaries: bool = False
    """Measure each finished run's canaries (``fedllama canaries``, its last round)."""

    def points(self) -> list[Point]:
        """The grid's product, in the file's order (the last key varies fastest), then the
        ``include`` points.

        Raises:
            SweepError: two points get the same name.
        """
        keys = list(self.grid)
        combos = [dict(zip(keys, vs, strict=True)) for vs in itertools.product(*self.grid.values())]
        points = [Point(point_name(v), v) for v in [*combos, *self.include]]
        seen: dict[str, Point] = {}
        for p in points:
            if p.name in seen:
                raise SweepError(
                    f"grid: points {seen[p.name].values} and {p.values} share the name {p.name!r} "
                    "(a value repeated, or two values that read the same in a file name)"
                )
            seen[p.name] = p
        return points

    def planned(self, check: Check | None = None) -> list[PlannedRun]:
        """Every point at every seed, its config loaded and checked (before anything runs);
        ``check`` adds the checks ``fedllama simulate`` makes beyond the config's own (the
        strategy registry's: ``server.app.check``, passed in by the composition root).

        Raises:
            SweepError: a run's config does not load or pass ``check`` (names the point, the
                seed and the key).
        """
        runs = []
        for point in self.points():
            for seed in self.seeds:
                directory = self.out / point.name / f"seed-{seed}"
                overrides = (
                    *self.overrides,
                    *point.overrides(),
                    *(f"{key}={seed}" for key in self.seed_keys),
                    f"output.dir={directory}",
                )
                try:
                    cfg = config.load(self.base, overrides)
                    if check is not None:
                        check(cfg)
                except ValueError as err:  # ConfigError, and the registry's unknown name
                    raise SweepError(
                        f"point {point.name} seed {seed}: {err}",
                        hint=getattr(err, "hint", "") or POINT_HINT,
                    ) from None
                runs.append(
                    PlannedRun(point, seed, self.base, overrides, directory, cfg.server.rounds)
                )
        return runs


# --------------------------------------------------------------------------- the sweep file


def _mapping(raw: Any, key: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SweepError(f"{key}: expected a mapping, got {raw!r}")
    return {str(k): v for k, v in raw.items()}


def _strings(raw: Any, key: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise SweepError(f"{key}: expected a list of strings, got {raw!r}")
    return list(raw)


def _seeds(raw: Any) -> list[int]:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return list(range(raw))
    if isinstance(raw, list) and raw and all(isinstance(s, int) for s in raw):
        if len(set(raw)) != len(raw):
            raise SweepError(f"seeds: {raw} repeats a seed")
        return list(raw)
    raise SweepError(f"seeds: expected a count >= 1 or a non-empty list of integers, got {raw!r}")


def _grid(raw: Any) -> dict[str, list[Any]]:
    grid = _mapping(raw, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(
                f"grid.{key}: expected a non-empty list of values, got {values!r}",
                hint=f"write its values as a YAML list, e.g. {key}: [{_example(values)}]",
            )
    return grid


def _example(values: Any) -> str:
    """A grid entry's values as a list's items, for a hint (two placeholders for none)."""
    if values is None or isinstance(values, (list, dict)):
        return "a, b"
    return override_value(values)


def _leakage(raw: Any) -> LeakageSettings:
    if isinstance(raw, bool):
        return LeakageSettings(enabled=raw)
    given = _mapping(raw, "leakage")
    allowed = LeakageSettings.__dataclass_fields__
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise SweepError(f"leakage.{unknown[0]}: unknown key; expected one of {', '.join(allowed)}")
    settings = LeakageSettings(**given)
    if settings.max_examples < 1 or settings.resamples < 1:
        raise SweepError("leakage.max_examples and leakage.resamples must be >= 1")
    return settings


def _canaries(raw: Any) -> bool:
    """``canaries: true|false`` or ``canaries: {enabled: true|false}``."""
    given = {"enabled": raw} if isinstance(raw, bool) else _mapping(raw, "canaries")
    unknown = sorted(set(given) - {"enabled"})
    if unknown:
        raise SweepError(f"canaries.{unknown[0]}: unknown key; expected enabled")
    enabled = given.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SweepError(f"canaries.enabled: expected true or false, got {enabled!r}")
    return enabled


def _read(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The sweep file and its ``key=value`` overrides, merged by OmegaConf, as plain data."""
    if not path.is_file():
        raise SweepError(
            f"sweep file {str(path)!r} does not exist",
            hint="pass a sweep file, e.g. simulations/sweeps/strategies.yaml "
            "(docs/experiments.md says how to write one)",
        )
    try:
        merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, ValueError) as err:  # YAML errors are ValueErrors here
        raise SweepError(f"{path}: {err}") from None
    data = _mapping(raw, str(path))
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r}; expected {', '.join(SWEEP_KEYS)}")
    for key in ("base", "out"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise SweepError(f"{path}: {key}: expected a path, got {data.get(key)!r}")
    return data


def load_sweep(path: Path, overrides: Sequence[str] = (), out: Path | None = None) -> Sweep:
    """Read a sweep file; ``overrides`` (OmegaConf ``key=value``) change it, ``out`` replaces
    its ``out``. ``base`` is taken relative to the file, ``out`` relative to the working
    directory (as ``output.dir`` is).

    Raises:
        SweepError: the file is missing or not a sweep (names the key and what is expected).
    """
    data = _read(path, overrides)
    base = Path(data["base"])
    return Sweep(
        base=base if base.is_absolute() else path.parent / base,
        grid=_grid(data.get("grid", {})),
        seeds=_seeds(data.get("seeds", 1)),
        out=out if out is not None else Path(data["out"]),
        overrides=_strings(data.get("overrides", []), "overrides"),
        include=[_mapping(p, "include[]") for p in data.get("include", [])],
        seed_keys=_strings(data.get("seed_keys", list(DEFAULT_SEED_KEYS)), "seed_keys"),
        leakage=_leakage(data.get("leakage", False)),
        canaries=_canaries(data.get("canaries", False)),
    )


# --------------------------------------------------------------------------- the manifest


def _identity(sweep: Sweep) -> dict[str, Any]:
    """What defines the points (seeds may be added or dropped; leakage and canaries are
    measured later)."""
    identity = {
        "base": os.path.relpath(sweep.base.resolve(), sweep.out.resolve()),
        "overrides": sweep.overrides,
        "grid": sweep.grid,
        "include": sweep.include,
        "seed_keys": sweep.seed_keys,
    }
    normal: dict[str, Any] = json.loads(json.dumps(identity))  # as points.json reads back
    return normal


def check_manifest(sweep: Sweep, points: Sequence[Point]) -> None:
    """Write ``OUT/points.json``, or refuse a sweep whose points differ from the one there.

    Raises:
        SweepError: ``OUT`` holds a sweep with another base, overrides, grid, include or seed
            keys (names them, with what is saved).
    """
    path = sweep.out / MANIFEST
    identity = _identity(sweep)
    if path.is_file():
        saved = json.loads(path.read_text()).get("sweep", {})
        differ = [k for k in identity if saved.get(k) != identity[k]]
        if differ:
            was = "; ".join(f"{k}: saved {saved.get(k)!r}, now {identity[k]!r}" for k in differ)
            raise SweepError(
                f"{sweep.out} holds a different sweep ({was})",
                hint=f"pass another out directory (e.g. --out {sweep.out}-2), or keep the sweep "
                f"saved in {path} to resume it",
            )
    sweep.out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "sweep": identity,
        "seeds": sweep.seeds,
        "points": [{"name": p.name, "overrides": p.values} for p in points],
    }
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- running


class Runner(Protocol):
    """Runs one planned run; the sweep decides which and when."""

    def simulate(self, run: PlannedRun) -> None:
        """Run ``run`` or resume it until its last round.

        Raises:
            RunFailed: it stopped before its last round (the sweep goes on with the next).
        """

    def leakage(self, run: PlannedRun, settings: LeakageSettings) -> None:
        """Measure membership inference against ``run``'s last round
        (``leakage-round-NNN.json`` in its directory).

        Raises:
            RunFailed: the measurement failed.
        """

    def canaries(self, run: PlannedRun) -> None:
        """Measure the canaries' exposure and the one-run ε lower bound at ``run``'s last
        round (``canaries-round-NNN.json`` in its directory).

        Raises:
            RunFailed: the measurement failed.
        """


class SubprocessRunner:
    """Each run as its own ``fedllama simulate`` process (Ray starts and stops with it), each
    measurement as ``fedllama leakage`` or ``fedllama canaries``; their output goes to this
    process's."""

    def simulate(self, run: PlannedRun) -> None:
        """``python -m fedllama.cli simulate CONFIG OVERRIDES``."""
        self._call(["simulate", str(run.config), *run.overrides], run.label)

    def leakage(self, run: PlannedRun, settings: LeakageSettings) -> None:
        """``python -m fedllama.cli leakage RUN_DIR`` with ``settings``."""
        options = ("max_examples", "seed", "resamples")
        flags = [
            x for o in options for x in (f"--{o.replace('_', '-')}", str(getattr(settings, o)))
        ]
        self._call(["leakage", str(run.directory), *flags], f"leakage of {run.label}")

    def canaries(self, run: PlannedRun) -> None:
        """``python -m fedllama.cli canaries RUN_DIR`` (its last round)."""
        self._call(["canaries", str(run.directory)], f"canaries of {run.label}")

    @staticmethod
    def _call(args: list[str], what: str) -> None:
        code = subprocess.run([sys.executable, "-m", "fedllama.cli", *args]).returncode
        if code != 0:
            raise RunFailed(f"{what}: exit code {code}; see its log above")


def _step(sweep: Sweep, run: PlannedRun, runner: Runner, where: str, elapsed: float) -> bool:
    """Run (or skip) one run, then its measurements; False if one failed."""
    if run.finished():
        log.info("sweep: %s %s: finished, skipped", where, run.label)
    else:
        done = run.last_round()
        state = "new" if done is None else f"resumes after round {done}"
        log.info(
            "sweep: %s %s -> %s (%s; %.0f s elapsed)",
            where,
            run.label,
            run.directory,
            state,
            elapsed,
        )
        try:
            runner.simulate(run)
        except RunFailed as err:
            log.error("sweep: %s", err)
            return False
    return run.finished() and _measure(sweep, run, runner, where)


def _measure(sweep: Sweep, run: PlannedRun, runner: Runner, where: str) -> bool:
    """A finished run's leakage and canaries, each when enabled and its last round has no
    measurement yet; False if one failed (the other is still tried)."""
    last = run.last_round()
    wanted: list[tuple[str, bool, Callable[[Path], dict[int, Any]], Callable[[], None]]] = [
        ("leakage", sweep.leakage.enabled, report.read_leakage,
         lambda: runner.leakage(run, sweep.leakage)),
        ("canaries", sweep.canaries, report.read_canaries, lambda: runner.canaries(run)),
    ]  # fmt: skip
    ok = True
    for what, enabled, read, call in wanted:
        if not enabled or last in read(run.directory):
            continue
        log.info("sweep: %s %s: measuring %s", where, run.label, what)
        try:
            call()
        except RunFailed as err:
            log.error("sweep: %s", err)
            ok = False
    return ok


def run_sweep(
    sweep: Sweep, runner: Runner | None = None, check: Check | None = None
) -> list[RunResult]:
    """Run every point at every seed not finished yet, then write the results.

    Every run's config is checked (with ``check`` too) and the manifest compared before the
    first run starts. A
    run that fails is logged and the others go on; an exception other than
    :class:`RunFailed` (an interrupt) stops the sweep, and a rerun resumes it.

    Raises:
        SweepError: a run's config does not load, or ``out`` holds a different sweep.
    """
    runner = runner if runner is not None else SubprocessRunner()
    runs = sweep.planned(check)
    check_manifest(sweep, sweep.points())
    started = time.perf_counter()
    for i, run in enumerate(runs, 1):
        _step(sweep, run, runner, f"{i}/{len(runs)}", time.perf_counter() - started)
        write_tables(sweep, [collect(r) for r in runs])  # what there is so far
    results = [collect(r) for r in runs]
    write_results(sweep, results)
    done = sum(r.status == "finished" for r in results)
    log.info(
        "sweep: %d/%d runs finished in %.0f s; results in %s",
        done,
        len(results),
        time.perf_counter() - started,
        sweep.out / RESULTS_MD,
    )
    return results


# --------------------------------------------------------------------------- the command


def add_sweep_command(sub: Any) -> None:
    """``fedllama sweep SWEEP.yaml [key=value ...] [--out DIR] [--dry-run]``."""
    p = sub.add_parser(
        "sweep", help="run a grid of config overrides × seeds into one directory (resumable)"
    )
    p.add_argument("sweep", type=Path, help="sweep file, e.g. simulations/sweeps/strategies.yaml")
    p.add_argument(
        "overrides", nargs="*", help="changes to the sweep file, e.g. seeds=1 out=runs/x"
    )
    p.add_argument("--out", type=Path, help="the sweep's directory (default: the file's out)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run none")
    p.add_argument(
        "--results-only", action="store_true", help="write the results from the runs there are"
    )


def sweep_command(
    args: argparse.Namespace, runner: Runner | None = None, check: Check | None = None
) -> int:
    """``fedllama sweep``: 0 when every run finished, 1 when one did not.

    Raises:
        SweepError: a bad sweep file, config (``check``: ``server.app.check``) or directory,
            before any run starts (``fedllama`` prints it and its hint, exit code 2).
    """
    sweep = load_sweep(args.sweep, args.overrides, args.out)
    if args.dry_run or args.results_only:
        runs = sweep.planned(check)
        if args.dry_run:
            for i, run in enumerate(runs, 1):
                state = collect(run).status
                print(f"{i}/{len(runs)} {run.label}: {state} -> {run.directory}")
            return 0
        check_manifest(sweep, sweep.points())
        results = [collect(r) for r in runs]
        write_results(sweep, results)
    else:
        results = run_sweep(sweep, runner, check)
    print(results_table(results))
    print(f"written: {sweep.out / RESULTS_CSV}, {sweep.out / RESULTS_MD}")
    return 0 if all(r.status == "finished" for r in results) else 1
