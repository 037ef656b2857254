"""Secure aggregation (SecAgg+) for summable merge strategies, on Flower's Message API.

The server learns the **sum** of the clients' encodings (DESIGN.md §2) and nothing else about any
one of them, while clients may drop out mid-round. This follows SecAgg+ (Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020), which is SecAgg (Bonawitz
et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017) with a
sparse random neighbour graph, so a client's cost grows with log N instead of N:

======== =========================================== ===========================================
stage    server sends (message type)                 client replies
======== =========================================== ===========================================
setup    round parameters (``train.secagg_setup``)   two fresh SECP384R1 public keys: one to
                                                     encrypt shares, one for pairwise masks
share    its neighbours' public keys                 Shamir shares (threshold t) of its self-mask
         (``train.secagg_share``)                    seed b and its mask key, one per neighbour,
                                                     each encrypted for its recipient (ECDH +
                                                     HKDF → Fernet), and a hash commitment to b
mask     global state + train config + the shares    trains, encodes, quantizes, adds PRG(b) and
         addressed to it (``train.secagg_mask``)     ±PRG(s_ij) per neighbour mod 2^64; replies
                                                     with the masked vector and its metrics
unmask   which neighbours survived / dropped         shares of b for survivors, of the mask key
         (``train.secagg_unmask``)                   for dropped nodes (never both for one node)
======== =========================================== ===========================================

The server rebuilds each survivor's b and each dropped node's mask key from at least t shares
(checked against b's commitment and the advertised public key, so a corrupted share is found
and named), regenerates those masks, removes them from the running sum of masked vectors,
dequantizes, and hands the sum to ``strategy.decode``: plain and secure aggregation share one
decode path.

Design choices (see the README's "Secure aggregation" section):

* Masks are expanded by AES-256-CTR keyed through HKDF-SHA256 (a cryptographic PRG), not by
  numpy's Mersenne Twister with a 32-bit seed as in Flower's legacy ``secaggplus_mod``.
* Fixed point: x is clipped to [-C, C] and stochastically rounded to a signed integer with step
  C / (2^(bits-1) - 1), stored in two's complement modulo 2^64 (numpy uint64 wraps). The sum of N
  clients cannot overflow while N <= (2^63 - 1) / (2^(bits-1) - 1) ≈ 2^(64-bits).
* The neighbour graph is SecAgg+'s Harary graph: a random permutation of the sampled nodes in a
  ring, each linked to the k/2 nodes on either side (k ≈ 2·⌈log2 N⌉).
* The threshold is a fraction in (0.5, 1] of each node's k + 1 shares, so no two disjoint sets
  of its neighbours can each rebuild one of its secrets (a server that tells some neighbours a
  node survived and others that it dropped cannot collect both of its secrets from them).

The protocol itself (:class:`SecAggClient`, :class:`SecAggServer`) takes and returns plain data;
the Flower glue at the end of this module turns it into messages, and the client keeps its round
secrets in ``context.state`` between messages (in a deployment every message starts a fresh
ClientApp process; the SuperNode keeps the context on the node).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedllama.config import SecAggConfig

# torch and fedllama.flower (which imports torch) are imported where they are used: in a
# deployment every message starts a fresh ClientApp process, and the key, share and unmask
# stages need neither, which saves the seconds a torch import costs on each of them.
if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedllama.adapters import AdapterState
    from fedllama.flower import FedLlamaStrategy, RoundReport

log = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

CURVE = ec.SECP384R1()
SEED_BYTES = 32
SCALAR_BYTES = 48  # a SECP384R1 private scalar
CHUNK = 1 << 18  # elements per PRG/quantization chunk: 2 MiB of uint64, bounded memory

SECAGG = "secagg"
"""ConfigRecord key of the protocol fields, in both directions."""
MASKED = "masked"
"""ArrayRecord (and its one array) carrying a client's masked vector."""
CLIPPED = "secagg-clipped"
"""Metric: how many of the client's encoded values were clipped to ±clip_range."""
STATE = "fedllama.secagg"
"""``context.state`` ConfigRecord holding a client's secrets for the current round."""
STAGES = ("setup", "share", "mask", "unmask")
ACTIONS = {stage: f"secagg_{stage}" for stage in STAGES}
"""ClientApp actions: ``train.secagg_setup`` messages go to ``@app.train("secagg_setup")``."""


class SecAggError(ValueError):
    """A protocol message is malformed, or a request must be refused; the message says why."""


class SecAggAbort(RuntimeError):
    """The round cannot complete securely (too few survivors or shares); the message says why."""


# --------------------------------------------------------------------------------------------
# Fixed point, PRG, keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantizer:
    """Stochastic fixed point in two's complement modulo 2^64.

    ``q = round_stochastic(clip(x, -C, C) · S)`` with ``S = (2^(bits-1) - 1) / C``: |q| <
    2^(bits-1), step 1/S, rounding unbiased (E[q/S] = clip(x)), error per value below one step.
    """

    clip_range: float
    bits: int

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
        """The (signed) sum of quantized vectors, back in units of x."""
        return total.view(np.int64).astype(np.float64) / self.scale


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def self_mask_key(seed: bytes) -> bytes:
    """AES key of a client's self mask PRG(b)."""
    return _hkdf(seed, b"fedllama secagg self mask")


def pair_mask_key(private: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey) -> bytes:
    """AES key of the pairwise mask: HKDF(ECDH(sk_i, pk_j)), equal for (i, j) and (j, i)."""
    return _hkdf(private.exchange(ec.ECDH(), public), b"fedllama secagg pairwise mask")


def add_prg(target: U64, key: bytes, sign: int) -> None:
    """``target += sign · PRG(key)`` mod 2^64, in place, PRG = AES-256-CTR keystream as uint64.

    The keystream is written chunk by chunk into one reused buffer, so memory stays at one
    chunk beyond ``target`` and nothing is allocated per chunk.
    """
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    chunk = min(CHUNK, target.shape[0])
    zeros = memoryview(bytes(chunk * 8))
    buffer = bytearray(chunk * 8 + 16)  # update_into wants room for a block more
    for start in range(0, target.shape[0], chunk):
        stop = min(start + chunk, target.shape[0])
        encryptor.update_into(zeros[: (stop - start) * 8], buffer)
        stream = np.frombuffer(buffer, dtype="<u8", count=stop - start)
        if sign > 0:
            target[start:stop] += stream
        else:
            target[start:stop] -= stream


def prg(key: bytes, length: int) -> U64:
    """PRG(key) as ``length`` uint64 values (the mask ``add_prg`` adds)."""
    out = np.zeros(length, dtype=np.uint64)
    add_prg(out, key, +1)
    return out


