"""One aggregation path: the sampled clients' replies in, one typed :class:`RoundRecord` out.

The aggregator is chosen once per run (:func:`build_aggregator`) and the round loop calls it
through one method, :meth:`Aggregator.aggregate`, whatever computes the sum:

* :class:`PlainAggregator` streams the replies, validates each one and hands the good ones to a
  :class:`Combiner`: the running sum (:class:`SumCombiner`, summable strategies), the
  trusted per-client collection (:class:`CollectCombiner`, rules that need each encoding), or,
  with ``robust.*`` set, :class:`BoundedCombiner` (norm bounds, robust combiners);
* :class:`fedllama.server.secure.SecureAggregator` runs SecAgg+, so the server only ever holds
  the masked sum, and decodes it with the same ``merge.decode``.

Every path counts replies with the same tally (:meth:`RoundRecord.accept` and
:meth:`RoundRecord.drop`), so a round's metrics row is built in one place, and every summable
path decodes through :meth:`RoundPlan.decode`, where differential privacy's release (central
noise, fixed denominator) sits. Where other mechanisms plug in (``docs/architecture.md``): a
wire codec decodes inside :func:`fedllama.wire.validate.validate_reply`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from fedllama import progress
from fedllama.config import Config, RobustConfig
from fedllama.merge import (
    AdapterState,
    MergeError,
    MergeStrategy,
    SumAccumulator,
    TrustedMergeStrategy,
)
from fedllama.merge import robust as robust_rules
from fedllama.privacy.dp import Release
from fedllama.server.replies import stream_replies
from fedllama.wire.records import ARRAYS, CLIENT_ID, METRICS, record_bytes
from fedllama.wire.validate import (
    ReplyError,
    ReplySpec,
    check_cap,
    check_weight,
    validate_reply,
)

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict
    from flwr.serverapp import Grid

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """A round produced no delta (too few good replies, or secure aggregation could not finish);
    the global adapter stays as it was after the previous round.

    Args:
        message: what failed.
        suspects: nodes the failure points at (left out when the round is retried).
    """

    def __init__(self, message: str, suspects: frozenset[int] = frozenset()) -> None:
        super().__init__(message)
        self.suspects = suspects


OnReply = Callable[[dict[str, Any]], None]
"""Called with each counted client's summary (``node`` plus its metrics): progress."""


@dataclass
class RoundPlan:
    """What a round aggregates: its train messages and what their replies must look like."""

    server_round: int
    messages: Sequence[Message]
    """One train message per sampled node (``FedLlamaStrategy.configure_train``)."""
    merge: MergeStrategy
    global_state: AdapterState
    spec: ReplySpec
    """The keys and shapes of a valid encoding."""
    on_reply: OnReply | None = None
    release: Release | None = None
    """Under differential privacy: what the sum goes through before ``merge.decode`` (noise,
    fixed denominator). A round in which no client was counted then releases noise alone."""
    max_examples: int = 0
    """``server.max_examples``: a reply declaring more is dropped (0: no cap)."""
    robust: RobustConfig | None = None
    """A norm bound or a robust combiner (``robust.*``), when the run sets one."""
    names: dict[int, int] = field(default_factory=dict)
    """Node -> the client id its replies carry (kept across rounds), to name it in logs."""
    uniform: bool = False
    """``strategy.weighting=uniform``: every reply's encoding carries weight 1."""

    def expected_weight(self, num_examples: float) -> float:
        """The weight a reply's encoding must carry: its examples, or 1 under DP or with
        uniform weighting."""
        return 1.0 if self.release is not None or self.uniform else num_examples

    def decode(self, summed: AdapterState) -> AdapterState:
        """The aggregated delta from the sum of the encodings (released first under DP)."""
        if self.release is not None:
            summed = self.release(summed)
        return self.merge.decode(summed, self.global_state)

    def zeros(self) -> AdapterState:
        """An all-zero sum of the expected shapes: the sum of no client."""
        return {k: torch.zeros(shape) for k, shape in self.spec.shapes.items()}


