"""The secure aggregator: one round under SecAgg+ over a Flower ``Grid``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import (
    ConfigRecord,
    Message,
    RecordDict,
)

from fedllama.config import SecAggConfig
from fedllama.merge import AdapterState, MergeError
from fedllama.merge.robust import split_counts
from fedllama.privacy.dp import distributed
from fedllama.privacy.dp.distributed import DdgParams
from fedllama.privacy.secagg import identity
from fedllama.privacy.secagg.messages import (
    ACTIONS,
    BAD_SHARES,
    CLIPPED,
    MASKED,
    SECAGG,
    STAGES,
    fields_bytes,
    mask_request,
    setup_request,
    share_request,
    unmask_request,
)
from fedllama.privacy.secagg.params import (
    U64,
    SecAggAbort,
    SecAggError,
    from_wire,
    get_field,
    get_ids,
    get_pairs,
    wire_dtype,
)
from fedllama.privacy.secagg.server import SecAggServer
from fedllama.server.aggregate import (
    RoundFailed,
    RoundPlan,
    RoundRecord,
    dropped_entry,
    learn_name,
)
from fedllama.server.replies import stream_replies
from fedllama.wire.layout import Layout
from fedllama.wire.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, record_bytes
from fedllama.wire.validate import ReplyError, check_cap, check_metrics

if TYPE_CHECKING:
    from flwr.serverapp import Grid

log = logging.getLogger(__name__)


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (arrays, bytes, strings; 8 per number)."""
    total = sum(record_bytes(r) for r in content.array_records.values())
    total += sum(fields_bytes(r) for r in content.config_records.values())
    return total + sum(fields_bytes(r) for r in content.metric_records.values())


@dataclass
class StageStats:
    """What one protocol stage cost: nodes asked, bytes each way, seconds (who answered and who
    dropped is the protocol server's record)."""

    sent: int = 0
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


class SecureAggregator:
    """One round under SecAgg+: keys, shares, masked training, unmasking; the server only ever
    holds the sum, which ``merge.decode`` turns into the delta as on the plain path.

    The plan's train messages fix the sample (their nodes) and what the mask stage carries
    (the global state and the run config). Nodes leave the round at any stage (logged by
    :class:`SecAggServer` with the stage and the reason); every node that is not in the sum
    counts as dropped.

    Args:
        cfg: the ``secagg`` config section.
        train_timeout: how long the mask stage (which trains) waits (``server.timeout_s``);
            the other stages wait ``secagg.timeout_s``.
    """

    def __init__(self, cfg: SecAggConfig, train_timeout: float) -> None:
        self.cfg = cfg
        self.train_timeout = train_timeout
        self.roster = identity.load_roster(cfg.roster) if cfg.roster else None
        """``secagg.roster``: the public keys nodes must sign their round keys with."""

    def aggregate(self, grid: Grid, plan: RoundPlan) -> RoundRecord:
        """Run the four stages and decode the unmasked sum.

        Raises:
            RoundFailed: too few clients or shares to finish securely (nothing was aggregated),
                or the unmasked sum cannot be decoded.
        """
        if not plan.merge.summable:
            raise RoundFailed(
                f"strategy {plan.merge.name} is not summable; secure aggregation needs a sum"
            )
        if plan.release is not None and len(plan.messages) < 2:
            # DP sampled fewer than two: their sum would be one client's update, so nobody is
            # asked and the round releases noise alone
            log.info(
                "round %d: %d client(s) sampled; secure aggregation needs 2: the round releases %s",
                plan.server_round,
                len(plan.messages),
                "nothing (distributed noise: the server adds none)"
                if plan.release.distributed
                else "DP noise only",
            )
            delta = plan.decode(plan.zeros())
            return RoundRecord(server_round=plan.server_round, delta=delta, noise_only=True)
        secure: _SecureRound | None = None
        try:
            secure = _SecureRound(grid, plan, self.cfg, self.train_timeout, self.roster)
            return secure.run()
        except SecAggAbort as err:
            left = secure.suspects() if secure is not None else frozenset()
            raise RoundFailed(
                f"round {plan.server_round}: secure aggregation failed: {err}", left
            ) from None