def _new_private_key() -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
    """A fresh SECP384R1 key: (key, 48-byte private scalar, compressed public point)."""
    key = ec.generate_private_key(CURVE)
    return key, _scalar(key), public_bytes(key.public_key())


def _scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


def private_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """A SECP384R1 private key from its 48-byte scalar."""
    return ec.derive_private_key(int.from_bytes(scalar, "big"), CURVE)


def public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """A public key as its compressed point (49 bytes)."""
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """A SECP384R1 public key from its encoded point (raises SecAggError if it is not one)."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, data)
    except (ValueError, TypeError) as err:
        raise SecAggError(f"not a SECP384R1 public key ({err})") from None


def _fernet_key(private_scalar: bytes, public: bytes) -> bytes:
    # Flower's helper: ECDH + HKDF-SHA256 → urlsafe-base64 Fernet key
    return generate_shared_key(private_key(private_scalar), public_key(public))


def seed_commitment(node: int, server_round: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, bound to its node and round.

    The server checks a rebuilt seed against it, which finds corrupted shares. The seed is 256
    uniform bits, so its hash reveals nothing useful about it.
    """
    tag = b"fedllama secagg seed" + node.to_bytes(8, "little") + server_round.to_bytes(8, "little")
    return hashlib.sha256(tag + seed).digest()