@dataclass
class RoundRecord:
    """What aggregation learned about a round: the one reply tally, and the merged delta.

    ``delta`` is None when no reply was counted.
    """

    server_round: int = 0
    delta: AdapterState | None = None
    ok: int = 0
    dropped: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    clients: list[dict[str, Any]] = field(default_factory=list)
    secagg: dict[str, Any] | None = None
    """The secure path's protocol figures (None on the plain path)."""
    dp: dict[str, Any] | None = None
    """Under differential privacy: ε after the round and what it assumes."""
    noise_only: bool = False
    """Under DP, the round asked no client (too few sampled to aggregate securely) and
    released noise alone."""
    robust: dict[str, Any] | None = None
    """With ``robust.*``: the round's bound and the clients clipped, dropped or left out."""
    examples: float = 0.0
    weighted_loss: float = 0.0
    dropped_nodes: list[int] = field(default_factory=list)
    """The nodes :meth:`drop` left out (a retried round goes on without them)."""
    dropped_clients: list[dict[str, Any]] = field(default_factory=list)
    """Each drop: ``node``, ``client-id`` when known, ``reason`` (and ``stage`` under SecAgg+)."""
    names: dict[int, int] = field(default_factory=dict)
    """Node -> client id (:attr:`RoundPlan.names`)."""
    counted: dict[int, tuple[float, float, int]] = field(default_factory=dict)
    """Each counted node's (examples, train loss, bytes up), for :meth:`retract`."""

    @property
    def train_loss(self) -> float:
        """The counted clients' example-weighted train loss (NaN when none counted)."""
        return self.weighted_loss / self.examples if self.examples else float("nan")

    def accept(
        self,
        node: int,
        num_examples: float,
        train_loss: float,
        metrics: dict[str, Any],
        bytes_up: int,
        on_reply: OnReply | None = None,
    ) -> None:
        """Count one client's reply."""
        self.ok += 1
        self.examples += num_examples
        self.weighted_loss += num_examples * train_loss
        self.bytes_up += bytes_up
        self.counted[node] = (num_examples, train_loss, bytes_up)
        summary = {"node": node, **metrics}
        self.clients.append(summary)
        if on_reply is not None:
            on_reply(summary)
        progress.events.client_replied(self.server_round, node, {**summary, "bytes-up": bytes_up})

    def label(self, node: int) -> str:
        """``node N (client C)``, or ``node N`` while its client id is unknown."""
        return label(node, self.names)

    def drop(self, node: int, reason: str) -> None:
        """Leave one client's reply out, with a log line naming the node and the reason."""
        log.warning("round %d: dropped %s: %s", self.server_round, self.label(node), reason)
        self.dropped += 1
        self.dropped_nodes.append(node)
        self.dropped_clients.append(dropped_entry(node, self.names, reason))
        progress.events.client_dropped(self.server_round, node, self.names.get(node), reason)

    def retract(self, node: int, reason: str) -> None:
        """Drop a reply counted earlier (a combiner that judges the round's replies together
        found it out of bounds): undo its tally, then :meth:`drop` it."""
        examples, loss, nbytes = self.counted.pop(node)
        self.ok -= 1
        self.examples -= examples
        self.weighted_loss -= examples * loss
        self.bytes_up -= nbytes
        self.clients = [c for c in self.clients if c["node"] != node]
        self.drop(node, reason)


def label(node: int, names: dict[int, int]) -> str:
    """How logs name a node: ``node N (client C)`` once its client id is known."""
    return f"node {node}" if node not in names else f"node {node} (client {names[node]})"


def dropped_entry(node: int, names: dict[int, int], reason: str, **more: str) -> dict[str, Any]:
    """A metrics row's record of one dropped client."""
    entry: dict[str, Any] = {"node": node}
    if node in names:
        entry["client-id"] = names[node]
    return {**entry, **more, "reason": reason}


def learn_name(node: int, content: RecordDict, names: dict[int, int]) -> None:
    """Remember the client id a reply's metrics carry (a label only: nothing trusts it)."""
    metrics = content.metric_records.get(METRICS)
    value = metrics.get(CLIENT_ID) if metrics is not None else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        names[node] = value


class Aggregator(Protocol):
    """Turns a round's train messages into its :class:`RoundRecord`."""

    def aggregate(self, grid: Grid, plan: RoundPlan) -> RoundRecord:
        """Send ``plan.messages``, collect and merge the replies."""
        ...


class Combiner(Protocol):
    """Merges the validated encodings of a round into the aggregated delta."""

    rejected: list[tuple[int, str]]
    """Replies taken by :meth:`add` that :meth:`result` left out, with the reason."""

    def add(self, encoded: AdapterState, node: int, weight: float) -> None:
        """Take one client's encoding and its weight (the one its count keys carry). Raises
        MergeError if it cannot be merged, ReplyError if it is refused on its own."""
        ...

    def result(self) -> AdapterState:
        """The aggregated delta for every key of the round's global state."""
        ...

    def summary(self) -> dict[str, Any] | None:
        """What the combiner did to the round's updates, for its metrics row (None: nothing
        worth a row's field)."""
        ...


