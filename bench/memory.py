"""Server memory while merging N clients stays flat in N: replies are validated and summed as
they arrive (Flower records in, running sum), never all held at once.

Each N runs in a fresh process; its peak resident memory is reported.

    .venv/bin/python bench/memory.py [--clients 10,100] [--adapter 1b]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
from flwr.app import Message, Metadata, MetricRecord, RecordDict

from fedllama.server.strategy import FedLlamaStrategy
from fedllama.wire.records import ARRAYS, METRICS, to_record
from strategies.fedavg import FedAvg


def _replies(n: int, adapter: dict[str, torch.Tensor], strategy: FedAvg) -> Iterator[Message]:
    for i in range(n):  # built one at a time, as a streamed grid delivers them
        encoded = strategy.encode({k: v * (1 + i % 3) for k, v in adapter.items()}, 10.0 + i)
        content = RecordDict(
            {
                ARRAYS: to_record(encoded),
                METRICS: MetricRecord({"num-examples": 10 + i, "train-loss": 1.0}),
            }
        )
        metadata = Metadata(
            run_id=1, message_id=f"r{i}", src_node_id=i + 1, dst_node_id=0,
            reply_to_message_id=f"m{i}", group_id="", created_at=0.0, ttl=60.0,
            message_type="train",
        )  # fmt: skip
        yield Message(content=content, metadata=metadata)


def child(n: int, adapter_shape: str) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from run import _adapter

    adapter = _adapter(adapter_shape, 16, 0)
    strategy = FedLlamaStrategy(FedAvg(), config_yaml="", rank=16)
    strategy.set_global({k: torch.zeros_like(v) for k, v in adapter.items()}, 1)
    t0 = time.perf_counter()
    strategy.aggregate_train(1, _replies(n, adapter, FedAvg()))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mb = sum(v.numel() * 4 for v in adapter.values()) / 1e6
    print(
        f"clients={n:4d} adapter={mb:.0f} MB ok={strategy.report.ok} peak RSS {peak_mb:7.0f} MB"
        f" ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--adapter", default="1b")
    parser.add_argument("--child", type=int)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.adapter)
        return
    for n in (int(c) for c in args.clients.split(",")):
        cmd = [sys.executable, __file__, "--child", str(n), "--adapter", args.adapter]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
