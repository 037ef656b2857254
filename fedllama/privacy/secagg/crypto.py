"""SecAgg+ key material: SECP384R1 keys, HKDF, the AES-CTR mask PRG and seed commitments.

Nothing here is invented: ECDH and HKDF-SHA256 come from ``cryptography``, Shamir and the
share encryption (ECDH + HKDF -> Fernet) from Flower's ``flwr.common.secure_aggregation``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    generate_shared_key,
)

from fedllama.privacy.secagg.params import CHUNK, U64, SecAggError

if TYPE_CHECKING:
    pass


CURVE = ec.SECP384R1()


SEED_BYTES = 32


SCALAR_BYTES = 48  # a SECP384R1 private scalar


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


def new_private_key() -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
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


def fernet_key(private_scalar: bytes, public: bytes) -> bytes:
    # Flower's helper: ECDH + HKDF-SHA256 → urlsafe-base64 Fernet key
    return generate_shared_key(private_key(private_scalar), public_key(public))


def seed_commitment(node: int, server_round: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, bound to its node and round.

    The server checks a rebuilt seed against it, which finds corrupted shares. The seed is 256
    uniform bits, so its hash reveals nothing useful about it.
    """
    tag = b"fedllama secagg seed" + node.to_bytes(8, "little") + server_round.to_bytes(8, "little")
    return hashlib.sha256(tag + seed).digest()


def share_bytes(secret_bytes: int) -> int:
    """Length of one of Flower's Shamir shares of a ``secret_bytes`` secret (index + chunks)."""
    return 4 + 16 * (secret_bytes // 16 + 1)  # PKCS#7 always adds padding
