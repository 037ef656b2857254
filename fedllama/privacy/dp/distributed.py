"""Distributed noise under secure aggregation: the distributed discrete Gaussian (DDG).

Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021 (arXiv:2102.06387). The server never adds noise and never
holds a noiseless sum: every client turns its clipped payload x ∈ ℝ^d into integers that
already carry its share of the noise, and SecAgg+ only ever reveals their sum.

On a client (:func:`encode`):

1. clip x to L2 norm C (``privatize`` did; again here in float64, so the bound is exact);
2. flatten it with a random rotation the whole round shares: y = H·diag(s)·pad(x) / √D, with
   D = 2^⌈log2 d⌉, H the Walsh–Hadamard matrix and s public random signs from the round's seed
   (the rotation is orthonormal: ‖y‖ = ‖x‖, and its coordinates are about ‖x‖/√D each);
3. scale by S integer units per unit and round every coordinate stochastically, drawing again
   until ‖ỹ‖₂ ≤ Δ (conditional randomized rounding, Kairouz et al., Theorem 1 / Prop. 22:
   Δ² = min{(cS + √D)², (cS)² + D/4 + √(2 ln(1/β))·(cS + √D/2)}, β = e^{−1/2});
4. add discrete Gaussian noise N_ℤ(0, σ_c²) to every coordinate, from OpenDP's exact sampler
   (Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020),
   whose randomness is the operating system's CSPRNG (``dp.seed`` does not reach it); the
   ClientApp draws it in a thread while it trains (:func:`draw_in_background`);
5. reduce modulo 2^b (``dp.modulus_bits``); SecAgg+ masks and sums modulo 2^64, a multiple.

On the server (:func:`decode`): the unmasked sum modulo 2^b, read as signed, divided by S, the
rotation undone, the first d values kept.

**Sizing** (:func:`plan_round`). Clients provision their noise for m survivors out of the n
sampled (``dp.dropout_tolerance``): σ_c = z·C·S/√m, so any m of them carry a total noise of at
least z·C. S is the largest scale whose sum fits k = 4 standard deviations inside the modulus,
treating the rotated sum as sub-Gaussian with worst-case (aligned) client updates (Kairouz et
al., §4.4): 2^{2b} = 4k²·(S²·(n²C²/D + n·σ²) + n/4), σ = zC/√m. The paper takes k = 4; here k
grows with D so that no coordinate of the round wraps around, with probability 1 − 10⁻⁶
(k = √(2 ln(2D/10⁻⁶)), 7.5 for D = 2^20).

**Privacy** (:func:`ddg_event`). The sum of n' ≥ m survivors' noise is close to N_ℤ(0, n'σ_c²);
Kairouz et al.'s Theorem 1 (Prop. 14, third bound) makes the round ½ε²-zCDP with
ε = Δ₁/(√n'·σ_c) + τ√D, τ = 10·Σ_{k=1}^{n'−1} exp(−2π²σ_c²·k/(k+1)), where Δ₁ is the
sensitivity of the sum of rounded vectors. The server knows who took part, so neither
amplification by sampling nor add/remove adjacency is claimed: Δ₁ = 2Δ (one participant's data
replaced by any other). dp-accounting composes the rounds as ``ZCDpEvent``s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dp_accounting as dpa
import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

WRAP_PROBABILITY = 1e-6
"""A round's sum may wrap around the modulus in some coordinate with at most this probability
(under the sub-Gaussian model of :func:`plan_round`)."""

BETA = math.exp(-0.5)
"""β of conditional randomized rounding: each draw exceeds the tighter bound with probability
at most β (Kairouz et al.'s choice)."""

MAX_DRAWS = 200
"""Rounding draws before giving up (β^200 < 1e-43: only a bug gets there)."""

MIN_BITS, MAX_BITS = 8, 62


class DistributedNoiseError(ValueError):
    """The round's parameters cannot work (too few bits), or a vector does not fit them."""


def wrap_sigmas(size: int) -> float:
    """k: standard deviations of the sum that must fit inside the modulus so that none of
    ``size`` sub-Gaussian coordinates wraps, with probability 1 − :data:`WRAP_PROBABILITY`
    (union bound: 2·size·exp(−k²/2) = p)."""
    return math.sqrt(2 * math.log(2 * size / WRAP_PROBABILITY))


def padded(dim: int) -> int:
    """D: the smallest power of two ≥ d (the Walsh–Hadamard transform needs one)."""
    return 1 << max(0, (dim - 1).bit_length())


def rounded_norm_bound(norm: float, dim: int, beta: float = BETA) -> float:
    """Δ: the L2 bound a vector of norm ``norm`` keeps after conditional randomized rounding to
    the integers in ``dim`` coordinates (Kairouz et al., Theorem 1)."""
    loose = norm + math.sqrt(dim)
    tight = math.sqrt(
        norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    )
    return min(loose, tight)


def _walsh_hadamard(x: F64) -> F64:
    """H·x for the unnormalized Sylvester–Hadamard matrix H (D × D, D a power of two), in
    log2(D) butterfly passes: O(D log D), never the D² matrix."""
    n = x.shape[0]
    y = x.copy()
    half = 1
    while half < n:
        blocks = y.reshape(-1, 2, half)  # (n / 2h, 2, h): each block's two halves
        y = np.stack((blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]), axis=1)
        y = y.reshape(n)
        half *= 2
    return y


