"""SecAgg+ message fields: one builder per stage and direction, and their parsers.

The field names are a wire format: deployed SuperNodes depend on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedllama.privacy.secagg.params import Params

if TYPE_CHECKING:
    pass


SECAGG = "secagg"
"""ConfigRecord key of the protocol fields, in both directions."""


MASKED = "masked"
"""ArrayRecord (and its one array) carrying a client's masked vector."""


BAD_SHARES = "bad-shares-from"
"""Mask-stage reply field (instead of a masked vector): the senders whose shares to this node
did not authenticate."""


CLIPPED = "secagg-clipped"
"""Metric: how many of the client's encoded values were clipped to ±clip_range."""


STATE = "fedllama.secagg"
"""``context.state`` ConfigRecord holding a client's secrets for the current round."""


STAGES = ("setup", "share", "mask", "unmask")
ACTIONS = {stage: f"secagg_{stage}" for stage in STAGES}
"""ClientApp actions: ``train.secagg_setup`` messages go to ``@app.train("secagg_setup")``."""


def setup_request(params: Params) -> dict[str, Any]:
    """Server → client, stage 1."""
    return params.to_record()


def keys_reply(
    pk_enc: bytes, pk_mask: bytes, signature: bytes = b"", signer: bytes = b""
) -> dict[str, Any]:
    """Client → server, stage 1: the round's public keys, signed when the node has a signing
    key (``identity.sign``; empty otherwise)."""
    return {"pk-enc": pk_enc, "pk-mask": pk_mask, "signature": signature, "signer": signer}


def share_request(
    server_round: int,
    keys: Mapping[int, tuple[bytes, bytes]],
    signed: Mapping[int, tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    """Server → client, stage 2: the neighbourhood's public keys and each one's (signature,
    signer), for nodes that verify them against a roster."""
    signed = signed or {}
    return {
        "round": server_round,
        "key-ids": list(keys),
        "pk-enc": [k[0] for k in keys.values()],
        "pk-mask": [k[1] for k in keys.values()],
        "signature": [signed.get(n, (b"", b""))[0] for n in keys],
        "signer": [signed.get(n, (b"", b""))[1] for n in keys],
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
