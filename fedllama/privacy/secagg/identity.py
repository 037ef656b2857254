"""Signed SecAgg+ public keys: each node signs its round keys with its SuperNode key.

SecAgg+ (Bell et al., CCS 2020) as run against a semi-honest server lets a server that
substitutes public keys read the shares meant for a node (the man-in-the-middle gap the
protocol's malicious-server variant closes with a PKI: Bonawitz et al., CCS 2017, §6, where
every client signs its stage-1 keys with a long-term key that the others verify). Here the
long-term key is the node's registered SuperNode authentication key (a SECP384R1 key in
OpenSSH format, ``fedllama credentials``), and the PKI is a *roster*: the federation's
SuperNode public keys, one OpenSSH line each (the ``.pub`` files the coordinator registers),
handed to every institution out of band.

The signed statement binds the round, the node id and both public keys, so a node that
replays another's keys (and signature) is caught: the statement it carries names the other
node. ECDSA over SHA-384 comes from ``cryptography``; nothing here is invented.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedllama.privacy.secagg.params import SecAggError

DOMAIN = b"fedllama secagg+ round keys v1"
"""Prefix of every signed statement, so a signature cannot be reused for anything else."""

SIGNATURE = ec.ECDSA(hashes.SHA384())


class IdentityError(SecAggError):
    """A signing key or roster cannot be read, or a node's keys are not signed by the roster."""


def statement(server_round: int, node: int, pk_enc: bytes, pk_mask: bytes) -> bytes:
    """What a node signs: the domain, the round, its node id and its two public keys."""
    parts = [DOMAIN, struct.pack(">QQ", server_round, node)]
    for key in (pk_enc, pk_mask):
        parts += [struct.pack(">I", len(key)), key]
    return b"".join(parts)


def public_line(key: ec.EllipticCurvePublicKey) -> bytes:
    """The key as the OpenSSH ``type base64`` pair (no comment): how rosters are compared."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def load_signing_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A SuperNode private key (OpenSSH or PEM PKCS#8, unencrypted, elliptic curve).

    Raises:
        IdentityError: the file is missing, unreadable, encrypted or not an EC key.
    """
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as err:
        raise IdentityError(f"secagg signing key {p}: {err.strerror or err}") from None
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise IdentityError(f"secagg signing key {p}: not an unencrypted key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"secagg signing key {p}: expected an elliptic-curve key")
    return key


def load_roster(path: str | Path) -> frozenset[bytes]:
    """The federation's SuperNode public keys: one OpenSSH public key per line (comments after
    the key, ``#`` lines and blank lines ignored).

    Raises:
        IdentityError: the file is missing or empty, or a line is not an EC public key (named
            by its line number).
    """
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise IdentityError(f"secagg roster {p}: cannot be read ({err})") from None
    keys = set()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        try:
            key = serialization.load_ssh_public_key(" ".join(fields[:2]).encode())
        except (ValueError, TypeError, IndexError) as err:
            raise IdentityError(
                f"secagg roster {p}:{number}: not an OpenSSH public key ({err})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise IdentityError(f"secagg roster {p}:{number}: expected an elliptic-curve key")
        keys.add(public_line(key))
    if not keys:
        raise IdentityError(f"secagg roster {p}: no public keys")
    return frozenset(keys)


def sign(
    key: ec.EllipticCurvePrivateKey, server_round: int, node: int, pk_enc: bytes, pk_mask: bytes
) -> tuple[bytes, bytes]:
    """(signature, signer's OpenSSH public key) over :func:`statement`."""
    signature = key.sign(statement(server_round, node, pk_enc, pk_mask), SIGNATURE)
    return signature, public_line(key.public_key())


def verify(
    roster: frozenset[bytes],
    server_round: int,
    node: int,
    keys: tuple[bytes, bytes],
    signature: bytes,
    signer: bytes,
) -> None:
    """Node ``node``'s round keys carry a valid signature by a roster key.

    Raises:
        IdentityError: unsigned, a signer outside the roster, or a signature that does not
            match (keys replayed from another node or round, or altered in transit).
    """
    if not signature or not signer:
        raise IdentityError(f"node {node}'s keys are not signed (a roster is in force)")
    if signer not in roster:
        raise IdentityError(f"node {node}'s keys are signed by a key that is not in the roster")
    try:
        public = serialization.load_ssh_public_key(signer)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, statement(server_round, node, *keys), SIGNATURE)
    except (InvalidSignature, ValueError, AssertionError):
        raise IdentityError(
            f"node {node}'s signature does not match its round-{server_round} keys and node "
            "id (keys replayed from another node or round, or altered in transit)"
        ) from None


def check_signers(signers: Mapping[int, bytes]) -> None:
    """No roster key signs for two nodes in one round (one institution, one voice).

    Raises:
        IdentityError: naming the nodes that share a signer.
    """
    seen: dict[bytes, int] = {}
    for node, signer in sorted(signers.items()):
        if signer in seen:
            raise IdentityError(
                f"nodes {seen[signer]} and {node} present the same signing key in one round"
            )
        seen[signer] = node