def _signs(seed: int, size: int) -> F64:
    return np.random.default_rng(seed).integers(0, 2, size).astype(np.float64) * 2 - 1


def rotate(x: F64, seed: int) -> F64:
    """y = H·diag(s)·pad(x) / √D: an orthonormal rotation, the same for every client of a
    round (``seed`` is public)."""
    size = padded(x.shape[0])
    y = np.zeros(size)
    y[: x.shape[0]] = x
    return _walsh_hadamard(y * _signs(seed, size)) / math.sqrt(size)


def unrotate(y: F64, seed: int) -> F64:
    """The inverse of :func:`rotate` (H/√D is symmetric and its own inverse), padding kept."""
    return _walsh_hadamard(y) / math.sqrt(y.shape[0]) * _signs(seed, y.shape[0])


@dataclass(frozen=True)
class DdgParams:
    """The round's public parameters, chosen by the server and sent to every sampled client."""

    dim: int
    """d: payload values of one encoding (the count keys excluded)."""
    clip_norm: float
    """C: the payload's L2 bound before rotation."""
    scale: float
    """S: integer units per unit of the payload."""
    local_std: float
    """σ_c: each client's discrete Gaussian noise, in integer units."""
    norm_bound: float
    """Δ: each client's rounded vector has L2 norm at most this (integer units)."""
    bits: int
    """b: the sum lives modulo 2^b."""
    seed: int
    """The rotation's public seed."""
    survivors: int
    """m: the noise is provisioned for m clients; a round with fewer in the sum is not
    unmasked."""
    count_keys: tuple[str, ...] = ()
    """The encoding's keys that are not payload (they do not travel under distributed noise:
    the release replaces them with the expected number of clients)."""

    @property
    def size(self) -> int:
        """D: integers each client sends."""
        return padded(self.dim)

    def to_record(self) -> dict[str, Any]:
        """As ConfigRecord fields (sent in the mask stage)."""
        return {
            "ddg-dim": self.dim,
            "ddg-clip-norm": self.clip_norm,
            "ddg-scale": self.scale,
            "ddg-local-std": self.local_std,
            "ddg-norm-bound": self.norm_bound,
            "ddg-bits": self.bits,
            "ddg-seed": self.seed,
            "ddg-survivors": self.survivors,
            "ddg-count-keys": list(self.count_keys),
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> DdgParams | None:
        """The parameters in ``rec``, None when the round has no distributed noise.

        Raises:
            DistributedNoiseError: a field is missing or has the wrong type or range.
        """
        if "ddg-bits" not in rec:
            return None

        def get(key: str, kind: type) -> Any:
            return _field(rec, f"ddg-{key}", kind)

        keys = rec.get("ddg-count-keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise DistributedNoiseError(f"field 'ddg-count-keys' is {keys!r}, expected strings")
        params = cls(
            dim=get("dim", int),
            clip_norm=get("clip-norm", float),
            scale=get("scale", float),
            local_std=get("local-std", float),
            norm_bound=get("norm-bound", float),
            bits=get("bits", int),
            seed=get("seed", int),
            survivors=get("survivors", int),
            count_keys=tuple(keys),
        )
        if not (
            params.dim > 0
            and params.clip_norm > 0
            and params.scale > 0
            and params.local_std >= 0
            and params.norm_bound > 0
            and MIN_BITS <= params.bits <= MAX_BITS
            and params.survivors >= 1
        ):
            raise DistributedNoiseError(f"distributed-noise parameters out of range: {params}")
        return params


def _field(rec: Mapping[str, Any], key: str, kind: type) -> Any:
    value = rec.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DistributedNoiseError(f"field {key!r} is {value!r}, expected {kind.__name__}")
    return value


def plan_round(
    *,
    noise_multiplier: float,
    clip_norm: float,
    dim: int,
    sampled: int,
    survivors: int,
    bits: int,
    seed: int,
    count_keys: Sequence[str] = (),
) -> DdgParams:
    """The round's parameters: σ_c for ``survivors`` out of ``sampled`` clients, and the
    largest scale whose noisy sum fits :func:`wrap_sigmas` standard deviations in 2^``bits``.

    Raises:
        DistributedNoiseError: 2^bits cannot hold the rounding noise of ``sampled`` clients.
    """
    size = padded(dim)
    sigma = noise_multiplier * clip_norm / math.sqrt(survivors)  # per client, payload units
    k = wrap_sigmas(size)
    room = 2.0 ** (2 * bits) - sampled * k**2
    if room <= 0:
        raise DistributedNoiseError(
            f"dp.modulus_bits={bits} cannot hold the rounding noise of {sampled} clients at "
            f"{k:.2f} standard deviations"
        )
    spread = clip_norm**2 * sampled**2 / size + sampled * sigma**2
    scale = math.sqrt(room) / (2 * k * math.sqrt(spread))
    return DdgParams(
        dim=dim,
        clip_norm=clip_norm,
        scale=scale,
        local_std=sigma * scale,
        norm_bound=rounded_norm_bound(clip_norm * scale, size),
        bits=bits,
        seed=seed,
        survivors=survivors,
        count_keys=tuple(count_keys),
    )


def conditional_round(y: F64, bound: float, rng: np.random.Generator) -> I64:
    """Stochastic rounding of every coordinate (unbiased), drawn again until the L2 norm is at
    most ``bound`` (Kairouz et al., Prop. 22).

    Raises:
        DistributedNoiseError: :data:`MAX_DRAWS` draws all exceeded the bound (the input's norm
            was not within the bound the parameters assume).
    """
    low = np.floor(y)
    frac = y - low
    limit = bound**2 * (1 - 1e-12)  # float64 sums of squares err by ~1e-15 relative
    for _ in range(MAX_DRAWS):
        r = low + (rng.random(y.shape[0]) < frac)
        if float(np.dot(r, r)) <= limit:
            return r.astype(np.int64)
    raise DistributedNoiseError(
        f"no rounding within the L2 bound {bound:.6g} in {MAX_DRAWS} draws (input norm "
        f"{math.sqrt(float(np.dot(y, y))):.6g})"
    )


def discrete_gaussian(std: float, size: int) -> I64:
    """``size`` independent draws of N_ℤ(0, std²) from OpenDP's exact sampler (the OS CSPRNG;
    OpenDP files its integer Gaussian under the "contrib" features)."""
    if std == 0:
        return np.zeros(size, dtype=np.int64)
    import opendp.prelude as odp

    odp.enable_features("contrib")
    measurement = odp.m.make_gaussian(
        odp.vector_domain(odp.atom_domain(T="i64")), odp.l2_distance(T="i64"), scale=std
    )
    return np.asarray(measurement([0] * size), dtype=np.int64)


def draw_in_background(params: DdgParams) -> Future[I64]:
    """The client's noise share, drawn in a thread: it does not depend on the data, so a
    client starts it before training and :func:`encode` takes it after (OpenDP's sampler
    releases the GIL)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddg-noise")
    future = pool.submit(discrete_gaussian, params.local_std, params.size)
    pool.shutdown(wait=False)
    return future


def encode(
    x: F64,
    params: DdgParams,
    rng: np.random.Generator | None = None,
    noise: Future[I64] | None = None,
) -> U64:
    """A client's payload as the integers it hands to secure aggregation (module docstring,
    steps 1–5): uint64 values in [0, 2^b). ``noise``: the share from
    :func:`draw_in_background`, else drawn now.

    Raises:
        DistributedNoiseError: ``x`` has the wrong length or is not finite.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (params.dim,):
        raise DistributedNoiseError(f"payload has shape {x.shape}, expected ({params.dim},)")
    if not np.isfinite(x).all():
        raise DistributedNoiseError("the payload contains NaN or Inf")
    norm = math.sqrt(float(np.dot(x, x)))
    if norm > params.clip_norm:
        x = x * (params.clip_norm / norm)
    y = rotate(x, params.seed) * params.scale
    rounded = conditional_round(y, params.norm_bound, rng or np.random.default_rng())
    share = (
        noise.result() if noise is not None else discrete_gaussian(params.local_std, params.size)
    )
    noisy = rounded + share
    out: U64 = np.mod(noisy, 1 << params.bits).astype(np.uint64)
    return out


def decode(total: U64, params: DdgParams) -> tuple[F64, float]:
    """The sum of the clients' payloads from the unmasked sum of their integers, and the
    headroom used: the largest |value| over 2^(b−1) (near 1, the sum may have wrapped)."""
    modulus = 1 << params.bits
    values = (np.asarray(total, dtype=np.uint64) & np.uint64(modulus - 1)).astype(np.int64)
    values[values >= modulus // 2] -= modulus
    used = float(np.abs(values).max()) / (modulus // 2) if values.size else 0.0
    x = unrotate(values.astype(np.float64) / params.scale, params.seed)
    return x[: params.dim], used


def ddg_event(params: DdgParams, survivors: int) -> dpa.DpEvent:
    """The round as dp-accounting composes it: ½ε²-zCDP with ε from Kairouz et al.'s
    Theorem 1 for ``survivors`` noise shares of σ_c and replace-one sensitivity 2Δ (module
    docstring)."""
    return zcdp_event(params.size, params.local_std, 2 * params.norm_bound, survivors)


def zcdp_event(size: int, local_std: float, sensitivity: float, survivors: int) -> dpa.DpEvent:
    """½ε²-zCDP of a sum of ``survivors`` N_ℤ(0, local_std²) per coordinate in ``size``
    coordinates, for an L2 ``sensitivity`` (all in integer units); no noise is no privacy."""
    if survivors < 1:
        raise DistributedNoiseError(f"no noise shares to account ({survivors} survivors)")
    if local_std <= 0:
        return dpa.NonPrivateDpEvent()
    exponent = 2 * math.pi**2 * local_std**2
    tau = 10 * math.fsum(math.exp(-exponent * k / (k + 1)) for k in range(1, survivors))
    epsilon = sensitivity / (math.sqrt(survivors) * local_std) + tau * math.sqrt(size)
    return dpa.ZCDpEvent(rho=epsilon**2 / 2)