class _SecureRound:
    """The state of one secure round: the protocol's server, the tally, per-stage figures."""

    def __init__(
        self,
        grid: Grid,
        plan: RoundPlan,
        cfg: SecAggConfig,
        train_timeout: float,
        roster: frozenset[bytes] | None = None,
    ):
        self.grid, self.plan, self.cfg, self.train_timeout = grid, plan, cfg, train_timeout
        self.roster = roster
        self.signed: dict[int, tuple[bytes, bytes]] = {}
        """Node -> (signature, signer) of its round keys, forwarded to its neighbours."""
        self.accusations: dict[int, set[int]] = {}
        """Sender -> the nodes that could not authenticate its shares."""
        self.layout = Layout.of(plan.spec.shapes)
        self.ddg = plan.release.distributed if plan.release is not None else None
        self.length = self.ddg.size if self.ddg is not None else self.layout.size
        self.nodes = [m.metadata.dst_node_id for m in plan.messages]
        self.server = SecAggServer(
            self.nodes, cfg, plan.server_round, self.length, names=plan.names
        )
        self.stats = {stage: StageStats() for stage in STAGES}
        self.record = RoundRecord(server_round=plan.server_round, names=plan.names)
        self.clipped = 0

    def run(self) -> RoundRecord:
        """Every stage in turn, then the decoded sum and the figures."""
        self.announce()
        self.advertise_keys()
        self.share_keys()
        self.collect_masked()
        if self.ddg is not None:
            self.check_noise(self.ddg)
        self.unmask()
        summed = self.distributed_sum() if self.ddg else self.layout.unflatten(self.server.finish())
        if self.ddg is None:
            self.check_total_weight(summed)
            self.check_sum_norm(summed)
        record = self.record
        record.dropped = len(self.nodes) - record.ok
        record.dropped_clients = [  # those not in the sum (an unmask dropout is counted)
            dropped_entry(node, self.plan.names, self.server.reasons[node], stage=stage)
            for stage, nodes in self.server.dropped.items()
            for node in nodes
            if node not in record.counted
        ]
        try:
            record.delta = self.plan.decode(summed)
        except MergeError as err:
            raise SecAggAbort(f"the unmasked sum cannot be decoded: {err}") from None
        record.secagg = self.figures()
        record.bytes_up = sum(s.bytes_up for s in self.stats.values())
        record.bytes_down = sum(s.bytes_down for s in self.stats.values())
        return record

    def announce(self) -> None:
        """Log the round's protocol parameters."""
        server = self.server
        log.info(
            "round %d: secure aggregation over %d clients: %d neighbours each, threshold %d of "
            "%d shares",
            self.plan.server_round,
            len(self.nodes),
            server.k,
            server.threshold,
            server.k + 1,
        )
        if self.ddg is None:
            log.info(
                "round %d: %d-bit fixed point (step %.3g, clip ±%g)",
                self.plan.server_round,
                self.cfg.quantization_bits,
                server.quantizer.step,
                self.cfg.clip_range,
            )
            return
        ddg = self.ddg
        log.info(
            "round %d: distributed discrete Gaussian: %d values rotated into %d, modulo 2^%d, "
            "scale %.4g, each client's noise σ_c = %.4g (provisioned for %d of %d clients), "
            "rounded norm ≤ %.6g (%.4f × C·scale)",
            self.plan.server_round,
            ddg.dim,
            ddg.size,
            ddg.bits,
            ddg.scale,
            ddg.local_std,
            ddg.survivors,
            len(self.nodes),
            ddg.norm_bound,
            ddg.norm_bound / (ddg.clip_norm * ddg.scale),
        )

    def accuses(self, node: int, content: RecordDict) -> bool:
        """A mask reply that names senders whose shares did not authenticate instead of a
        masked vector: the node leaves the round (it cannot hold their secrets) and the
        senders are noted; two accusers make a sender the suspect of a failed round."""
        rec = content.config_records.get(SECAGG)
        if rec is None or BAD_SHARES not in rec:
            return False
        try:
            senders = get_ids(rec, BAD_SHARES)
        except SecAggError as err:
            self.server.drop(node, str(err))
            return True
        for sender in senders:
            self.accusations.setdefault(sender, set()).add(node)
        self.server.drop(node, f"could not authenticate the shares of nodes {senders}")
        return True

    def suspects(self) -> frozenset[int]:
        """Whom a retry of this failed round should leave out: nodes that failed on their own
        (not those pruned for their neighbours' absence, not accusers), and each sender whose
        shares two nodes could not authenticate (a single accusation names both sides)."""
        server = self.server
        accusers = {a for nodes in self.accusations.values() for a in nodes}
        own = {
            n
            for nodes in server.dropped.values()
            for n in nodes
            if n not in server.pruned and n not in accusers
        }
        for sender, by in self.accusations.items():
            own |= {sender} if len(by) >= 2 else {sender, *by}
        return frozenset(own)

    def check_noise(self, ddg: DdgParams) -> None:
        """Distributed noise: refuse to unmask a sum holding fewer noise shares than the
        clients provisioned for (it would carry less noise than the ledger allows)."""
        summed = len(self.server.summed)
        if summed < ddg.survivors:
            for node in sorted(self.server.alive - self.server.summed):
                self.server.drop(node, "no masked vector")  # named, so a retry leaves it out
            raise SecAggAbort(
                f"{summed} masked vectors arrived, fewer than the {ddg.survivors} the clients' "
                "distributed noise was provisioned for (dp.dropout_tolerance); the sum is not "
                "unmasked"
            )

    def distributed_sum(self) -> AdapterState:
        """The payload's sum decoded from the clients' noisy integers; the count keys are
        zeros (the release puts the expected number of clients in them)."""
        assert self.ddg is not None and self.plan.release is not None
        ddg, release = self.ddg, self.plan.release
        payload, release.headroom = distributed.decode(self.server.finish_integers(), ddg)
        release.survivors = len(self.server.summed)
        shapes = self.plan.spec.shapes
        payload_layout = Layout.of({k: s for k, s in shapes.items() if k not in ddg.count_keys})
        summed = payload_layout.unflatten(payload)
        for key in ddg.count_keys:
            summed[key] = torch.zeros(shapes[key])
        return summed

    def check_total_weight(self, summed: AdapterState) -> None:
        """The unmasked sum's weight must be what the summed clients declared (their examples,
        or 1 each under DP or ``strategy.weighting=uniform``): every client owns rank slot 0, so
        element 0 of each count key sums their weights. A client that masked a weight it did
        not declare shows here, and the sum is not released (which client cannot be told: the
        server sees only the sum)."""
        expected = sum(self.plan.expected_weight(c[NUM_EXAMPLES]) for c in self.record.clients)
        tolerance = (
            1e-6 * max(1.0, expected) + len(self.record.clients) * self.server.quantizer.step
        )
        for key in sorted(self.plan.merge.count_keys & set(summed)):
            total = float(summed[key].reshape(-1)[0])
            if abs(total - expected) > tolerance:
                basis = "1 each" if self.plan.uniform or self.plan.release else "examples"
                raise SecAggAbort(
                    f"the unmasked sum's weight {key} is {total:g}, but the summed clients' "
                    f"weights ({basis}) total {expected:g}: a client encoded a weight it did "
                    "not declare; the sum is not released"
                )

    def check_sum_norm(self, summed: AdapterState) -> None:
        """With ``robust.norm_bound`` B every honest client clipped its update to B, so the
        sum's payload (Σ w_k·u_k) has a norm of at most W·B, W the declared total weight, plus
        the fixed point's error (under one step per value per client). A larger sum holds an
        update nobody clipped and is not released (which client cannot be told)."""
        robust = self.plan.robust
        if robust is None or robust.norm_bound <= 0:
            return
        payload, _ = split_counts(summed, self.plan.merge.count_keys)
        weight = sum(c[NUM_EXAMPLES] for c in self.record.clients)
        norm = float(sum(float(v.double().square().sum()) for v in payload.values())) ** 0.5
        values = sum(v.numel() for v in payload.values())
        slack = math.sqrt(values) * len(self.record.clients) * self.server.quantizer.step
        limit = weight * robust.norm_bound * (1 + 1e-5) + slack
        if norm > limit:
            raise SecAggAbort(
                f"the unmasked sum's update norm is {norm:.6g}, over the {limit:.6g} that "
                f"{len(self.record.clients)} clients clipped to robust.norm_bound="
                f"{robust.norm_bound:g} can produce (total weight {weight:g}): a client sent "
                "an update it did not clip; the sum is not released"
            )

    def ask(
        self, stage: str, requests: Mapping[int, dict[str, Any]], timeout: float
    ) -> Iterator[tuple[int, ConfigRecord]]:
        """Send one stage's protocol fields; yield (node, its reply's fields) as they arrive."""
        contents = {n: RecordDict({SECAGG: ConfigRecord(f)}) for n, f in requests.items()}
        for node, reply in _exchange(
            self.grid, self.server, contents, stage, timeout, self.stats[stage]
        ):
            rec = reply.content.config_records.get(SECAGG)
            if rec is None:
                self.server.drop(node, f"reply has no ConfigRecord {SECAGG!r}")
                continue
            yield node, rec

    def advertise_keys(self) -> None:
        """Stage 1: each node's two public keys."""
        setup = {n: setup_request(p) for n, p in self.server.setup_requests().items()}
        signers: dict[bytes, int] = {}
        owners: dict[bytes, int] = {}  # public key -> the node that advertised it first
        for node, rec in self.ask("setup", setup, self.cfg.timeout_s):
            try:
                pk_enc, pk_mask = get_field(rec, "pk-enc", bytes), get_field(rec, "pk-mask", bytes)
                signature, signer = rec.get("signature", b""), rec.get("signer", b"")
                if not isinstance(signature, bytes) or not isinstance(signer, bytes):
                    raise SecAggError("fields 'signature'/'signer' must be bytes")
                if self.roster is not None:
                    identity.verify(
                        self.roster,
                        self.plan.server_round,
                        node,
                        (pk_enc, pk_mask),
                        signature,
                        signer,
                    )
                    if signer in signers:
                        raise SecAggError(
                            f"signed with the key node {signers[signer]} signed with this round"
                        )
                    signers[signer] = node
                first = owners.get(pk_enc, owners.get(pk_mask))
                if first is not None:  # unsigned replay: which one is the original is unknown
                    why = f"nodes {first} and {node} advertise the same public key"
                    self.server.drop(first, f"{why} (without secagg.roster neither is trusted)")
                    raise SecAggError(f"{why} (without secagg.roster neither is trusted)")
                self.server.add_keys(node, pk_enc, pk_mask)
                owners[pk_enc] = owners[pk_mask] = node
                self.signed[node] = (signature, signer)
            except SecAggError as err:
                self.server.drop(node, str(err))

    def share_keys(self) -> None:
        """Stage 2: each node's encrypted shares for its neighbours, and its commitment."""
        server_round = self.plan.server_round
        requests = self.server.share_requests().items()
        share = {
            n: share_request(server_round, k, {m: self.signed[m] for m in k if m in self.signed})
            for n, k in requests
        }
        for node, rec in self.ask("share", share, self.cfg.timeout_s):
            try:
                ciphertexts = get_pairs(rec, "dst", "ciphertexts")
                self.server.add_shares(node, ciphertexts, get_field(rec, "commitment", bytes))
            except SecAggError as err:
                self.server.drop(node, str(err))

    def mask_contents(self) -> dict[int, RecordDict]:
        """Stage 3's messages: the plain train content plus the shares routed to each node."""
        by_node = {m.metadata.dst_node_id: m for m in self.plan.messages}
        contents = {}
        for node, ciphertexts in self.server.mask_requests().items():
            plain = by_node[node].content
            fields = mask_request(self.plan.server_round, ciphertexts, self.layout.digest())
            if self.ddg is not None:
                fields |= self.ddg.to_record()
            contents[node] = RecordDict(
                {
                    ARRAYS: plain.array_records[ARRAYS],
                    CONFIG: plain.config_records[CONFIG],
                    SECAGG: ConfigRecord(fields),
                }
            )
        return contents

    def collect_masked(self) -> None:
        """Stage 3: each node trains and replies with its masked encoding; summed on arrival."""
        contents = self.mask_contents()
        record = self.record
        stats = self.stats["mask"]
        for node, reply in _exchange(
            self.grid, self.server, contents, "mask", self.train_timeout, stats
        ):
            learn_name(node, reply.content, self.plan.names)
            if self.accuses(node, reply.content):
                continue
            try:
                masked, metrics, num_examples, train_loss = _check_masked(
                    reply.content, self.length, self.server.cfg.modulus_bits
                )
                check_cap(num_examples, self.plan.max_examples)
                self.server.add_masked(node, masked)
            except (SecAggError, ReplyError) as err:
                self.server.drop(node, str(err))
                continue
            nbytes = record_bytes(reply.content.array_records[MASKED])
            record.accept(node, num_examples, train_loss, metrics, nbytes, self.plan.on_reply)
            self.count_clipped(node, int(metrics.get(CLIPPED, 0)))

    def count_clipped(self, node: int, clipped: int) -> None:
        """Total the values a client clipped to ±clip_range, and say so."""
        self.clipped += clipped
        if clipped:
            log.warning(
                "round %d: node %d clipped %d encoded values to ±%g: raise secagg.clip_range",
                self.plan.server_round,
                node,
                clipped,
                self.cfg.clip_range,
            )

    def unmask(self) -> None:
        """Stage 4: shares of survivors' seeds and dropped nodes' mask keys."""
        server_round = self.plan.server_round
        requests = self.server.unmask_requests().items()
        unmask = {n: unmask_request(server_round, *a) for n, a in requests}
        for node, rec in self.ask("unmask", unmask, self.cfg.timeout_s):
            try:
                self.server.add_unmask(
                    node,
                    get_pairs(rec, "seed-owners", "seed-shares"),
                    get_pairs(rec, "key-owners", "key-shares"),
                )
            except SecAggError as err:
                self.server.drop(node, f"shares ignored: {err}")

    def figures(self) -> dict[str, Any]:
        """The protocol's figures for the metrics row."""
        server = self.server
        stages = zip(self.stats.items(), server.replied(), strict=True)
        return {
            "clients": len(self.nodes),
            "neighbours": server.k,
            "threshold": server.threshold,
            "clipped": self.clipped,
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
                for (stage, s), ok in stages
            },
        }