class SumCombiner:
    """Summable strategies: one running sum (memory flat in the number of clients), decoded by
    the plan (through the DP release when there is one)."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.acc = SumAccumulator()
        self.rejected: list[tuple[int, str]] = []

    def add(self, encoded: AdapterState, node: int = 0, weight: float = 1.0) -> None:
        """Add to the running sum."""
        self.acc.add(encoded)

    def summary(self) -> dict[str, Any] | None:
        """Nothing beyond the tally."""
        return None

    def result(self) -> AdapterState:
        """The decoded sum."""
        return self.plan.decode(self.acc.total if self.acc.count else self.plan.zeros())


class CollectCombiner:
    """Trusted-server strategies: every encoding is held, then merged by the rule."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.merge = cast(TrustedMergeStrategy, plan.merge)
        self.held: list[AdapterState] = []
        self.rejected: list[tuple[int, str]] = []

    def add(self, encoded: AdapterState, node: int = 0, weight: float = 1.0) -> None:
        """Hold the encoding."""
        self.held.append(encoded)

    def result(self) -> AdapterState:
        """``merge.aggregate`` of the held encodings."""
        return self.merge.aggregate(self.held, self.plan.global_state, self.plan.server_round)

    def summary(self) -> dict[str, Any] | None:
        """Nothing beyond the tally."""
        return None


class BoundedCombiner:
    """Bounded influence (``robust.*``, :mod:`fedllama.merge.robust`): each update's norm
    bounded, then the strategy's weighted mean (the norm-bounded mean) or a robust combiner.

    A fixed bound with the mean clips or drops each reply as it arrives, into a running sum
    (memory flat in the number of clients); a bound derived from the round's median norm, or
    a robust combiner, needs every update of the round and holds them (n adapters).
    """

    def __init__(self, plan: RoundPlan, cfg: RobustConfig) -> None:
        self.plan = plan
        self.cfg = cfg
        self.count_keys = plan.merge.count_keys
        self.streaming = cfg.combiner == "mean" and cfg.norm_bound_median == 0
        self.acc = SumAccumulator()
        self.held: list[tuple[int, float, AdapterState]] = []
        self.rejected: list[tuple[int, str]] = []
        self.clipped: dict[int, float] = {}
        """Node -> its update's norm before it was clipped to the bound."""
        self.left_out: list[int] = []
        self.refused: list[int] = []
        """Nodes dropped over the bound as they arrived (streaming)."""
        self.bound = cfg.norm_bound if cfg.norm_bound > 0 else float("inf")

    def _bounded(self, encoded: AdapterState, node: int, weight: float) -> AdapterState | str:
        """The encoding within the round's bound (clipped), or why it is dropped."""
        norm = robust_rules.update_norm(encoded, self.count_keys, weight)
        if not norm > self.bound:
            return encoded
        if self.cfg.over_bound == "drop":
            return f"update norm {norm:.4g} over the bound {self.bound:.4g} ({self._rule()})"
        self.clipped[node] = norm
        log.info(
            "round %d: clipped node %d's update from norm %.4g to the bound %.4g",
            self.plan.server_round,
            node,
            norm,
            self.bound,
        )
        return robust_rules.scale_update(encoded, self.count_keys, self.bound / norm)

    def _rule(self) -> str:
        parts = []
        if self.cfg.norm_bound > 0:
            parts.append(f"robust.norm_bound={self.cfg.norm_bound:g}")
        if self.cfg.norm_bound_median > 0:
            parts.append(f"robust.norm_bound_median={self.cfg.norm_bound_median:g} x median")
        return ", ".join(parts)

    def add(self, encoded: AdapterState, node: int, weight: float) -> None:
        """Stream (fixed bound, mean: clipped now, a drop raised now) or hold."""
        if not self.streaming:
            self.held.append((node, weight, encoded))
            return
        bounded = self._bounded(encoded, node, weight)
        if isinstance(bounded, str):
            self.refused.append(node)
            raise ReplyError(bounded)  # dropped as it arrives
        self.acc.add(bounded)

    def result(self) -> AdapterState:
        """The bounded mean, or the robust combiner's estimate, decoded by the strategy.

        Raises:
            MergeError: every update was dropped, or too few are left for Krum.
        """
        if not self.streaming:
            norms = [robust_rules.update_norm(e, self.count_keys, w) for _, w, e in self.held]
            self.bound = robust_rules.bound_of(
                norms, self.cfg.norm_bound, self.cfg.norm_bound_median
            )
            kept = []
            for node, weight, encoded in self.held:
                bounded = self._bounded(encoded, node, weight)
                if isinstance(bounded, str):
                    self.rejected.append((node, bounded))
                else:
                    kept.append((node, weight, bounded))
            if self.cfg.combiner != "mean":
                return self._robust(kept)
            for _, _, encoded in kept:
                self.acc.add(encoded)
        if not self.acc.count:
            raise MergeError("no update is left within the bound")
        return self.plan.decode(self.acc.total)

    def _robust(self, kept: list[tuple[int, float, AdapterState]]) -> AdapterState:
        if not kept:
            raise MergeError("no update is left within the bound")
        updates, counts = [], []
        for _, weight, encoded in kept:
            payload, count = robust_rules.split_counts(encoded, self.count_keys)
            updates.append({k: v / weight for k, v in payload.items()})
            counts.append({k: v / weight for k, v in count.items()})
        cfg = self.cfg
        estimate, left_out = robust_rules.combine(
            updates,
            counts,
            cfg.combiner,
            trim=cfg.trim,
            byzantine=cfg.byzantine,
            krum_select=cfg.krum_select,
        )
        self.left_out = [kept[i][0] for i in left_out]
        if self.left_out:
            log.info(
                "round %d: %s left out nodes %s",
                self.plan.server_round,
                cfg.combiner,
                ", ".join(map(str, self.left_out)),
            )
        return self.plan.decode(estimate)

    def summary(self) -> dict[str, Any]:
        """The round's bound, and who was clipped (with the norm before), dropped, left out."""
        return {
            "combiner": self.cfg.combiner,
            "bound": self.bound if self.bound != float("inf") else None,
            "over_bound": self.cfg.over_bound,
            "clipped": {str(n): norm for n, norm in self.clipped.items()},
            "dropped": self.refused + [n for n, _ in self.rejected],
            "left_out": self.left_out,
        }