# --------------------------------------------------------------------------------------------
# Neighbour graph and round parameters
# --------------------------------------------------------------------------------------------


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

    def to_record(self) -> dict[str, int | float]:
        """As ConfigRecord fields."""
        return {
            "round": self.server_round,
            "threshold": self.threshold,
            "shares": self.shares,
            "clip-range": self.clip_range,
            "bits": self.bits,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Params:
        """Parse and check setup fields (raises SecAggError naming the field)."""
        params = cls(
            server_round=_field(rec, "round", int),
            threshold=_field(rec, "threshold", int),
            shares=_field(rec, "shares", int),
            clip_range=_field(rec, "clip-range", float),
            bits=_field(rec, "bits", int),
        )
        if not 2 <= params.threshold <= params.shares:
            raise SecAggError(
                f"threshold {params.threshold} must be in 2..shares ({params.shares})"
            )
        if not params.clip_range > 0 or not 16 <= params.bits <= 53:
            raise SecAggError(
                f"bad quantization: clip-range {params.clip_range}, bits {params.bits}"
            )
        return params

    @property
    def quantizer(self) -> Quantizer:
        """The round's fixed-point format."""
        return Quantizer(self.clip_range, self.bits)


def _field(rec: Mapping[str, Any], key: str, kind: type) -> Any:
    value = rec.get(key)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise SecAggError(f"field {key!r} is {value!r}, expected {kind.__name__}")
    return value


def _ids(rec: Mapping[str, Any], key: str) -> list[int]:
    """A ConfigRecord list of node ids (SecAggError if it is not one)."""
    value = rec.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise SecAggError(f"field {key!r} must be a list of node ids, got {value!r}")
    return value


def _pairs(rec: Mapping[str, Any], ids: str, values: str) -> dict[int, bytes]:
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


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


@dataclass
class SecAggClient:
    """One client's side of a SecAgg+ round; each stage is one method call.

    The state round-trips through :meth:`to_record` / :meth:`from_record` between messages.
    Secrets are dropped as soon as they are no longer needed: the key-encryption key and the
    mask key after masking, everything after the unmask reply, so the client cannot be asked
    to reveal anything twice.
    """

    node: int
    params: Params
    stage: str
    enc_key: bytes = b""
    """Private scalar for share encryption (sk_enc)."""
    mask_key: bytes = b""
    """Private scalar for pairwise masks (sk_mask); its shares let the server unmask a dropout."""
    seed: bytes = b""
    """Self-mask seed b."""
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    """Neighbourhood (itself included) → (pk_enc, pk_mask)."""
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    """Owner → the share of the owner's b this client holds."""
    key_shares: dict[int, bytes] = field(default_factory=dict)
    """Owner → the share of the owner's sk_mask this client holds."""

    # -- stage 1: advertise keys ------------------------------------------------------------

    @classmethod
    def setup(cls, node: int, params: Params) -> tuple[SecAggClient, tuple[bytes, bytes]]:
        """Start a round: two fresh key pairs; returns the client and (pk_enc, pk_mask)."""
        _, enc_scalar, enc_public = _new_private_key()
        _, mask_scalar, mask_public = _new_private_key()
        client = cls(node, params, "setup", enc_key=enc_scalar, mask_key=mask_scalar)
        client.keys = {node: (enc_public, mask_public)}
        return client, (enc_public, mask_public)

    # -- stage 2: share keys ----------------------------------------------------------------

    def share(self, keys: Mapping[int, tuple[bytes, bytes]]) -> tuple[dict[int, bytes], bytes]:
        """Shamir-share b and sk_mask over the neighbourhood ``keys`` (itself included).

        Returns one ciphertext per neighbour (only it can decrypt it) and the commitment to b.

        Raises:
            SecAggError: fewer than t key holders, repeated keys, own keys misreported, or a
                key that is not a SECP384R1 point.
        """
        self._expect("setup", "share")
        own = self.keys[self.node]
        if keys.get(self.node) != own:
            raise SecAggError(f"node {self.node}: the server misreports this node's own keys")
        if len(keys) < self.params.threshold:
            raise SecAggError(
                f"node {self.node}: {len(keys)} key holders (itself included), fewer than the "
                f"threshold {self.params.threshold}"
            )
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise SecAggError(f"node {self.node}: some advertised public keys are identical")
        for pk_enc, pk_mask in keys.values():
            public_key(pk_enc), public_key(pk_mask)
        self.keys = dict(keys)
        self.seed = secrets.token_bytes(SEED_BYTES)
        order = sorted(keys)  # share index i+1 goes to the i-th node id in sorted order
        seed_shares = create_shares(self.seed, self.params.threshold, len(order))
        key_shares = create_shares(self.mask_key, self.params.threshold, len(order))
        out: dict[int, bytes] = {}
        for dst, seed_share, key_share in zip(order, seed_shares, key_shares, strict=True):
            if dst == self.node:
                self.seed_shares[dst], self.key_shares[dst] = seed_share, key_share
                continue
            plaintext = share_keys_plaintext_concat(self.node, dst, seed_share, key_share)
            out[dst] = encrypt(_fernet_key(self.enc_key, keys[dst][0]), plaintext)
        self.stage = "share"
        return out, seed_commitment(self.node, self.params.server_round, self.seed)

    # -- stage 3: masked input --------------------------------------------------------------

    def receive(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Decrypt and keep the shares neighbours sent; done before training, to fail fast.

        Raises:
            SecAggError: a ciphertext from a non-neighbour, one that does not authenticate
                (corrupted, or not encrypted for this node), or fewer than t share holders.
        """
        self._expect("share", "mask")
        if len(ciphertexts) + 1 < self.params.threshold:
            raise SecAggError(
                f"node {self.node}: shares from {len(ciphertexts)} neighbours, fewer than the "
                f"threshold {self.params.threshold} - 1"
            )
        for src, ciphertext in ciphertexts.items():
            if src == self.node or src not in self.keys:
                raise SecAggError(f"node {self.node}: a share from node {src}, not a neighbour")
            try:
                plaintext = decrypt(_fernet_key(self.enc_key, self.keys[src][0]), ciphertext)
            except (InvalidToken, InvalidTag, ValueError):
                raise SecAggError(
                    f"node {self.node}: the share ciphertext from node {src} does not "
                    "authenticate (corrupted in transit or not encrypted for this node)"
                ) from None
            actual_src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
            if actual_src != src or dst != self.node:
                raise SecAggError(
                    f"node {self.node}: a share routed from node {src} says it is from node "
                    f"{actual_src} to node {dst}"
                )
            self.seed_shares[src], self.key_shares[src] = seed_share, key_share

    def mask(self, vector: F32, rng: np.random.Generator | None = None) -> tuple[U64, int]:
        """Quantize ``vector`` and add PRG(b) and ±PRG(s_ij) for each share sender j, mod 2^64.

        The sign is + when j's node id is larger, − when smaller, so each pair cancels in the
        sum. Call :meth:`receive` first. Returns (masked vector, values clipped).
        """
        self._expect("share", "mask")
        q, clipped = self.params.quantizer.quantize(vector, rng)
        add_prg(q, self_mask_key(self.seed), +1)
        mine = private_key(self.mask_key)
        for other in sorted(set(self.seed_shares) - {self.node}):
            key = pair_mask_key(mine, public_key(self.keys[other][1]))
            add_prg(q, key, +1 if other > self.node else -1)
        self.enc_key = self.mask_key = self.seed = b""  # no longer needed
        self.stage = "mask"
        return q, clipped

    # -- stage 4: unmask --------------------------------------------------------------------

    def unmask(
        self, survivors: Sequence[int], dropped: Sequence[int]
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Shares of b for ``survivors`` and of sk_mask for ``dropped`` neighbours.

        Raises:
            SecAggError: a node in both lists, this node called dropped, fewer than t survivors
                claimed, or a node this client holds no share of.
        """
        self._expect("mask", "unmask")
        both = set(survivors) & set(dropped)
        if both:
            raise SecAggError(
                f"node {self.node}: refusing to reveal both secrets of node {min(both)} (it is "
                "listed as survived and as dropped)"
            )
        if self.node in dropped or self.node not in survivors:
            raise SecAggError(f"node {self.node}: the unmask request does not list it as survived")
        if len(set(survivors)) < self.params.threshold:
            raise SecAggError(
                f"node {self.node}: only {len(set(survivors))} survivors claimed, fewer than "
                f"the threshold {self.params.threshold}"
            )
        unknown = sorted(set(survivors) - set(self.seed_shares)) + sorted(
            set(dropped) - set(self.key_shares)
        )
        if unknown:
            raise SecAggError(f"node {self.node}: holds no share of node {unknown[0]}")
        seeds = {n: self.seed_shares[n] for n in survivors}
        keys = {n: self.key_shares[n] for n in dropped}
        self.seed_shares, self.key_shares, self.keys = {}, {}, {}
        self.stage = "unmask"
        return seeds, keys

    def _expect(self, stage: str, doing: str) -> None:
        if self.stage != stage:
            raise SecAggError(
                f"node {self.node}: got a {doing} request after the {self.stage} stage; "
                f"expected it after {stage}"
            )

    # -- persistence in context.state -------------------------------------------------------

    def to_record(self) -> ConfigRecord:
        """The state as a ConfigRecord for ``context.state``."""
        ids = list(self.keys)
        return ConfigRecord(
            {
                **self.params.to_record(),
                "node": self.node,
                "stage": self.stage,
                "enc-key": self.enc_key,
                "mask-key": self.mask_key,
                "seed": self.seed,
                "key-ids": ids,
                "pk-enc": [self.keys[n][0] for n in ids],
                "pk-mask": [self.keys[n][1] for n in ids],
                "seed-owners": list(self.seed_shares),
                "seed-shares": list(self.seed_shares.values()),
                "key-owners": list(self.key_shares),
                "key-shares": list(self.key_shares.values()),
            }
        )

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> SecAggClient:
        """Inverse of :meth:`to_record`."""
        enc, mask = _pairs(rec, "key-ids", "pk-enc"), _pairs(rec, "key-ids", "pk-mask")
        return cls(
            node=_field(rec, "node", int),
            params=Params.from_record(rec),
            stage=_field(rec, "stage", str),
            enc_key=_field(rec, "enc-key", bytes),
            mask_key=_field(rec, "mask-key", bytes),
            seed=_field(rec, "seed", bytes),
            keys={n: (enc[n], mask[n]) for n in enc},
            seed_shares=_pairs(rec, "seed-owners", "seed-shares"),
            key_shares=_pairs(rec, "key-owners", "key-shares"),
        )


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def share_bytes(secret_bytes: int) -> int:
    """Length of one of Flower's Shamir shares of a ``secret_bytes`` secret (index + chunks)."""
    return 4 + 16 * (secret_bytes // 16 + 1)  # PKCS#7 always adds padding


@dataclass
class SecAggServer:
    """The server's side of a SecAgg+ round: routes keys and shares, sums masked vectors,
    rebuilds the secrets needed to unmask, and returns only the sum.

    Nodes leave the round at any stage (a missing, failed or invalid reply: :meth:`drop`).
    Each stage's requests go to the nodes still in; stage methods raise :class:`SecAggAbort`
    when too few remain to finish securely.

    Args:
        nodes: the sampled node ids.
        cfg: the ``secagg`` config section.
        server_round: the round number (bound into each client's commitment).
        length: elements of the flattened encoding.
        rng: shuffles the neighbour graph (default: the OS's CSPRNG).
    """

    nodes: Sequence[int]
    cfg: SecAggConfig
    server_round: int
    length: int
    rng: random.Random = field(default_factory=secrets.SystemRandom)

    def __post_init__(self) -> None:
        n = len(self.nodes)
        self.quantizer = Quantizer(self.cfg.clip_range, self.cfg.quantization_bits)
        if n < 2:
            raise SecAggAbort(f"secure aggregation needs at least 2 clients in a round, got {n}")
        if n > self.cfg.max_clients:
            raise SecAggAbort(
                f"{n} clients could overflow the 64-bit sum at secagg.quantization_bits="
                f"{self.cfg.quantization_bits} (at most {self.cfg.max_clients})"
            )
        self.k = neighbour_count(n, self.cfg.num_neighbours)
        self.threshold = threshold_count(self.cfg.threshold, self.k + 1)
        self.graph = harary_graph(self.nodes, self.k, self.rng)
        self.alive: set[int] = set(self.nodes)
        self.dropped: dict[str, list[int]] = {stage: [] for stage in STAGES}
        self.stage = "setup"
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.commitments: dict[int, bytes] = {}
        self.outbox: dict[int, dict[int, bytes]] = {}  # dst -> src -> ciphertext
        self.sharers: set[int] = set()  # U2: nodes whose shares were routed
        self.total: U64 | None = None
        self.summed: set[int] = set()  # U3: nodes whose masked vectors are in the sum
        self.seed_shares: dict[int, dict[int, bytes]] = {}  # owner -> holder -> share
        self.key_shares: dict[int, dict[int, bytes]] = {}
        self.neighbourhood: dict[int, set[int]] = {}  # neighbours each node got keys of
        self.unmasked: set[int] = set()  # U4: nodes whose unmask replies were kept
        self.rebuilt: dict[str, set[int]] = {"seed": set(), "key": set()}

    @property
    def params(self) -> Params:
        """The setup parameters every client gets."""
        return Params(
            self.server_round,
            self.threshold,
            self.k + 1,
            self.cfg.clip_range,
            self.cfg.quantization_bits,
        )

    def drop(self, node: int, reason: str) -> None:
        """Take ``node`` out of the round at the current stage (logged with the reason)."""
        if node in self.alive:
            self.alive.discard(node)
            self.dropped[self.stage].append(node)
            log.warning(
                "round %d: secagg %s: dropped node %d: %s",
                self.server_round,
                self.stage,
                node,
                reason,
            )

    def _close_stage(self, replied: set[int], next_stage: str) -> None:
        for node in sorted(self.alive - replied):
            self.drop(node, "no reply")
        self.stage = next_stage

    # -- stage 1 ----------------------------------------------------------------------------

    def setup_requests(self) -> dict[int, Params]:
        """Setup parameters for each sampled node."""
        return {n: self.params for n in sorted(self.alive)}

    def add_keys(self, node: int, pk_enc: bytes, pk_mask: bytes) -> None:
        """A node's public keys (raises SecAggError if they are not SECP384R1 points)."""
        public_key(pk_enc), public_key(pk_mask)
        self.keys[node] = (pk_enc, pk_mask)

    # -- stage 2 ----------------------------------------------------------------------------

    def share_requests(self) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Each node with keys gets the keys of its live neighbourhood (itself included)."""
        self._close_stage(set(self.keys), "share")
        self._prune("its live neighbours")
        self.neighbourhood = {n: set(self.graph[n] & self.alive) for n in self.alive}
        return {
            n: {m: self.keys[m] for m in sorted(self.neighbourhood[n] | {n})}
            for n in sorted(self.alive)
        }

    def add_shares(self, node: int, ciphertexts: Mapping[int, bytes], commitment: bytes) -> None:
        """A node's encrypted shares: exactly one per live neighbour it was sent keys of."""
        expected = self.neighbourhood[node]
        if set(ciphertexts) != expected:
            odd = sorted(set(ciphertexts) ^ expected)
            raise SecAggError(
                f"shares for {sorted(ciphertexts)}, expected one per neighbour {sorted(expected)} "
                f"(differs at node {odd[0]})"
            )
        if len(commitment) != 32:
            raise SecAggError(f"seed commitment of {len(commitment)} bytes, expected 32")
        self.commitments[node] = commitment
        for dst, ciphertext in ciphertexts.items():
            self.outbox.setdefault(dst, {})[node] = ciphertext

    # -- stage 3 ----------------------------------------------------------------------------

    def mask_requests(self) -> dict[int, dict[int, bytes]]:
        """Each node that shared gets the ciphertexts its live neighbours addressed to it."""
        self._close_stage(set(self.commitments), "mask")
        self._prune("the neighbours that shared with it")
        self.sharers = set(self.alive)
        return {
            n: {src: c for src, c in self.outbox.get(n, {}).items() if src in self.sharers}
            for n in sorted(self.alive)
        }

    def add_masked(self, node: int, masked: U64) -> None:
        """Add a node's masked vector to the running sum (mod 2^64)."""
        if node in self.summed:
            raise SecAggError("a second masked vector from the same node")
        if masked.dtype != np.uint64 or masked.shape != (self.length,):
            raise SecAggError(
                f"masked vector is {masked.dtype} {masked.shape}, expected uint64 ({self.length},)"
            )
        if self.total is None:
            self.total = masked.copy()
        else:
            self.total += masked
        self.summed.add(node)

    # -- stage 4 ----------------------------------------------------------------------------

    def unmask_requests(self) -> dict[int, tuple[list[int], list[int]]]:
        """Each summed node: its (survived, dropped) neighbours among those that shared.

        Raises:
            SecAggAbort: fewer than t vectors were summed, or some survivor or dropout has fewer
                than t live share holders, so the sum could not be unmasked.
        """
        self._close_stage(self.summed, "unmask")
        t = self.threshold
        if len(self.summed) < t:
            raise SecAggAbort(
                f"{len(self.summed)} masked vectors arrived, fewer than the threshold t={t}"
            )
        for node in sorted(self.sharers):
            holders = (self.graph[node] & self.summed) | ({node} & self.summed)
            if len(holders) < t:
                what = "survivor" if node in self.summed else "dropped node"
                raise SecAggAbort(
                    f"{what} {node} has {len(holders)} live share holders, fewer than the "
                    f"threshold t={t}: its masks cannot be removed"
                )
        return {
            n: (
                sorted((self.graph[n] & self.summed) | {n}),
                sorted((self.graph[n] & self.sharers) - self.summed),
            )
            for n in sorted(self.summed)
        }

    def add_unmask(
        self, node: int, seed_shares: Mapping[int, bytes], key_shares: Mapping[int, bytes]
    ) -> list[str]:
        """Keep a node's shares; returns a note per missing or malformed share (also logged).

        Raises:
            SecAggError: the reply names a node it was not asked about, or reveals both
                secrets of one node.
        """
        survived = (self.graph[node] & self.summed) | {node}
        dropped = (self.graph[node] & self.sharers) - self.summed
        if set(seed_shares) - survived or set(key_shares) - dropped:
            raise SecAggError("the unmask reply has shares of nodes it was not asked about")
        notes = []
        for owner in sorted(survived):
            notes += self._keep(node, owner, seed_shares.get(owner), "seed")
        for owner in sorted(dropped):
            notes += self._keep(node, owner, key_shares.get(owner), "key")
        for note in notes:
            log.warning("round %d: secagg unmask: %s", self.server_round, note)
        self.unmasked.add(node)
        return notes

    def _keep(self, holder: int, owner: int, share: bytes | None, kind: str) -> list[str]:
        what = _WHAT[kind]
        if share is None:
            return [f"node {holder} sent no share of node {owner}'s {what}"]
        size = share_bytes(SEED_BYTES if kind == "seed" else SCALAR_BYTES)
        if len(share) != size:
            return [
                f"node {holder} sent a {len(share)}-byte share of node {owner}'s {what}, "
                f"expected {size}"
            ]
        store = self.seed_shares if kind == "seed" else self.key_shares
        store.setdefault(owner, {})[holder] = share
        return []

    def finish(self) -> F64:
        """Rebuild the secrets, remove every mask, return the dequantized sum (float64).

        Raises:
            SecAggAbort: a secret has fewer than t shares, or no t of them rebuild a secret
                that matches its commitment / public key.
        """
        self._close_stage(self.unmasked, "done")
        assert self.total is not None  # unmask_requests checked that vectors were summed
        total = self.total
        for owner in sorted(self.summed):
            seed = self._rebuild(owner, "seed", self.seed_shares.get(owner, {}))
            add_prg(total, self_mask_key(seed), -1)
        for owner in sorted(self.sharers - self.summed):
            scalar = self._rebuild(owner, "key", self.key_shares.get(owner, {}))
            mine = private_key(scalar)
            # each survivor j added sign·PRG(s_jd) with + when d > j: take it back out
            for other in sorted(self.graph[owner] & self.summed):
                key = pair_mask_key(mine, public_key(self.keys[other][1]))
                add_prg(total, key, -1 if owner > other else +1)
        self.total = None
        return self.quantizer.dequantize(total)

    def _rebuild(self, owner: int, kind: str, shares: Mapping[int, bytes]) -> bytes:
        """A secret from its shares, checked; a corrupted share is found and named."""
        what, t = _WHAT[kind], self.threshold
        if kind == "seed":
            commitment = self.commitments[owner]

            def ok(secret: bytes) -> bool:
                return seed_commitment(owner, self.server_round, secret) == commitment

        else:
            advertised = self.keys[owner][1]

            def ok(secret: bytes) -> bool:
                if len(secret) != SCALAR_BYTES:
                    return False
                try:
                    return public_bytes(private_key(secret).public_key()) == advertised
                except ValueError:
                    return False

        holders = sorted(shares)
        if len(holders) < t:
            raise SecAggAbort(
                f"node {owner}'s {what}: {len(holders)} shares arrived (from nodes {holders}), "
                f"fewer than the threshold t={t}"
            )
        secret = _combine([shares[h] for h in holders[:t]], ok)  # t shares fix the polynomial
        if secret is not None:
            self.rebuilt[kind].add(owner)
            return secret
        # some share is bad: find t that agree, then name every share that disagrees
        for subset in itertools.islice(itertools.combinations(holders, t), 1, 5000):
            secret = _combine([shares[h] for h in subset], ok)
            if secret is None:
                continue
            base = [shares[h] for h in subset[: t - 1]]
            bad = [
                h for h in holders if h not in subset and _combine([*base, shares[h]], ok) is None
            ]
            log.warning(
                "round %d: secagg unmask: node(s) %s sent a corrupted share of node %d's %s; "
                "rebuilt it from the others",
                self.server_round,
                bad,
                owner,
                what,
            )
            self.rebuilt[kind].add(owner)
            return secret
        raise SecAggAbort(
            f"node {owner}'s {what}: no {t} of the {len(holders)} shares from nodes {holders} "
            f"rebuild a secret that matches its {'commitment' if kind == 'seed' else 'public key'}"
            " (corrupted shares)"
        )

    def replied(self) -> list[int]:
        """Good replies per stage (setup, share, mask, unmask)."""
        return [len(self.keys), len(self.commitments), len(self.summed), len(self.unmasked)]

    def _prune(self, what: str) -> None:
        """Drop nodes that have fewer than t - 1 live neighbours (their secrets could not be
        rebuilt), repeatedly, since each drop shrinks its neighbours' counts."""
        t = self.threshold
        changed = True
        while changed:
            changed = False
            for node in sorted(self.alive):
                live = len(self.graph[node] & self.alive)
                if live + 1 < t:
                    self.drop(node, f"{live} of {what} left, fewer than t - 1 = {t - 1}")
                    changed = True
        if len(self.alive) < t:
            raise SecAggAbort(
                f"{len(self.alive)} clients left after the {self.stage} stage, fewer than the "
                f"threshold t={t} (dropped so far: "
                f"{ {s: d for s, d in self.dropped.items() if d} })"
            )


_WHAT = {"seed": "self-mask seed", "key": "mask key"}


def _combine(shares: list[bytes], ok: Callable[[bytes], bool]) -> bytes | None:
    try:
        secret = combine_shares(shares)
    except (ValueError, TypeError, IndexError):  # bad padding, repeated index
        return None
    return secret if ok(secret) else None


# Message fields of each stage, one builder per direction (the glue and the in-process
# driver both use them, so the driver counts the bytes the glue sends)


def setup_request(params: Params) -> dict[str, Any]:
    """Server → client, stage 1."""
    return params.to_record()


def keys_reply(pk_enc: bytes, pk_mask: bytes) -> dict[str, Any]:
    """Client → server, stage 1."""
    return {"pk-enc": pk_enc, "pk-mask": pk_mask}


def share_request(server_round: int, keys: Mapping[int, tuple[bytes, bytes]]) -> dict[str, Any]:
    """Server → client, stage 2: the neighbourhood's public keys."""
    return {
        "round": server_round,
        "key-ids": list(keys),
        "pk-enc": [k[0] for k in keys.values()],
        "pk-mask": [k[1] for k in keys.values()],
    }


def shares_reply(ciphertexts: Mapping[int, bytes], commitment: bytes) -> dict[str, Any]:
    """Client → server, stage 2."""
    return {
        "dst": list(ciphertexts),
        "ciphertexts": list(ciphertexts.values()),
        "commitment": commitment,
    }


def mask_request(
    server_round: int, ciphertexts: Mapping[int, bytes], layout: bytes
) -> dict[str, Any]:
    """Server → client, stage 3 (sent with the global state and train config)."""
    return {
        "round": server_round,
        "src": list(ciphertexts),
        "ciphertexts": list(ciphertexts.values()),
        "layout": layout,
    }


def unmask_request(server_round: int, survived: list[int], dropped: list[int]) -> dict[str, Any]:
    """Server → client, stage 4."""
    return {"round": server_round, "survived": survived, "dropped": dropped}


def unmask_reply(seeds: Mapping[int, bytes], keys: Mapping[int, bytes]) -> dict[str, Any]:
    """Client → server, stage 4."""
    return {
        "seed-owners": list(seeds),
        "seed-shares": list(seeds.values()),
        "key-owners": list(keys),
        "key-shares": list(keys.values()),
    }


def fields_bytes(fields: Mapping[str, Any]) -> int:
    """Payload bytes of record fields: bytes and strings by length, 8 per number."""
    total = 0
    for value in fields.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bytes):
                total += len(item)
            elif isinstance(item, str):
                total += len(item.encode())
            else:
                total += 8
    return total


@dataclass
class LocalRound:
    """What :func:`aggregate_locally` returns: the sum and everything the server saw."""

    total: F64
    server: SecAggServer
    masked: dict[int, U64]
    """Each node's masked vector as the server received it."""
    client_seconds: dict[str, dict[int, float]]
    """Stage → node → that client's compute time in the stage."""
    server_seconds: dict[str, float]
    """Stage → the server's compute time (for "unmask", rebuilding and unmasking the sum)."""
    bytes_down: dict[str, int]
    """Stage → protocol payload bytes sent to clients (without the mask stage's global state)."""
    bytes_up: dict[str, int]
    """Stage → payload bytes clients sent (the mask stage: the masked vectors)."""


def aggregate_locally(
    vectors: Mapping[int, F32],
    cfg: SecAggConfig,
    server_round: int = 1,
    drop: Mapping[int, str] | None = None,
    rng: random.Random | None = None,
) -> LocalRound:
    """Run every stage in one process, without Flower messaging (tests and benchmarks).

    ``vectors`` maps node ids to flattened encodings; ``drop[node] = stage`` makes that node
    vanish instead of replying in that stage ("setup", "share", "mask" or "unmask"). Client and
    server work are timed apart, and message fields are counted as the glue would send them.
    """
    drop = drop or {}
    length = next(iter(vectors.values())).shape[0]
    extra = {} if rng is None else {"rng": rng}
    clock = time.perf_counter
    t0 = clock()
    server = SecAggServer(sorted(vectors), cfg, server_round, length, **extra)
    clients: dict[int, SecAggClient] = {}
    masked: dict[int, U64] = {}
    client_s: dict[str, dict[int, float]] = {stage: {} for stage in STAGES}
    server_s = {stage: 0.0 for stage in STAGES}
    down = dict.fromkeys(STAGES, 0)
    up = dict.fromkeys(STAGES, 0)

    def serve(stage: str, started: float) -> None:
        server_s[stage] += clock() - started

    def answering(stage: str, requests: Mapping[int, dict[str, Any]]) -> list[int]:
        down[stage] += sum(fields_bytes(f) for f in requests.values())
        return [n for n in requests if drop.get(n) != stage]

    requests = {n: setup_request(p) for n, p in server.setup_requests().items()}
    serve("setup", t0)
    for node in answering("setup", requests):
        t = clock()
        clients[node], public = SecAggClient.setup(node, server.params)
        client_s["setup"][node] = clock() - t
        up["setup"] += fields_bytes(keys_reply(*public))
        t = clock()
        server.add_keys(node, *public)
        serve("setup", t)

    t = clock()
    keys_by_node = server.share_requests()
    serve("share", t)
    requests = {n: share_request(server_round, k) for n, k in keys_by_node.items()}
    for node in answering("share", requests):
        t = clock()
        ciphertexts, commitment = clients[node].share(keys_by_node[node])
        client_s["share"][node] = clock() - t
        up["share"] += fields_bytes(shares_reply(ciphertexts, commitment))
        t = clock()
        server.add_shares(node, ciphertexts, commitment)
        serve("share", t)

    t = clock()
    routed = server.mask_requests()
    serve("mask", t)
    requests = {n: mask_request(server_round, c, bytes(32)) for n, c in routed.items()}
    for node in answering("mask", requests):
        t = clock()
        clients[node].receive(routed[node])
        masked[node], _ = clients[node].mask(vectors[node])
        client_s["mask"][node] = clock() - t
        up["mask"] += masked[node].nbytes
        t = clock()
        server.add_masked(node, masked[node])
        serve("mask", t)

    t = clock()
    asks = server.unmask_requests()
    serve("unmask", t)
    requests = {n: unmask_request(server_round, *a) for n, a in asks.items()}
    for node in answering("unmask", requests):
        t = clock()
        seeds, keys = clients[node].unmask(*asks[node])
        client_s["unmask"][node] = clock() - t
        up["unmask"] += fields_bytes(unmask_reply(seeds, keys))
        t = clock()
        server.add_unmask(node, seeds, keys)
        serve("unmask", t)
    t = clock()
    total = server.finish()
    serve("unmask", t)
    return LocalRound(total, server, masked, client_s, server_s, down, up)


# --------------------------------------------------------------------------------------------
# Encodings <-> one vector
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How an encoding is flattened: its keys in sorted order with their shapes."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]]) -> Layout:
        """The layout of encodings with these key shapes."""
        return cls(tuple((k, tuple(int(d) for d in shapes[k])) for k in sorted(shapes)))

    @property
    def size(self) -> int:
        """Elements of the flattened vector."""
        return sum(math.prod(shape) for _, shape in self.shapes)

    def digest(self) -> bytes:
        """SHA-256 of the layout, so client and server can check they flatten alike."""
        return hashlib.sha256(repr(self.shapes).encode()).digest()

    def flatten(self, arrays: Mapping[str, npt.NDArray[Any]]) -> F32:
        """Concatenate the encoding's arrays in sorted key order, as float32 (size,)."""
        return np.concatenate(
            [np.asarray(arrays[k], dtype=np.float32).reshape(-1) for k, _ in self.shapes]
        )

    def unflatten(self, vector: F64) -> AdapterState:
        """Inverse of :meth:`flatten` (float32 tensors)."""
        import torch

        out: AdapterState = {}
        start = 0
        for key, shape in self.shapes:
            stop = start + math.prod(shape)
            out[key] = torch.from_numpy(vector[start:stop].astype(np.float32).reshape(shape))
            start = stop
        return out


# --------------------------------------------------------------------------------------------
# Flower glue: client
# --------------------------------------------------------------------------------------------


def _request(msg: Message) -> ConfigRecord:
    rec = msg.content.config_records.get(SECAGG)
    if rec is None:
        raise SecAggError(f"the message has no ConfigRecord {SECAGG!r}")
    return rec


def _reply(msg: Message, fields: dict[str, Any]) -> Message:
    return Message(RecordDict({SECAGG: ConfigRecord(fields)}), reply_to=msg)


def _load(context: Context) -> SecAggClient:
    rec = context.state.config_records.get(STATE)
    if rec is None:
        raise SecAggError("no secure-aggregation round in progress on this node (no setup)")
    return SecAggClient.from_record(rec)


def _store(context: Context, client: SecAggClient) -> None:
    context.state.config_records[STATE] = client.to_record()


def _round_of(client: SecAggClient, rec: Mapping[str, Any]) -> None:
    server_round = _field(rec, "round", int)
    if server_round != client.params.server_round:
        raise SecAggError(
            f"node {client.node}: request for round {server_round}, but its secure-aggregation "
            f"state is for round {client.params.server_round}"
        )


def client_setup(msg: Message, context: Context) -> Message:
    """Stage 1 on a client: fresh keys for the round (any earlier round's state is replaced)."""
    params = Params.from_record(_request(msg))
    client, (pk_enc, pk_mask) = SecAggClient.setup(msg.metadata.dst_node_id, params)
    _store(context, client)
    return _reply(msg, keys_reply(pk_enc, pk_mask))


def client_share(msg: Message, context: Context) -> Message:
    """Stage 2 on a client: encrypted shares for each neighbour."""
    rec = _request(msg)
    client = _load(context)
    _round_of(client, rec)
    enc, mask = _pairs(rec, "key-ids", "pk-enc"), _pairs(rec, "key-ids", "pk-mask")
    ciphertexts, commitment = client.share({n: (enc[n], mask[n]) for n in enc})
    _store(context, client)
    return _reply(msg, shares_reply(ciphertexts, commitment))


def client_mask(msg: Message, context: Context, train: Callable[[], Message]) -> Message:
    """Stage 3 on a client: check the routed shares, run the plain train handler, mask its
    encoding.

    ``train()`` is the ClientApp's ordinary train handler on this message (which carries the
    global state and train config as a plain train message does), so secure aggregation trains
    exactly as the plain path; like Flower's ``secaggplus_mod``, this only wraps it. The reply
    carries the masked vector and the plain reply's metrics (with the number of clipped
    values), never the encoding itself.
    """
    from fedllama.flower import ARRAYS, METRICS

    rec = _request(msg)
    client = _load(context)
    _round_of(client, rec)
    client.receive(_pairs(rec, "src", "ciphertexts"))  # fail before training, not after
    plain = train()
    if plain.has_error():
        return plain
    arrays = plain.content.array_records[ARRAYS]
    layout = Layout.of({k: tuple(a.shape) for k, a in arrays.items()})
    if layout.digest() != _field(rec, "layout", bytes):
        raise SecAggError(
            f"node {client.node}: its encoding's keys/shapes differ from the server's "
            f"({len(layout.shapes)} keys, {layout.size} values)"
        )
    masked, clipped = client.mask(layout.flatten({k: a.numpy() for k, a in arrays.items()}))
    _store(context, client)
    if clipped:
        log.warning(
            "node %d: %d encoded values clipped to ±%g (secagg.clip_range)",
            client.node,
            clipped,
            client.params.clip_range,
        )
    metrics = MetricRecord({**plain.content.metric_records[METRICS], CLIPPED: clipped})
    content = RecordDict({MASKED: ArrayRecord({MASKED: Array(masked)}), METRICS: metrics})
    return Message(content, reply_to=msg)


def client_unmask(msg: Message, context: Context) -> Message:
    """Stage 4 on a client: the shares the server asked for; the round's state is then erased."""
    rec = _request(msg)
    client = _load(context)
    _round_of(client, rec)
    try:
        seeds, keys = client.unmask(_ids(rec, "survived"), _ids(rec, "dropped"))
    finally:
        del context.state.config_records[STATE]  # answered or refused: never asked twice
    return _reply(msg, unmask_reply(seeds, keys))


# --------------------------------------------------------------------------------------------
# Flower glue: server
# --------------------------------------------------------------------------------------------


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (arrays, bytes, strings; 8 per number)."""
    from fedllama.flower import record_bytes

    total = sum(record_bytes(r) for r in content.array_records.values())
    total += sum(fields_bytes(r) for r in content.config_records.values())
    return total + sum(fields_bytes(r) for r in content.metric_records.values())


@dataclass
class StageStats:
    """What one protocol stage cost: nodes asked/answered, bytes each way, seconds."""

    sent: int = 0
    ok: int = 0
    dropped: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0


def _exchange(
    grid: Grid,
    server: SecAggServer,
    requests: Mapping[int, RecordDict],
    stage: str,
    timeout: float,
    stats: StageStats,
) -> Iterator[tuple[int, Message]]:
    """Send one stage's requests; yield (node, reply) for good replies as they arrive.

    Error replies drop their node (logged with the reason); nodes that do not reply in time are
    dropped when the server closes the stage.
    """
    from fedllama.flower import stream_replies

    t0 = time.perf_counter()
    messages = [
        Message(
            content=content,
            dst_node_id=node,
            message_type=f"train.{ACTIONS[stage]}",
            group_id=str(server.server_round),
        )
        for node, content in requests.items()
    ]
    stats.sent = len(messages)
    stats.bytes_down = sum(content_bytes(m.content) for m in messages)
    setting = "server.timeout_s" if stage == "mask" else "secagg.timeout_s"  # training waits longer
    for reply in stream_replies(grid, messages, timeout, setting=setting):
        node = reply.metadata.src_node_id
        if node not in server.alive:
            continue
        if reply.has_error():
            server.drop(node, f"error reply: {reply.error.reason}")
            continue
        stats.bytes_up += content_bytes(reply.content)
        yield node, reply
    stats.seconds = time.perf_counter() - t0


def run_round(
    grid: Grid,
    strategy: FedLlamaStrategy,
    train_messages: Sequence[Message],
    cfg: SecAggConfig,
    server_round: int,
    train_timeout: float,
) -> tuple[RoundReport, dict[str, Any]]:
    """One round under SecAgg+: the four stages, then ``strategy.merge.decode`` of the sum.

    ``train_messages`` are the round's plain train messages (``strategy.configure_train``):
    their nodes are the sample and their content (global state, config) goes out in the mask
    stage. Returns the round report (``delta`` set) and the secagg figures for the metrics row.

    Raises:
        SecAggAbort: too few clients or shares to finish securely; nothing was aggregated.
    """
    from fedllama.flower import ARRAYS, CONFIG, ReplyError, RoundReport, record_bytes
    from fedllama.merge import MergeError

    merge = strategy.merge
    if not merge.summable:
        raise SecAggAbort(f"strategy {merge.name} is not summable; secure aggregation needs a sum")
    layout = Layout.of(strategy.spec.shapes)
    nodes = [m.metadata.dst_node_id for m in train_messages]
    server = SecAggServer(nodes, cfg, server_round, layout.size)
    stats = {stage: StageStats() for stage in STAGES}
    report = RoundReport()
    log.info(
        "round %d: secure aggregation over %d clients: %d neighbours each, threshold %d of %d "
        "shares, %d-bit fixed point (step %.3g, clip ±%g)",
        server_round,
        len(nodes),
        server.k,
        server.threshold,
        server.k + 1,
        cfg.quantization_bits,
        server.quantizer.step,
        cfg.clip_range,
    )

    def ask(
        stage: str, requests: Mapping[int, dict[str, Any]], timeout: float
    ) -> Iterator[tuple[int, ConfigRecord]]:
        contents = {n: RecordDict({SECAGG: ConfigRecord(f)}) for n, f in requests.items()}
        for node, reply in _exchange(grid, server, contents, stage, timeout, stats[stage]):
            rec = reply.content.config_records.get(SECAGG)
            if rec is None:
                server.drop(node, f"reply has no ConfigRecord {SECAGG!r}")
                continue
            yield node, rec

    # stage 1: advertise keys
    setup = {n: setup_request(p) for n, p in server.setup_requests().items()}
    for node, rec in ask("setup", setup, cfg.timeout_s):
        try:
            server.add_keys(node, _field(rec, "pk-enc", bytes), _field(rec, "pk-mask", bytes))
        except SecAggError as err:
            server.drop(node, str(err))

    # stage 2: share keys
    share = {n: share_request(server_round, k) for n, k in server.share_requests().items()}
    for node, rec in ask("share", share, cfg.timeout_s):
        try:
            ciphertexts = _pairs(rec, "dst", "ciphertexts")
            server.add_shares(node, ciphertexts, _field(rec, "commitment", bytes))
        except SecAggError as err:
            server.drop(node, str(err))

    # stage 3: train and collect masked vectors (summed as they arrive)
    routed = server.mask_requests()
    by_node = {m.metadata.dst_node_id: m for m in train_messages}
    contents = {}
    for node, ciphertexts in routed.items():
        plain = by_node[node].content
        contents[node] = RecordDict(
            {
                ARRAYS: plain.array_records[ARRAYS],
                CONFIG: plain.config_records[CONFIG],
                SECAGG: ConfigRecord(mask_request(server_round, ciphertexts, layout.digest())),
            }
        )
    report.bytes_down = sum(record_bytes(c.array_records[ARRAYS]) for c in contents.values())
    weighted_loss = weight = 0.0
    clipped = 0
    for node, reply in _exchange(grid, server, contents, "mask", train_timeout, stats["mask"]):
        try:
            masked, metrics, num_examples, train_loss = _check_masked(reply.content, layout.size)
            server.add_masked(node, masked)
        except (SecAggError, ReplyError) as err:
            server.drop(node, str(err))
            continue
        weighted_loss += num_examples * train_loss
        weight += num_examples
        report.ok += 1
        report.bytes_up += record_bytes(reply.content.array_records[MASKED])
        clipped += int(metrics.get(CLIPPED, 0))
        if metrics.get(CLIPPED):
            log.warning(
                "round %d: node %d clipped %d encoded values to ±%g: raise secagg.clip_range",
                server_round,
                node,
                metrics[CLIPPED],
                cfg.clip_range,
            )
        summary = {"node": node, **metrics}
        report.clients.append(summary)
        if strategy.on_reply is not None:
            strategy.on_reply(summary)

    # stage 4: unmask
    unmask = {n: unmask_request(server_round, *a) for n, a in server.unmask_requests().items()}
    for node, rec in ask("unmask", unmask, cfg.timeout_s):
        try:
            server.add_unmask(
                node,
                _pairs(rec, "seed-owners", "seed-shares"),
                _pairs(rec, "key-owners", "key-shares"),
            )
        except SecAggError as err:
            server.drop(node, f"shares ignored: {err}")
    summed = layout.unflatten(server.finish())

    report.dropped = len(nodes) - report.ok
    report.train_loss = weighted_loss / weight
    try:
        report.delta = merge.decode(summed, strategy.global_state)
    except MergeError as err:
        raise SecAggAbort(f"the unmasked sum cannot be decoded: {err}") from None
    figures: dict[str, Any] = {
        "clients": len(nodes),
        "neighbours": server.k,
        "threshold": server.threshold,
        "clipped": clipped,
        "unmasked_dropouts": len(server.sharers - server.summed),
        "stages": {
            stage: {
                "sent": s.sent,
                "ok": ok,
                "dropped": len(server.dropped[stage]),
                "bytes_down": s.bytes_down,
                "bytes_up": s.bytes_up,
                "seconds": round(s.seconds, 3),
            }
            for (stage, s), ok in zip(stats.items(), server.replied(), strict=True)
        },
    }
    report.bytes_up = sum(s.bytes_up for s in stats.values())
    report.bytes_down = sum(s.bytes_down for s in stats.values())
    return report, figures


def _check_masked(content: RecordDict, length: int) -> tuple[U64, dict[str, Any], float, float]:
    """A mask-stage reply's masked vector and metrics (raises ReplyError/SecAggError)."""
    from fedllama.flower import METRICS, check_metrics

    arrays = content.array_records.get(MASKED)
    if arrays is None or set(arrays) != {MASKED}:
        raise SecAggError(f"no ArrayRecord {MASKED!r} holding one array {MASKED!r}")
    array = arrays[MASKED]
    if array.dtype != "uint64" or tuple(array.shape) != (length,):
        raise SecAggError(
            f"masked vector is {array.dtype} {tuple(array.shape)}, expected uint64 ({length},)"
        )
    try:
        masked = np.asarray(array.numpy())
    except Exception as err:  # a corrupt payload fails inside numpy's loader
        raise SecAggError(f"masked vector cannot be decoded ({err})") from None
    metrics = content.metric_records.get(METRICS)
    num_examples, train_loss = check_metrics(metrics)
    assert metrics is not None  # check_metrics raised otherwise
    clipped = metrics.get(CLIPPED)
    if not isinstance(clipped, int) or clipped < 0:
        raise SecAggError(f"metric {CLIPPED!r} is {clipped!r}, expected a count")
    return masked.astype(np.uint64, copy=False), dict(metrics), num_examples, train_loss


__all__ = [
    "ACTIONS",
    "Layout",
    "Params",
    "Quantizer",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "add_prg",
    "client_mask",
    "client_setup",
    "client_share",
    "client_unmask",
    "harary_graph",
    "neighbour_count",
    "prg",
    "run_round",
    "threshold_count",
]
