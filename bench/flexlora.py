"""FlexLoRA: factored (QR + small SVD) vs dense (sum of out×in products + SVD) server merge.

One LLaMA-8B-shaped module per run (4096×4096 = q_proj/o_proj, 4096×14336 = up/gate_proj),
client ranks cycling through --ranks, global rank = the largest. Times cover the server's work
only (clients' encodes are theirs); the result check compares the merged products.

    .venv/bin/python bench/flexlora.py [--shapes 4096x4096,4096x14336] [--clients 10,100]
"""

from __future__ import annotations

import argparse
import time

import torch

import strategies
from fedllama import config
from fedllama.merge import SumAccumulator

A = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
B = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"


def run(out_f: int, in_f: int, clients: int, ranks: list[int]) -> None:
    top = max(ranks)
    overrides = ["strategy.name=flexlora", f"lora.r={top}"]
    dense = strategies.build(config.load(None, overrides))
    factored = strategies.build(config.load(None, [*overrides, "strategy.flexlora_form=factored"]))
    g = torch.Generator().manual_seed(0)
    base = {
        A: torch.randn(top, in_f, generator=g) * 0.01,
        B: torch.randn(out_f, top, generator=g) * 0.01,
    }
    client_ranks = [ranks[i % len(ranks)] for i in range(clients)]
    weights = [float(10 + i) for i in range(clients)]
    # One delta per distinct rank, reused: values do not change the cost.
    deltas = {
        r: {
            A: torch.randn(r, in_f, generator=g) * 0.01,
            B: torch.randn(out_f, r, generator=g) * 0.01,
        }
        for r in ranks
    }
    views = {r: dense.client_view(base, r) for r in ranks}
    dense_enc = {r: dense.encode(deltas[r], 1.0, views[r]) for r in ranks}
    fact_enc = [
        factored.encode(deltas[r], w, views[r]) for r, w in zip(client_ranks, weights, strict=True)
    ]

    t0 = time.perf_counter()
    acc = SumAccumulator()
    for r, w in zip(client_ranks, weights, strict=True):
        acc.add({k: v * w for k, v in dense_enc[r].items()})  # a client's w·encoding arriving
    t_sum = time.perf_counter() - t0
    t0 = time.perf_counter()
    d = dense.decode(acc.total, base)
    t_dense = t_sum + time.perf_counter() - t0
    del acc
    t0 = time.perf_counter()
    f = factored.aggregate(fact_enc, base)  # type: ignore[attr-defined]
    t_fact = time.perf_counter() - t0

    x = (base[B] + d[B]) @ (base[A] + d[A])
    y = (base[B] + f[B]) @ (base[A] + f[A])
    err = float((x - y).abs().max() / x.abs().max())
    print(
        f"{out_f}x{in_f} clients={clients:3d} ranks={min(ranks)}-{top} sum_r={sum(client_ranks):5d}"
        f" | dense {t_dense:7.2f} s (sum {t_sum:5.2f} s) | factored {t_fact:6.2f} s"
        f" | speed-up {t_dense / t_fact:6.1f}x | max rel diff {err:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,4096x14336")
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--ranks", default="4,8,16,32,64")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"torch threads: {torch.get_num_threads()}")
    for shape in args.shapes.split(","):
        in_f, out_f = (int(x) for x in shape.split("x"))
        for n in (int(c) for c in args.clients.split(",")):
            run(out_f, in_f, n, ranks)


if __name__ == "__main__":
    main()