def combiner_for(plan: RoundPlan) -> Combiner:
    """The bounded combiner with ``robust.*``; else the running sum for a summable strategy,
    the collection otherwise."""
    if plan.robust is not None and plan.robust.enabled:
        return BoundedCombiner(plan, plan.robust)
    return SumCombiner(plan) if plan.merge.summable else CollectCombiner(plan)


def collect(plan: RoundPlan, replies: Iterable[Message], record: RoundRecord) -> RoundRecord:
    """Validate and combine replies one by one, as they arrive; set ``record.delta``.

    A reply that is an error, fails validation or cannot be merged is dropped (logged with the
    node and the reason); the others are counted and combined. A bounded combiner may drop
    counted replies once it has seen the round's (their tally is retracted).

    Raises:
        RoundFailed: the combiner could not produce a delta from the counted replies.
    """
    combiner = combiner_for(plan)
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            record.drop(node, f"error reply: {reply.error.reason}")
            continue
        learn_name(node, reply.content, plan.names)
        try:
            valid = validate_reply(reply.content, plan.spec)
            check_cap(valid.num_examples, plan.max_examples)
            expected = plan.expected_weight(valid.num_examples)
            check_weight(valid.encoded, plan.merge.count_keys, expected)
            encoded = valid.encoded
            if plan.release is not None:  # DP: the bound must hold whatever the client sent
                encoded = plan.release.admit(encoded)
            combiner.add(encoded, node, expected)
        except (ReplyError, MergeError) as err:
            record.drop(node, str(err))
            continue
        nbytes = record_bytes(reply.content.array_records[ARRAYS])
        record.accept(
            node, valid.num_examples, valid.train_loss, valid.metrics, nbytes, plan.on_reply
        )
    if record.ok or plan.release is not None:
        try:
            record.delta = combiner.result()
        except MergeError as err:  # e.g. every update over the bound, too few for Krum
            raise RoundFailed(f"round {plan.server_round}: {err}") from None
        for node, reason in combiner.rejected:
            record.retract(node, reason)
        record.robust = combiner.summary()
    return record


class PlainAggregator:
    """The server receives each encoding in the clear (over TLS in a deployment).

    Args:
        timeout: how long a round waits for replies (``server.timeout_s``).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def aggregate(self, grid: Grid, plan: RoundPlan) -> RoundRecord:
        """Send the train messages and combine the replies as they stream in."""
        down = sum(record_bytes(m.content.array_records[ARRAYS]) for m in plan.messages)
        record = RoundRecord(server_round=plan.server_round, bytes_down=down, names=plan.names)
        return collect(plan, stream_replies(grid, plan.messages, self.timeout), record)


def build_aggregator(cfg: Config) -> Aggregator:
    """The run's aggregator: SecAgg+ when ``secagg.enabled``, else the plain path."""
    if cfg.secagg.enabled:
        from fedllama.server.secure import SecureAggregator

        return SecureAggregator(cfg.secagg, cfg.server.timeout_s)
    return PlainAggregator(cfg.server.timeout_s)
