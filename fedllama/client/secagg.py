"""Flower glue for the client's SecAgg+ stages: messages <-> :class:`SecAggClient` calls.

The round's secrets live in ``context.state`` between messages (in a deployment every message
starts a fresh ClientApp process; the SuperNode keeps the context on the node).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from fedllama.privacy.dp import distributed
from fedllama.privacy.dp.distributed import I64, DdgParams, DistributedNoiseError
from fedllama.privacy.secagg import identity
from fedllama.privacy.secagg.client import BadShares, SecAggClient
from fedllama.privacy.secagg.messages import (
    BAD_SHARES,
    CLIPPED,
    MASKED,
    SECAGG,
    STATE,
    keys_reply,
    shares_reply,
    unmask_reply,
)
from fedllama.privacy.secagg.params import (
    U64,
    Params,
    SecAggError,
    get_field,
    get_ids,
    get_pairs,
    to_wire,
)
from fedllama.wire.layout import Layout

if TYPE_CHECKING:
    from fedllama.client.settings import NodeSettings

log = logging.getLogger(__name__)


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
    context.state.config_records[STATE] = ConfigRecord(client.to_record())


def _round_of(client: SecAggClient, rec: Mapping[str, Any]) -> None:
    server_round = get_field(rec, "round", int)
    if server_round != client.params.server_round:
        raise SecAggError(
            f"node {client.node}: request for round {server_round}, but its secure-aggregation "
            f"state is for round {client.params.server_round}"
        )


def _node(context: Context) -> NodeSettings:
    """This node's settings (imported here: ``fedllama.client.settings`` pulls in transformers,
    which must not load when the ClientApp module is imported, before ``stay_offline``)."""
    from fedllama.client.settings import NodeSettings

    return NodeSettings.from_node_config(dict(context.node_config))


def client_setup(msg: Message, context: Context) -> Message:
    """Stage 1 on a client: fresh keys for the round (any earlier round's state is replaced),
    signed with the node's ``secagg-signing-key`` when its node config names one."""
    params = Params.from_record(_request(msg))
    node = msg.metadata.dst_node_id
    client, (pk_enc, pk_mask) = SecAggClient.setup(node, params)
    _store(context, client)
    path = _node(context).secagg_signing_key
    if not path:
        return _reply(msg, keys_reply(pk_enc, pk_mask))
    key = identity.load_signing_key(path)
    signature, signer = identity.sign(key, params.server_round, node, pk_enc, pk_mask)
    return _reply(msg, keys_reply(pk_enc, pk_mask, signature, signer))


def check_neighbours(
    rec: Mapping[str, Any], keys: Mapping[int, tuple[bytes, bytes]], server_round: int, roster: str
) -> None:
    """With a ``secagg-roster``, every neighbour's keys must be signed for this round and its
    node id by a distinct roster key; otherwise the server (or someone between) substituted
    them, and the node refuses to share its secrets (SecAggError naming the neighbour)."""
    allowed = identity.load_roster(roster)
    signatures = get_pairs(rec, "key-ids", "signature")
    signers = get_pairs(rec, "key-ids", "signer")
    for node in sorted(keys):
        identity.verify(
            allowed,
            server_round,
            node,
            keys[node],
            signatures.get(node, b""),
            signers.get(node, b""),
        )
    identity.check_signers({n: signers[n] for n in keys})


def client_share(msg: Message, context: Context) -> Message:
    """Stage 2 on a client: encrypted shares for each neighbour (whose keys it first checks
    against its ``secagg-roster`` when it has one)."""
    rec = _request(msg)
    client = _load(context)
    _round_of(client, rec)
    enc, mask = get_pairs(rec, "key-ids", "pk-enc"), get_pairs(rec, "key-ids", "pk-mask")
    keys = {n: (enc[n], mask[n]) for n in enc}
    roster = _node(context).secagg_roster
    if roster:
        check_neighbours(rec, keys, client.params.server_round, roster)
    ciphertexts, commitment = client.share(keys)
    _store(context, client)
    return _reply(msg, shares_reply(ciphertexts, commitment))


def client_mask(msg: Message, context: Context, train: Callable[[], Message]) -> Message:
    """Stage 3 on a client: check the routed shares, run the plain train handler, mask its
    encoding.

    ``train()`` is the ClientApp's ordinary train handler on this message (which carries the
    global state and train config as a plain train message does), so secure aggregation trains
    exactly as the plain path; like Flower's ``secaggplus_mod``, this only wraps it. The reply
    carries the masked vector and the plain reply's metrics (with the number of clipped
    values), never the encoding itself. When the request carries distributed-DP parameters,
    the payload is encoded with the client's noise share instead of the fixed-point quantizer.
    """
    from fedllama.wire.records import ARRAYS, METRICS

    rec = _request(msg)
    client = _load(context)
    _round_of(client, rec)
    try:
        client.receive(get_pairs(rec, "src", "ciphertexts"))  # fail before training, not after
    except BadShares as err:  # name the senders to the server rather than fail unexplained
        log.warning("%s", err)
        return _reply(msg, {BAD_SHARES: err.senders})
    try:
        ddg = DdgParams.from_record(rec)
    except DistributedNoiseError as err:
        raise SecAggError(f"node {client.node}: {err}") from None
    noise = distributed.draw_in_background(ddg) if ddg is not None else None  # while training
    plain = train()
    if plain.has_error():
        return plain
    arrays = plain.content.array_records[ARRAYS]
    layout = Layout.of({k: tuple(a.shape) for k, a in arrays.items()})
    if layout.digest() != get_field(rec, "layout", bytes):
        raise SecAggError(
            f"node {client.node}: its encoding's keys/shapes differ from the server's "
            f"({len(layout.shapes)} keys, {layout.size} values)"
        )
    values = {k: a.numpy() for k, a in arrays.items()}
    if ddg is None:
        masked, clipped = client.mask(layout.flatten(values))
    else:
        assert noise is not None
        masked, clipped = client.mask_integers(_noisy_integers(values, ddg, noise)), 0
    _store(context, client)
    if clipped:
        log.warning(
            "node %d: %d encoded values clipped to ±%g (secagg.clip_range)",
            client.node,
            clipped,
            client.params.clip_range,
        )
    metrics = MetricRecord({**plain.content.metric_records[METRICS], CLIPPED: clipped})
    wire = to_wire(masked, client.params.modulus_bits)  # 32-bit modulus: half the bytes
    content = RecordDict({MASKED: ArrayRecord({MASKED: Array(wire)}), METRICS: metrics})
    return Message(content, reply_to=msg)


def _noisy_integers(values: Mapping[str, Any], ddg: DdgParams, noise: Future[I64]) -> U64:
    """The payload (every key but the count keys) with this client's share of the noise, as
    integers modulo 2^b (:func:`fedllama.privacy.dp.distributed.encode`)."""
    payload = Layout.of({k: v.shape for k, v in values.items() if k not in ddg.count_keys})
    if payload.size != ddg.dim:
        raise SecAggError(
            f"the encoding's payload has {payload.size} values, the round's distributed noise "
            f"expects {ddg.dim}"
        )
    try:
        return distributed.encode(payload.flatten(values).astype(np.float64), ddg, noise=noise)
    except DistributedNoiseError as err:
        raise SecAggError(str(err)) from None


def client_unmask(msg: Message, context: Context) -> Message:
    """Stage 4 on a client: the shares the server asked for; the round's state is then erased."""
    rec = _request(msg)
    client = _load(context)
    _round_of(client, rec)
    try:
        seeds, keys = client.unmask(get_ids(rec, "survived"), get_ids(rec, "dropped"))
    finally:
        del context.state.config_records[STATE]  # answered or refused: never asked twice
    return _reply(msg, unmask_reply(seeds, keys))
