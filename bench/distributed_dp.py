"""What distributed DP noise costs under SecAgg+ (not a test), against plain SecAgg+ measured
in the same run.

1. Protocol cost on a realistic adapter: SmolLM2-135M, LoRA r8 on q/k/v/o (921,600 values),
   N clients with updates clipped to C, every SecAgg+ stage in one process
   (``aggregate_locally``). Plain: the 48-bit fixed-point quantizer. Distributed: rotation,
   conditional rounding, each client's discrete Gaussian share (OpenDP's exact sampler), modulo
   2^b. "Client" is the slowest client summed over the stages; no training, no network.
2. The modulus: for b bits, the scale S, the rounded norm bound against C·S, the largest
   |value| of the sum over 2^(b−1), the discretization error of the decoded mean (noise off)
   against the noise's own standard deviation, and one round's ε against a continuous Gaussian
   of the same z (replace-one sensitivity 2C, δ = 1e-5, the guarantee against the server).

    .venv/bin/python bench/distributed_dp.py [--clients 5] [--bits 12,16,20,24,32] [--z 1.0]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

import dp_accounting as dpa
import numpy as np
from dp_accounting import rdp

from fedllama.config import SecAggConfig
from fedllama.privacy.dp import distributed
from fedllama.privacy.secagg import aggregate_locally
from fedllama.privacy.secagg.local import LocalRound

D_SMOLLM2 = 921_600  # LoRA r8 on q/k/v/o of SmolLM2-135M: 30 layers x 30,720 values
CLIP = 2.5


def _updates(n: int, dim: int, seed: int = 0) -> dict[int, np.ndarray]:
    """n clipped updates that share a direction (as real ones do) plus their own part."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    out = {}
    for node in range(100, 100 + n):
        v = common + rng.normal(size=dim)
        out[node] = (v / np.linalg.norm(v) * CLIP * rng.uniform(0.5, 1.0)).astype(np.float32)
    return out


def _epsilon(event: dpa.DpEvent, delta: float = 1e-5) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _critical_path(out: LocalRound) -> tuple[float, float]:
    """(the slowest client summed over the stages, the server's total) in seconds."""
    client = sum(max(s.values()) for s in out.client_seconds.values() if s)
    return client, sum(out.server_seconds.values())


def bench_protocol(n: int, z: float) -> None:
    vectors = _updates(n, D_SMOLLM2)
    exact = sum(v.astype(np.float64) for v in vectors.values())
    cfg = SecAggConfig(enabled=True)
    params = distributed.plan_round(
        noise_multiplier=z, clip_norm=CLIP, dim=D_SMOLLM2, sampled=n, survivors=n, bits=32, seed=1
    )
    print(
        f"protocol  SmolLM2-135M r8 q/k/v/o: d = {D_SMOLLM2:,} values, {n} clients, C = {CLIP}, "
        f"z = {z}; one run each, seconds on this machine"
    )
    print(
        f"{'path':<28}{'values sent':>12}{'client s':>10}{'server s':>10}{'MB up':>8}"
        f"{'noise std':>11}"
    )
    figures = {}
    for label, ddg, values in (
        ("plain SecAgg+ (48-bit q)", None, D_SMOLLM2),
        ("distributed DG (2^32)", params, params.size),
    ):
        t0 = time.perf_counter()
        out = aggregate_locally(vectors, cfg, rng=random.Random(0), ddg=ddg)
        wall = time.perf_counter() - t0
        client, server = _critical_path(out)
        figures[label] = (client, server, wall)
        up = out.bytes_up["mask"] / n / 1e6
        err = float(np.std(out.total - exact))
        print(f"{label:<28}{values:>12,}{client:>10.2f}{server:>10.2f}{up:>8.2f}{err:>11.3g}")
    (c_plain, s_plain, plain_wall), (c_ddg, s_ddg, ddg_wall) = figures.values()
    t0 = time.perf_counter()
    distributed.discrete_gaussian(params.local_std, params.size)
    sampler = time.perf_counter() - t0
    print(
        f"ratio distributed / plain: client {c_ddg / c_plain:.1f}x, server {s_ddg / s_plain:.2f}x,"
        f" whole round in one process {ddg_wall / plain_wall:.1f}x; values sent "
        f"{params.size / D_SMOLLM2:.3f}x (padding to 2^k). Of a client's time, the exact "
        f"discrete Gaussian sampler: {sampler:.1f} s ({sampler / params.size * 1e6:.1f} µs/value)."
        f" Expected noise std z·C = {z * CLIP:g}."
    )


def bench_bits(n: int, z: float, bits: list[int]) -> None:
    dim = 1 << 16  # the discretization is per coordinate: a 65,536-value payload shows it
    vectors = _updates(n, dim, seed=1)
    exact = sum(v.astype(np.float64) for v in vectors.values())
    gaussian = _epsilon(dpa.GaussianDpEvent(z / 2))
    print(
        f"\nmodulus   {n} clients, d = {dim:,}, z = {z}, C = {CLIP}: ε of one round at δ = 1e-5 "
        f"(replace one, no amplification); a continuous Gaussian gives {gaussian:.4f}"
    )
    print(
        f"{'bits':>5}{'scale S':>12}{'Δ / CS':>9}{'headroom':>10}{'rounding err':>14}"
        f"{'/ noise std':>12}{'ε':>9}{'/ Gaussian':>11}"
    )
    for b in bits:
        params = distributed.plan_round(
            noise_multiplier=z, clip_norm=CLIP, dim=dim, sampled=n, survivors=n, bits=b, seed=2
        )
        quiet = replace(params, local_std=0.0)  # the discretization alone
        total = sum(distributed.encode(v.astype(np.float64), quiet) for v in vectors.values())
        decoded, _ = distributed.decode(np.asarray(total, dtype=np.uint64), quiet)
        rounding = float(np.sqrt(np.mean((decoded - exact) ** 2)))
        noisy = sum(distributed.encode(v.astype(np.float64), params) for v in vectors.values())
        _, headroom = distributed.decode(np.asarray(noisy, dtype=np.uint64), params)
        eps = _epsilon(distributed.ddg_event(params, n))
        inflation = params.norm_bound / (CLIP * params.scale)
        print(
            f"{b:>5}{params.scale:>12.4g}{inflation:>9.4f}{headroom:>10.3f}{rounding:>14.3e}"
            f"{rounding / (z * CLIP):>12.2e}{eps:>9.4f}{eps / gaussian:>11.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--bits", default="12,16,20,24,32")
    parser.add_argument("--z", type=float, default=1.0)
    parser.add_argument("--only", choices=["protocol", "bits"])
    args = parser.parse_args()
    if args.only != "bits":
        bench_protocol(args.clients, args.z)
    if args.only != "protocol":
        bench_bits(args.clients, args.z, [int(b) for b in args.bits.split(",")])


if __name__ == "__main__":
    main()
