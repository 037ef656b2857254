"""Update codecs on the demo federation: bytes each client sends against the eval loss they buy,
every codec measured against float32 (``wire.codec=none``, today's format) in the same run.

Part 1 runs the demo config (SmolLM2-135M, NF4, 4 institutions, LoRA r8 on q/k/v/o, FedAvg)
for the same rounds once per codec, in-process (the real ServerApp and ClientApp over
``InProcessGrid``: the same bytes as a deployment, without Ray), and prints per codec: uplink
and downlink bytes per client per round, the uplink ratio to float32, the final eval loss and
its change against float32. Part 2 times encode and decode of one SmolLM2-shaped rank-8 update.

    .venv/bin/python bench/codecs.py [--rounds 3] [--codecs none,strip,fp16,int8,ternary,topk]
        [--topk-fraction 0.05] [--out runs/bench-codecs] [overrides ...]

Assumptions beside the numbers: eval loss is the global adapter's loss on the demo's 48-example
global eval set after the last round; a codec with stochastic rounding (int8, ternary) is seeded
per client and round, so each run is reproducible, but one run is one draw.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import clients.app
import server.app
from fedllama import config as config_lib
from fedllama.runtime import quiet_libraries, stay_offline
from fedllama.server.inprocess import InProcessGrid
from fedllama.wire import codecs

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8
"""SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64; LoRA rank 8 on q, k, v, o."""


def federation(args: argparse.Namespace, codec: str) -> dict[str, float]:
    """One demo run with ``codec``: bytes per client per round and the last eval loss."""
    out = Path(args.out) / codec
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"server.rounds={args.rounds}",
        f"wire.codec={codec}",
        f"wire.topk_fraction={args.topk_fraction}",
        f"output.dir={out}",
        "output.plot=false",
        *args.overrides,
    ]
    cfg = config_lib.load(args.config, overrides)
    server.app.check(cfg)
    t0 = time.perf_counter()
    rows = server.app.serve(InProcessGrid(clients.app.app, cfg.simulation.num_clients), cfg)
    trained = [r for r in rows if r.round > 0]
    replies = sum(r.clients_ok for r in trained)
    asked = sum(r.clients_ok + r.clients_dropped for r in trained)
    return {
        "up": sum(r.bytes_up for r in trained) / replies,
        "down": sum(r.bytes_down for r in trained) / asked,
        "eval": rows[-1].eval_loss,
        "seconds": time.perf_counter() - t0,
    }


def smollm2_update() -> dict[str, torch.Tensor]:
    """A rank-8 LoRA update of SmolLM2-135M's attention projections (random, seeded)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(LAYERS):
        for proj, width in (("q", HIDDEN), ("k", KV), ("v", KV), ("o", HIDDEN)):
            base = f"base_model.model.model.layers.{layer}.self_attn.{proj}_proj"
            out[f"{base}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=g) * 1e-2
            out[f"{base}.lora_B.weight"] = torch.randn(width, RANK, generator=g) * 1e-3
    return out


def timing(name: str, fraction: float, repeats: int = 5) -> tuple[float, float]:
    """Milliseconds to encode and to decode one SmolLM2-shaped update (best of ``repeats``)."""
    update = smollm2_update()
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    codec = codecs.build(name, fraction)
    encode = decode = float("inf")
    for seed in range(repeats):
        t0 = time.perf_counter()
        record = codec.encode(update, frozenset(), torch.Generator().manual_seed(seed))
        t1 = time.perf_counter()
        codec.decode(dict(record.items()), shapes, frozenset())
        t2 = time.perf_counter()
        encode, decode = min(encode, t1 - t0), min(decode, t2 - t1)
    return encode * 1e3, decode * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="simulations/configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--codecs", default="none,strip,fp16,int8,ternary,topk")
    parser.add_argument("--topk-fraction", type=float, default=0.05)
    parser.add_argument("--out", default="runs/bench-codecs")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. lora.r=16")
    args = parser.parse_args()
    names = args.codecs.split(",")
    if names[0] != "none":
        names.insert(0, "none")  # the baseline, measured in the same run
    measured = {name: federation(args, name) for name in names}
    base = measured["none"]
    print(f"\n{args.config}, {args.rounds} rounds, {' '.join(args.overrides) or 'as shipped'}")
    print(
        f"{'codec':<8} {'up B/client/round':>18} {'up vs float32':>14} "
        f"{'down B/client/round':>20} {'eval loss':>10} {'vs float32':>11} {'run s':>7} "
        f"{'encode ms':>10} {'decode ms':>10}"
    )
    for name, m in measured.items():
        enc, dec = timing(name, args.topk_fraction)
        change = (m["eval"] - base["eval"]) / base["eval"] * 100
        print(
            f"{name:<8} {m['up']:>18,.0f} {base['up'] / m['up']:>13.2f}x {m['down']:>20,.0f} "
            f"{m['eval']:>10.4f} {change:>+10.2f}% {m['seconds']:>7.0f} {enc:>10.1f} {dec:>10.1f}"
        )
    print(
        "eval loss: the global adapter on the 48-example global eval set after the last round; "
        f"topk sends {args.topk_fraction:.0%} of each tensor with error feedback; encode/decode: "
        "one SmolLM2-135M rank-8 q/k/v/o update (0.92 M values), best of 5"
    )


if __name__ == "__main__":
    stay_offline()
    quiet_libraries()
    main()
