"""Secure aggregation cost (not a test): round time and bytes per client, with and without it.

Each figure is a ratio against the plain (no secagg) path measured in the same run:

1. Protocol on a realistic adapter: SmolLM2-135M, LoRA r8 on q/k/v/o (921,600 values, 3.7 MB
   float32 per client), FedAvg's encoding, N simulated clients. Client and server protocol code
   run in-process (``fedllama.privacy.secagg.aggregate_locally``), each side timed apart.
   Plain: each client encodes and serialises its reply; the server validates, sums and
   decodes. SecAgg+: the four stages, the masked vector serialised, the server unmasking and
   decoding. "Round" is the critical path with clients in parallel (the slowest client per
   stage, plus the server): no network, no training.
2. End to end on the tiny model: one real round (ServerApp loop, ClientApp, local training,
   server eval, checkpoint) through the in-process grid, clients one after another. Goal:
   round time with secure aggregation <= 1.5x plain at 10 clients.

    .venv/bin/python bench/secagg.py [--clients 5,10,20,50] [--e2e-clients 5,10]
                                     [--only protocol|e2e] [--repeats 3] [--e2e-repeats 5]
                                     [--modulus-bits 64|32]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, MetricRecord, RecordDict

from fedllama.config import SecAggConfig
from fedllama.merge import SumAccumulator
from fedllama.privacy.secagg import aggregate_locally
from fedllama.wire.layout import Layout
from fedllama.wire.records import ARRAYS, METRICS, record_bytes, to_record
from fedllama.wire.validate import ReplySpec, validate_reply
from strategies.fedavg import FedAvg

REPO = Path(__file__).resolve().parent.parent
# SmolLM2-135M: hidden 576, 30 layers, 3 KV heads of 64 (k/v project to 192)
DIMS = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576)}


def _adapter(rank: int = 8, layers: int = 30) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(layers):
        for name, (n_in, n_out) in DIMS.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            out[f"{prefix}.lora_A.weight"] = 1e-3 * torch.randn(rank, n_in, generator=g)
            out[f"{prefix}.lora_B.weight"] = 1e-3 * torch.randn(n_out, rank, generator=g)
    return out


def _plain_round(delta: dict[str, torch.Tensor], weights: list[float]) -> dict[str, float]:
    """Clients encode + serialise (timed each); the server validates, sums and decodes."""
    strategy = FedAvg()
    spec = ReplySpec({k: tuple(v.shape) for k, v in strategy.encode(delta, 1.0).items()})
    client_s, replies = [], []
    for w in weights:
        t0 = time.perf_counter()
        encoded = strategy.encode(delta, w)
        content = RecordDict(
            {
                ARRAYS: to_record(encoded),
                METRICS: MetricRecord({"num-examples": int(w), "train-loss": 1.0}),
            }
        )
        client_s.append(time.perf_counter() - t0)
        replies.append(content)
    t0 = time.perf_counter()
    acc = SumAccumulator()
    for content in replies:
        acc.add(validate_reply(content, spec).encoded)
    mean = strategy.decode(acc.total, delta)
    server_s = time.perf_counter() - t0
    up = record_bytes(replies[0].array_records[ARRAYS])
    return {"client": max(client_s), "server": server_s, "up": up, "mean": mean}


def _secure_round(
    delta: dict[str, torch.Tensor], weights: list[float], cfg: SecAggConfig
) -> dict[str, float]:
    """The four stages; the client's mask stage includes encoding, serialising and flattening
    its plain reply (as the ClientApp does) and serialising the masked vector."""
    strategy = FedAvg()
    nodes = [100 + i for i in range(len(weights))]
    vectors, prep = {}, {}
    layout: Layout | None = None
    for node, w in zip(nodes, weights, strict=True):
        t0 = time.perf_counter()
        arrays = to_record(strategy.encode(delta, w))
        layout = layout or Layout.of({k: tuple(a.shape) for k, a in arrays.items()})
        vectors[node] = layout.flatten({k: a.numpy() for k, a in arrays.items()})
        prep[node] = time.perf_counter() - t0
    assert layout is not None
    out = aggregate_locally(vectors, cfg)
    t0 = time.perf_counter()
    wire = Array(out.masked[nodes[0]])  # serialising one masked vector (client side)
    serialise = time.perf_counter() - t0
    t0 = time.perf_counter()
    wire.numpy()  # and reading it back (server side, once per client)
    deserialise = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean = strategy.decode(layout.unflatten(out.total), delta)
    decode = time.perf_counter() - t0
    stages = out.client_seconds
    client = sum(max(stages[s].values()) for s in stages)
    client += max(prep.values()) + serialise
    server = sum(out.server_seconds.values()) + deserialise * len(nodes) + decode
    n = len(nodes)
    return {
        "client": client,
        "server": server,
        "up": (sum(out.bytes_up.values()) + n * (len(wire.data) - out.masked[nodes[0]].nbytes)) / n,
        "down": sum(out.bytes_down.values()) / n,
        "k": out.server.k,
        "t": out.server.threshold,
        "unmask": out.server_seconds["unmask"],
        "mean": mean,
    }


def bench_protocol(args: argparse.Namespace) -> None:
    delta = _adapter()
    size = sum(v.numel() for v in delta.values())
    state_mb = 4 * size / 1e6
    cfg = SecAggConfig(enabled=True)
    if args.modulus_bits == 32:  # 24-bit values leave room for 256 clients; C above the weights
        cfg = SecAggConfig(enabled=True, modulus_bits=32, quantization_bits=24, clip_range=1e3)
    print(
        f"protocol  SmolLM2-135M r8 q/k/v/o: {size:,} values ({state_mb:.2f} MB fp32) per client, "
        f"fedavg encoding; {cfg.quantization_bits}-bit fixed point mod 2^{cfg.modulus_bits}, clip "
        f"±{cfg.clip_range:g}, "
        f"threshold {cfg.threshold}; medians of {args.repeats}"
    )
    print(
        "clients   k   t | client s: plain secagg | server s: plain secagg (unmask) | "
        "round s: plain secagg  ratio | MB up/client: plain secagg ratio | MB down extra | "
        "max |mean err|"
    )
    for n in args.clients:
        weights = [float(20 + 7 * i) for i in range(n)]
        plain_runs, secure_runs = [], []
        for _ in range(args.repeats):  # interleaved, so load drifts hit both alike
            plain_runs.append(_plain_round(delta, weights))
            secure_runs.append(_secure_round(delta, weights, cfg))
        err = max(
            float((secure_runs[0]["mean"][k] - plain_runs[0]["mean"][k]).abs().max()) for k in delta
        )
        p = {k: statistics.median(r[k] for r in plain_runs) for k in plain_runs[0] if k != "mean"}
        s = {k: statistics.median(r[k] for r in secure_runs) for k in secure_runs[0] if k != "mean"}
        p_round, s_round = p["client"] + p["server"], s["client"] + s["server"]
        print(
            f"{n:7d} {s['k']:3.0f} {s['t']:3.0f} | {p['client']:14.3f} {s['client']:6.3f} | "
            f"{p['server']:14.3f} {s['server']:6.3f} ({s['unmask']:5.2f}) | "
            f"{p_round:13.3f} {s_round:6.3f} {s_round / p_round:6.1f}x | "
            f"{p['up'] / 1e6:18.2f} {s['up'] / 1e6:6.2f} {s['up'] / p['up']:5.2f} | "
            f"{s['down'] / 1e3:8.1f} kB | {err:.1e}"
        )


def bench_e2e(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import transformers

    import clients.app
    import strategies
    from fedllama import config
    from fedllama.server.inprocess import InProcessGrid
    from fedllama.server.loop import run_server
    from fedllama.server.metrics import MetricsRow

    os.environ["FEDLLAMA_LOG_LEVEL"] = "WARNING"  # the apps call setup_logging themselves
    logging.getLogger("flwr").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    cache = Path(args.cache)
    print(
        f"end to end  tiny model (simulations/configs/tiny.yaml), one round of rank_aware with "
        f"mixed ranks 2/3/4, in-process grid, clients in turn; {args.e2e_repeats} interleaved "
        "repeats"
    )
    print(
        "clients | round s (min): plain secagg ratio | round s (median): plain secagg ratio | "
        "MB up/client: plain secagg | MB down/client: plain secagg"
    )
    for n in args.e2e_clients:
        rows: dict[str, list[MetricsRow]] = {"plain": [], "secure": []}
        for _ in range(args.e2e_repeats):
            for mode in rows:
                out = Path(tempfile.mkdtemp(prefix=f"bench-secagg-{mode}-"))
                cfg = config.load(
                    REPO / "simulations" / "configs" / "tiny.yaml",
                    [
                        f"model.cache_dir={cache}",
                        f"output.dir={out / 'run'}",
                        "server.rounds=1",
                        "strategy.name=rank_aware",
                        "lora.client_ranks=[2,3,4]",
                        f"simulation.num_clients={n}",
                        "data.max_examples_per_institution=200",
                        "output.plot=false",
                        f"secagg.enabled={mode == 'secure'}",
                    ],
                )
                grid = InProcessGrid(clients.app.app, n)
                rows[mode].append(run_server(grid, cfg, strategies.build(cfg))[-1])
                shutil.rmtree(out)
        p_s, s_s = ([r.seconds for r in rs] for rs in rows.values())
        p, s = (rs[0] for rs in rows.values())  # bytes do not vary between repeats
        p_min, s_min, p_med, s_med = (
            min(p_s),
            min(s_s),
            statistics.median(p_s),
            statistics.median(s_s),
        )
        print(
            f"{n:7d} | {p_min:20.2f} {s_min:6.2f} {s_min / p_min:5.2f}x | "
            f"{p_med:23.2f} {s_med:6.2f} {s_med / p_med:5.2f}x | "
            f"{p.bytes_up / n / 1e6:18.4f} {s.bytes_up / n / 1e6:6.4f} | "
            f"{p.bytes_down / n / 1e6:20.4f} {s.bytes_down / n / 1e6:6.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--clients", type=ints, default=[5, 10, 20, 50])
    parser.add_argument("--e2e-clients", type=ints, default=[5, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--e2e-repeats", type=int, default=5)
    parser.add_argument("--only", choices=["protocol", "e2e"])
    parser.add_argument(
        "--modulus-bits", type=int, choices=[64, 32], default=64,
        help="protocol: 32 = secagg.modulus_bits 32, quantization_bits 24, clip_range 1e3",
    )  # fmt: skip
    parser.add_argument(
        "--cache", default=str(Path(tempfile.gettempdir()) / "fedllama-bench-cache")
    )
    args = parser.parse_args()
    np.seterr(over="ignore")
    if args.only in (None, "protocol"):
        bench_protocol(args)
    if args.only in (None, "e2e"):
        bench_e2e(args)


if __name__ == "__main__":
    main()
