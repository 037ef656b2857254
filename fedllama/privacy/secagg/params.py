"""SecAgg+ round parameters: fixed point, the neighbour graph, the threshold, and errors.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    pass


U64 = npt.NDArray[np.uint64]


F32 = npt.NDArray[np.float32]


F64 = npt.NDArray[np.float64]


CHUNK = 1 << 18  # elements per PRG/quantization chunk: 2 MiB of uint64, bounded memory


class SecAggError(ValueError):
    """A protocol message is malformed, or a request must be refused; the message says why."""


class SecAggAbort(RuntimeError):
    """The round cannot complete securely (too few survivors or shares); the message says why."""


@dataclass(frozen=True)
class Quantizer:
    """Stochastic fixed point in two's complement modulo 2^m (``modulus_bits``, 64 or 32).

    ``q = round_stochastic(clip(x, -C, C) · S)`` with ``S = (2^(bits-1) - 1) / C``: |q| <
    2^(bits-1), step 1/S, rounding unbiased (E[q/S] = clip(x)), error per value below one step.
    Arithmetic is done modulo 2^64 (numpy's uint64 wraps) and read modulo 2^m: 2^m divides
    2^64, so a value, a mask or a sum reduced to m bits is the same residue either way.
    """

    clip_range: float
    bits: int
    modulus_bits: int = 64

    @property
    def scale(self) -> float:
        """S: integer units per unit of x."""
        return float(2 ** (self.bits - 1) - 1) / self.clip_range

    @property
    def step(self) -> float:
        """Value of one integer unit, C / (2^(bits-1) - 1)."""
        return 1.0 / self.scale

    def quantize(self, x: F32, rng: np.random.Generator | None = None) -> tuple[U64, int]:
        """(q as uint64 (n,), number of values clipped to ±C). NaN/Inf are refused."""
        rng = rng if rng is not None else np.random.default_rng()
        out = np.empty(x.shape[0], dtype=np.uint64)
        clipped = 0
        for start in range(0, x.shape[0], CHUNK):
            part = x[start : start + CHUNK].astype(np.float64)
            if not np.isfinite(part).all():
                raise SecAggError("the encoding contains NaN or Inf; it cannot be quantized")
            clipped += int(np.count_nonzero(np.abs(part) > self.clip_range))
            scaled = np.clip(part, -self.clip_range, self.clip_range) * self.scale
            low = np.floor(scaled)
            q = low + (rng.random(part.shape[0]) < scaled - low)  # stochastic rounding
            out[start : start + CHUNK] = q.astype(np.int64).view(np.uint64)
        return out, clipped

    def dequantize(self, total: U64) -> F64:
        """The (signed) sum of quantized vectors, back in units of x (``total`` read modulo
        2^m)."""
        if self.modulus_bits == 64:
            return total.view(np.int64).astype(np.float64) / self.scale
        return to_wire(total, self.modulus_bits).view(np.int32).astype(np.float64) / self.scale


def wire_dtype(modulus_bits: int) -> np.dtype[Any]:
    """The dtype a masked value travels as: uint64, or uint32 for a 32-bit modulus."""
    return np.dtype(np.uint64 if modulus_bits == 64 else np.uint32)


def to_wire(values: U64, modulus_bits: int) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Values modulo 2^64 as they travel: uint64, or their low 32 bits as uint32 (the residue
    modulo 2^32) when ``modulus_bits`` is 32."""
    return values.astype(wire_dtype(modulus_bits), copy=False)


def from_wire(values: npt.NDArray[Any], modulus_bits: int, length: int) -> U64:
    """A masked vector off the wire as uint64 for summing modulo 2^64; SecAggError unless it
    is ``length`` values of the round's width."""
    wire = wire_dtype(modulus_bits)
    if values.dtype != wire or values.shape != (length,):
        raise SecAggError(
            f"masked vector is {values.dtype} {values.shape}, expected {wire} ({length},) "
            f"for a {modulus_bits}-bit modulus"
        )
    return values.astype(np.uint64)


def neighbour_count(num_nodes: int, requested: int = 0) -> int:
    """k, the neighbours of each node: ``requested`` (0 = 2·⌈log2 N⌉), even, at most N - 1.

    Bell et al. show k = O(log N) suffices; k is rounded up to even so the ring is symmetric.
    """
    if num_nodes < 2:
        return 0
    k = requested if requested > 0 else 2 * math.ceil(math.log2(num_nodes))
    return min(num_nodes - 1, k + k % 2)


def threshold_count(fraction: float, shares: int) -> int:
    """t: shares needed to rebuild a secret, ``⌈fraction · shares⌉``, at least 2."""
    return min(shares, max(2, math.ceil(fraction * shares - 1e-9)))


def harary_graph(nodes: Sequence[int], k: int, rng: random.Random) -> dict[int, frozenset[int]]:
    """SecAgg+'s neighbour graph: a random ring, each node linked to k/2 on either side.

    Returns each node's neighbours (itself excluded); the relation is symmetric.
    """
    order = list(nodes)
    rng.shuffle(order)
    n = len(order)
    if k >= n - 1:
        return {v: frozenset(order) - {v} for v in order}
    half = k // 2
    return {
        order[a]: frozenset(order[(a + off) % n] for off in range(-half, half + 1) if off != 0)
        for a in range(n)
    }


@dataclass(frozen=True)
class Params:
    """What a client needs to know about the round (sent in the setup stage)."""

    server_round: int
    threshold: int
    shares: int
    """k + 1: a full neighbourhood plus the node itself."""
    clip_range: float
    bits: int
    modulus_bits: int = 64

    def to_record(self) -> dict[str, int | float]:
        """As ConfigRecord fields."""
        return {
            "round": self.server_round,
            "threshold": self.threshold,
            "shares": self.shares,
            "clip-range": self.clip_range,
            "bits": self.bits,
            "modulus-bits": self.modulus_bits,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Params:
        """Parse and check setup fields (raises SecAggError naming the field)."""
        params = cls(
            server_round=get_field(rec, "round", int),
            threshold=get_field(rec, "threshold", int),
            shares=get_field(rec, "shares", int),
            clip_range=get_field(rec, "clip-range", float),
            bits=get_field(rec, "bits", int),
            modulus_bits=get_field(rec, "modulus-bits", int),
        )
        if not 2 <= params.threshold <= params.shares:
            raise SecAggError(
                f"threshold {params.threshold} must be in 2..shares ({params.shares})"
            )
        if (
            not params.clip_range > 0
            or not 16 <= params.bits <= 53
            or params.modulus_bits not in (32, 64)
            or params.bits >= params.modulus_bits
        ):
            raise SecAggError(
                f"bad quantization: clip-range {params.clip_range}, bits {params.bits}, "
                f"modulus-bits {params.modulus_bits}"
            )
        return params

    @property
    def quantizer(self) -> Quantizer:
        """The round's fixed-point format."""
        return Quantizer(self.clip_range, self.bits, self.modulus_bits)


def get_field(rec: Mapping[str, Any], key: str, kind: type) -> Any:
    value = rec.get(key)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise SecAggError(f"field {key!r} is {value!r}, expected {kind.__name__}")
    return value


def get_ids(rec: Mapping[str, Any], key: str) -> list[int]:
    """A ConfigRecord list of node ids (SecAggError if it is not one)."""
    value = rec.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise SecAggError(f"field {key!r} must be a list of node ids, got {value!r}")
    return value


def get_pairs(rec: Mapping[str, Any], ids: str, values: str) -> dict[int, bytes]:
    """Two parallel ConfigRecord lists (node ids, bytes) as a dict; SecAggError if malformed."""
    keys, vals = rec.get(ids, []), rec.get(values, [])
    if (
        not isinstance(keys, list)
        or not isinstance(vals, list)
        or len(keys) != len(vals)
        or not all(isinstance(k, int) and not isinstance(k, bool) for k in keys)
        or not all(isinstance(v, bytes) for v in vals)
    ):
        raise SecAggError(f"fields {ids!r}/{values!r} must be equal-length lists of ints/bytes")
    if len(set(keys)) != len(keys):
        raise SecAggError(f"field {ids!r} repeats a node id")
    return dict(zip(keys, vals, strict=True))
