"""The server's side of a SecAgg+ round, as plain data in and out (no Flower messages)."""

from __future__ import annotations

import itertools
import logging
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from fedllama.config import SecAggConfig
from fedllama.privacy.secagg.crypto import (
    SCALAR_BYTES,
    SEED_BYTES,
    add_prg,
    pair_mask_key,
    private_key,
    public_bytes,
    public_key,
    seed_commitment,
    self_mask_key,
    share_bytes,
)
from fedllama.privacy.secagg.messages import STAGES
from fedllama.privacy.secagg.params import (
    F64,
    U64,
    Params,
    Quantizer,
    SecAggAbort,
    SecAggError,
    harary_graph,
    neighbour_count,
    threshold_count,
)

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)


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
    names: Mapping[int, int] = field(default_factory=dict)
    """Node -> client id, to name nodes in log lines (a label only)."""

    def __post_init__(self) -> None:
        n = len(self.nodes)
        self.quantizer = Quantizer(
            self.cfg.clip_range, self.cfg.quantization_bits, self.cfg.modulus_bits
        )
        if n < 2:
            raise SecAggAbort(f"secure aggregation needs at least 2 clients in a round, got {n}")
        if n > self.cfg.max_clients:
            raise SecAggAbort(
                f"{n} clients could overflow the {self.cfg.modulus_bits}-bit sum at "
                f"secagg.quantization_bits={self.cfg.quantization_bits} (at most "
                f"{self.cfg.max_clients})"
            )
        self.k = neighbour_count(n, self.cfg.num_neighbours)
        self.threshold = threshold_count(self.cfg.threshold, self.k + 1)
        self.graph = harary_graph(self.nodes, self.k, self.rng)
        self.alive: set[int] = set(self.nodes)
        self.dropped: dict[str, list[int]] = {stage: [] for stage in STAGES}
        self.reasons: dict[int, str] = {}
        """Why each dropped node was dropped."""
        self.pruned: set[int] = set()
        """Nodes dropped for others' absence (too few live neighbours), not for their own."""
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
            self.cfg.modulus_bits,
        )

    def drop(self, node: int, reason: str) -> None:
        """Take ``node`` out of the round at the current stage (logged with the reason)."""
        if node in self.alive:
            self.alive.discard(node)
            self.dropped[self.stage].append(node)
            self.reasons[node] = reason
            name = f" (client {self.names[node]})" if node in self.names else ""
            log.warning(
                "round %d: secagg %s: dropped node %d%s: %s",
                self.server_round,
                self.stage,
                node,
                name,
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
        """Add a node's masked vector (off the wire: :func:`from_wire`) to the running sum
        (mod 2^64; read modulo 2^m at the end)."""
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
        return self.quantizer.dequantize(self.finish_integers())

    def finish_integers(self) -> U64:
        """As :meth:`finish`, but the unmasked sum of the clients' integers, modulo 2^64 (for
        vectors the clients encoded themselves, e.g. with distributed DP noise)."""
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
        return total

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
                    self.pruned.add(node)
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
