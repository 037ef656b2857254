"""What bounded influence costs the server: one round's aggregation of N replies with each
robust combiner against the plain running sum, measured in the same run.

The replies are real Flower messages (FedAvg encodings of a SmolLM2-135M-shaped rank-8
adapter on q/k/v/o, 0.92 M values), validated and combined by
``fedllama.server.aggregate.collect`` exactly as a round does. Prints, per N: seconds per
round and the ratio to the mean, and the held updates' size (the combiners need them all).

    .venv/bin/python bench/robust.py [--clients 10,50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from flwr.app import Message, Metadata, MetricRecord, RecordDict

from fedllama import config as config_lib
from fedllama.merge import WEIGHT_KEY
from fedllama.server.aggregate import RoundPlan, RoundRecord, collect
from fedllama.wire.records import ARRAYS, METRICS, to_record
from fedllama.wire.validate import ReplySpec
from strategies.fedavg import FedAvg

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8
"""SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64; LoRA rank 8 on q, k, v, o."""

SETTINGS = {
    "mean": [],
    "mean, norm bound (fixed)": ["robust.norm_bound=1.0"],
    "mean, norm bound (median x 3)": ["robust.norm_bound_median=3"],
    "median": ["robust.combiner=median"],
    "trimmed_mean (β=0.1)": ["robust.combiner=trimmed_mean"],
    "krum (f=1)": ["robust.combiner=krum"],
    "multi_krum (f=1)": ["robust.combiner=multi_krum"],
}


def adapter() -> dict[str, torch.Tensor]:
    """A rank-8 LoRA state of SmolLM2-135M's attention projections."""
    out = {}
    for layer in range(LAYERS):
        for proj, width in (("q", HIDDEN), ("k", KV), ("v", KV), ("o", HIDDEN)):
            base = f"model.layers.{layer}.self_attn.{proj}_proj"
            out[f"{base}.lora_A.weight"] = torch.zeros(RANK, HIDDEN)
            out[f"{base}.lora_B.weight"] = torch.zeros(width, RANK)
    return out


def replies(n: int, shapes: dict[str, torch.Tensor]) -> list[Message]:
    """N FedAvg replies with random deltas (seeded), weights 10..10+n."""
    generator = torch.Generator().manual_seed(0)
    strategy = FedAvg()
    out = []
    for i in range(n):
        delta = {k: torch.randn(v.shape, generator=generator) * 1e-3 for k, v in shapes.items()}
        content = RecordDict(
            {
                ARRAYS: to_record(strategy.encode(delta, 10.0 + i)),
                METRICS: MetricRecord({"num-examples": 10 + i, "train-loss": 1.0}),
            }
        )
        metadata = Metadata(
            run_id=1, message_id=f"r{i}", src_node_id=i + 1, dst_node_id=0,
            reply_to_message_id=f"m{i}", group_id="", created_at=0.0, ttl=60.0,
            message_type="train",
        )  # fmt: skip
        out.append(Message(content=content, metadata=metadata))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = adapter()
    values = sum(v.numel() for v in state.values())
    spec = ReplySpec(shapes={**{k: tuple(v.shape) for k, v in state.items()}, WEIGHT_KEY: (1,)})
    print(f"adapter: {len(state)} tensors, {values / 1e6:.2f} M values; 1 thread; best of "
          f"{args.repeats}")  # fmt: skip
    for n in (int(c) for c in args.clients.split(",")):
        messages = replies(n, state)
        held_mb = n * values * 4 / 2**20
        print(f"\nN = {n} (the combiners hold {held_mb:.0f} MB of updates)")
        print(f"{'rule':32} {'s / round':>10} {'x mean':>8}")
        base = 0.0
        for name, overrides in SETTINGS.items():
            clients = [f"simulation.num_clients={max(n, 5)}", "data.partition=iid"]
            cfg = config_lib.load(None, overrides + clients)
            best = float("inf")
            for _ in range(args.repeats):
                plan = RoundPlan(1, [], FedAvg(), state, spec, robust=cfg.robust)
                t0 = time.perf_counter()
                record = collect(plan, messages, RoundRecord(server_round=1))
                best = min(best, time.perf_counter() - t0)
                assert record.delta is not None and record.ok == n
            base = base or best
            print(f"{name:32} {best:10.3f} {best / base:8.2f}")


if __name__ == "__main__":
    main()
