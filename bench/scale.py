"""Many clients in one round on one machine: round time, per-client overhead and memory.

For each N, one round of the tiny model (``simulations/configs/tiny.yaml``) with all N clients
sampled runs as ``fedllama simulate`` does (Flower's simulation engine on Ray, one worker per
core), each client training ``train.local_steps`` (2) steps on its share of the demo data. It
prints the round's wall time, the mean seconds per client of each phase the clients report
(``time-<phase>`` metrics: message, view, model, data, train, eval, encode) and the overhead
per client beyond its optimizer steps (every phase but ``train``, plus ``train`` minus the
steps' own ``seconds``), and the peak resident memory of the driver process and of the driver
with every process under it (Ray's workers), sampled every 0.5 s.

    .venv/bin/python bench/scale.py [--clients 10,100,1000] [--timeout 900] [overrides ...]

Assumptions beside the numbers: a client's phase times are its own wall clock inside the
ClientApp; what Ray and Flower spend between messages shows as the round's wall time minus
the clients' time divided by the workers; memory is RSS (shared pages counted in each
process, so the sum overstates).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PHASES = ("message", "view", "model", "data", "train", "eval", "encode")


def peak_rss(process: subprocess.Popen[bytes], timeout: float) -> tuple[float, float, bool]:
    """(driver MB, driver + descendants MB) at their peaks while ``process`` runs; and whether
    it finished within ``timeout``."""
    root = psutil.Process(process.pid)
    driver = total = 0.0
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            return driver, total, False
        try:
            tree = [root, *root.children(recursive=True)]
            rss = [p.memory_info().rss / 1e6 for p in tree if p.is_running()]
        except psutil.Error:  # a process ended while it was read
            continue
        driver, total = max(driver, rss[0]), max(total, sum(rss))
        time.sleep(0.5)
    return driver, total, True


def one_round(n: int, overrides: list[str], timeout: float) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-"))
    command = [
        sys.executable, "-m", "fedllama.cli", "simulate",
        str(REPO / "simulations" / "configs" / "tiny.yaml"),
        f"output.dir={out / 'run'}", f"simulation.num_clients={n}", "server.rounds=1",
        "data.max_examples_per_institution=1000", "output.plot=false", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    with open(out / "simulate.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        driver, total, finished = peak_rss(process, timeout)
    wall = time.perf_counter() - start
    if not finished or process.returncode != 0:
        print(f"N={n}: {'timed out' if not finished else 'failed'}; see {out / 'simulate.log'}")
        return {}
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    clients = rows[-1]["clients"]
    mean = {p: statistics.fmean(c.get(f"time-{p}", 0.0) for c in clients) for p in PHASES}
    steps = statistics.fmean(c["seconds"] for c in clients)
    for dropped in rows[-1].get("dropped", []):  # a reply not counted, and why
        print(f"N={n}: dropped {dropped}")
    shutil.rmtree(out)
    return {
        "clients": len(clients),
        "wall": wall,
        "round": rows[-1]["seconds"],
        **mean,
        "steps": steps,
        "overhead": sum(mean.values()) - steps,
        "driver_mb": driver,
        "total_mb": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of tiny.yaml")
    args = parser.parse_args()
    print(
        "one round, tiny model, every client sampled, Ray workers = cores; per client: mean "
        "seconds of each phase (the ClientApp's own clock)"
    )
    print(
        f"{'N':>5} {'ok':>5} {'wall s':>7} {'round s':>8} | "
        + " ".join(f"{p:>7}" for p in PHASES)
        + f" | {'steps':>6} {'overhead':>8} | {'driver MB':>9} {'all MB':>7}"
    )
    for n in (int(x) for x in args.clients.split(",")):
        r = one_round(n, args.overrides, args.timeout)
        if not r:
            continue
        print(
            f"{n:5d} {r['clients']:5.0f} {r['wall']:7.1f} {r['round']:8.1f} | "
            + " ".join(f"{r[p]:7.3f}" for p in PHASES)
            + f" | {r['steps']:6.3f} {r['overhead']:8.3f} | {r['driver_mb']:9.0f} "
            f"{r['total_mb']:7.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
