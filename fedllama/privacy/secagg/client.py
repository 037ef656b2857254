"""One client's side of a SecAgg+ round, as plain data in and out (no Flower messages)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedllama.privacy.secagg.crypto import (
    SEED_BYTES,
    add_prg,
    fernet_key,
    new_private_key,
    pair_mask_key,
    private_key,
    public_key,
    seed_commitment,
    self_mask_key,
)
from fedllama.privacy.secagg.params import F32, U64, Params, SecAggError, get_field, get_pairs

if TYPE_CHECKING:
    pass


class BadShares(SecAggError):
    """Shares from these senders do not authenticate or are mislabelled: the recipient names
    them to the server instead of masking (it cannot hold their secrets)."""

    def __init__(self, node: int, senders: Sequence[int]) -> None:
        super().__init__(
            f"node {node}: the share ciphertexts from nodes {list(senders)} do not authenticate "
            "or are mislabelled (corrupted by the sender or in transit)"
        )
        self.senders = list(senders)


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
        _, enc_scalar, enc_public = new_private_key()
        _, mask_scalar, mask_public = new_private_key()
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
            out[dst] = encrypt(fernet_key(self.enc_key, keys[dst][0]), plaintext)
        self.stage = "share"
        return out, seed_commitment(self.node, self.params.server_round, self.seed)

    # -- stage 3: masked input --------------------------------------------------------------

    def receive(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Decrypt and keep the shares neighbours sent; done before training, to fail fast.

        Raises:
            BadShares: ciphertexts that do not authenticate (corrupted, or not encrypted for
                this node) or that name another sender or recipient, naming their senders.
            SecAggError: a ciphertext from a non-neighbour, or fewer than t share holders.
        """
        self._expect("share", "mask")
        if len(ciphertexts) + 1 < self.params.threshold:
            raise SecAggError(
                f"node {self.node}: shares from {len(ciphertexts)} neighbours, fewer than the "
                f"threshold {self.params.threshold} - 1"
            )
        bad = []
        for src, ciphertext in sorted(ciphertexts.items()):
            if src == self.node or src not in self.keys:
                raise SecAggError(f"node {self.node}: a share from node {src}, not a neighbour")
            try:
                plaintext = decrypt(fernet_key(self.enc_key, self.keys[src][0]), ciphertext)
                actual_src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
            except (InvalidToken, InvalidTag, ValueError):
                bad.append(src)
                continue
            if actual_src != src or dst != self.node:
                bad.append(src)
                continue
            self.seed_shares[src], self.key_shares[src] = seed_share, key_share
        if bad:
            raise BadShares(self.node, bad)

    def mask(self, vector: F32, rng: np.random.Generator | None = None) -> tuple[U64, int]:
        """Quantize ``vector`` and add PRG(b) and ±PRG(s_ij) for each share sender j, mod 2^64.

        The sign is + when j's node id is larger, − when smaller, so each pair cancels in the
        sum. Call :meth:`receive` first. Returns (masked vector, values clipped).
        """
        self._expect("share", "mask")
        q, clipped = self.params.quantizer.quantize(vector, rng)
        return self.mask_integers(q), clipped

    def mask_integers(self, q: U64) -> U64:
        """As :meth:`mask` for a vector the client already encoded as integers modulo 2^64
        (distributed DP noise); ``q`` is masked in place and returned."""
        self._expect("share", "mask")
        add_prg(q, self_mask_key(self.seed), +1)
        mine = private_key(self.mask_key)
        for other in sorted(set(self.seed_shares) - {self.node}):
            key = pair_mask_key(mine, public_key(self.keys[other][1]))
            add_prg(q, key, +1 if other > self.node else -1)
        self.enc_key = self.mask_key = self.seed = b""  # no longer needed
        self.stage = "mask"
        return q

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

    def to_record(self) -> dict[str, Any]:
        """The state as ConfigRecord fields (for ``context.state``)."""
        ids = list(self.keys)
        return {
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

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> SecAggClient:
        """Inverse of :meth:`to_record`."""
        enc, mask = get_pairs(rec, "key-ids", "pk-enc"), get_pairs(rec, "key-ids", "pk-mask")
        return cls(
            node=get_field(rec, "node", int),
            params=Params.from_record(rec),
            stage=get_field(rec, "stage", str),
            enc_key=get_field(rec, "enc-key", bytes),
            mask_key=get_field(rec, "mask-key", bytes),
            seed=get_field(rec, "seed", bytes),
            keys={n: (enc[n], mask[n]) for n in enc},
            seed_shares=get_pairs(rec, "seed-owners", "seed-shares"),
            key_shares=get_pairs(rec, "key-owners", "key-shares"),
        )