def _check_masked(
    content: RecordDict, length: int, modulus_bits: int
) -> tuple[U64, dict[str, Any], float, float]:
    """A mask-stage reply's masked vector (as uint64) and metrics (raises
    ReplyError/SecAggError): ``length`` integers of the round's width (uint64, or uint32 for a
    32-bit modulus)."""
    arrays = content.array_records.get(MASKED)
    if arrays is None or set(arrays) != {MASKED}:
        raise SecAggError(f"no ArrayRecord {MASKED!r} holding one array {MASKED!r}")
    array = arrays[MASKED]
    wire = str(wire_dtype(modulus_bits))
    if array.dtype != wire or tuple(array.shape) != (length,):
        raise SecAggError(
            f"masked vector is {array.dtype} {tuple(array.shape)}, expected {wire} ({length},)"
        )
    try:
        payload = np.asarray(array.numpy())
    except Exception as err:  # a corrupt payload fails inside numpy's loader
        raise SecAggError(f"masked vector cannot be decoded ({err})") from None
    masked = from_wire(payload, modulus_bits, length)  # the payload as declared, or refused
    metrics = content.metric_records.get(METRICS)
    num_examples, train_loss = check_metrics(metrics)
    assert metrics is not None  # check_metrics raised otherwise
    clipped = metrics.get(CLIPPED)
    if not isinstance(clipped, int) or clipped < 0:
        raise SecAggError(f"metric {CLIPPED!r} is {clipped!r}, expected a count")
    return masked, dict(metrics), num_examples, train_loss
