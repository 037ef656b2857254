"""One aggregation path: the sampled clients' replies in, one typed :class:`RoundRecord` out.

The aggregator is chosen once per run (:func:`build_aggregator`) and the round loop calls it
through one method, :meth:`Aggregator.aggregate`, whatever computes the sum:

* :class:`PlainAggregator` streams the replies, validates each one and hands the good ones to a
  :class:`Combiner`: the running sum (:class:`SumCombiner`, summable strategies) or the
  trusted per-client collection (:class:`CollectCombiner`, rules that need each encoding);
* :class:`fedllama.server.secure.SecureAggregator` runs SecAgg+, so the server only ever holds
  the masked sum, and decodes it with the same ``merge.decode``.

Every path counts replies with the same tally (:meth:`RoundRecord.accept` and
:meth:`RoundRecord.drop`), so a round's metrics row is built in one place, and every summable
path decodes through :meth:`RoundPlan.decode`, where differential privacy's release (central
noise, fixed denominator) sits. Where other mechanisms plug in (``docs/architecture.md``): a
robust combiner is another :class:`Combiner`; a wire codec decodes inside
:func:`fedllama.wire.validate.validate_reply`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from fedllama.config import Config
from fedllama.merge import (
    AdapterState,
    MergeError,
    MergeStrategy,
    SumAccumulator,
    TrustedMergeStrategy,
)
from fedllama.privacy.dp import Release
from fedllama.server.replies import stream_replies
from fedllama.wire.records import ARRAYS, record_bytes
from fedllama.wire.validate import (
    ReplyError,
    ReplySpec,
    check_cap,
    check_weight,
    validate_reply,
)

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp import Grid

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """A round produced no delta (too few good replies, or secure aggregation could not finish);
    the global adapter stays as it was after the previous round."""


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

    def expected_weight(self, num_examples: float) -> float:
        """The weight a reply's encoding must carry: its examples, or 1 under DP."""
        return 1.0 if self.release is not None else num_examples

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
    examples: float = 0.0
    weighted_loss: float = 0.0

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
        summary = {"node": node, **metrics}
        self.clients.append(summary)
        if on_reply is not None:
            on_reply(summary)

    def drop(self, node: int, reason: str) -> None:
        """Leave one client's reply out, with a log line naming the node and the reason."""
        log.warning("round %d: dropped node %d: %s", self.server_round, node, reason)
        self.dropped += 1


class Aggregator(Protocol):
    """Turns a round's train messages into its :class:`RoundRecord`."""

    def aggregate(self, grid: Grid, plan: RoundPlan) -> RoundRecord:
        """Send ``plan.messages``, collect and merge the replies."""
        ...


class Combiner(Protocol):
    """Merges the validated encodings of a round into the aggregated delta."""

    def add(self, encoded: AdapterState) -> None:
        """Take one client's encoding (raises MergeError if it cannot be merged)."""
        ...

    def result(self) -> AdapterState:
        """The aggregated delta for every key of the round's global state."""
        ...


class SumCombiner:
    """Summable strategies: one running sum (memory flat in the number of clients), decoded by
    the plan (through the DP release when there is one)."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.acc = SumAccumulator()

    def add(self, encoded: AdapterState) -> None:
        """Add to the running sum."""
        self.acc.add(encoded)

    def result(self) -> AdapterState:
        """The decoded sum."""
        return self.plan.decode(self.acc.total if self.acc.count else self.plan.zeros())


class CollectCombiner:
    """Trusted-server strategies: every encoding is held, then merged by the rule."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.merge = cast(TrustedMergeStrategy, plan.merge)
        self.held: list[AdapterState] = []

    def add(self, encoded: AdapterState) -> None:
        """Hold the encoding."""
        self.held.append(encoded)

    def result(self) -> AdapterState:
        """``merge.aggregate`` of the held encodings."""
        return self.merge.aggregate(self.held, self.plan.global_state, self.plan.server_round)


def combiner_for(plan: RoundPlan) -> Combiner:
    """The running sum for a summable strategy, the collection otherwise."""
    return SumCombiner(plan) if plan.merge.summable else CollectCombiner(plan)


def collect(plan: RoundPlan, replies: Iterable[Message], record: RoundRecord) -> RoundRecord:
    """Validate and combine replies one by one, as they arrive; set ``record.delta``.

    A reply that is an error, fails validation or cannot be merged is dropped (logged with the
    node and the reason); the others are counted and combined.
    """
    combiner = combiner_for(plan)
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            record.drop(node, f"error reply: {reply.error.reason}")
            continue
        try:
            valid = validate_reply(reply.content, plan.spec)
            check_cap(valid.num_examples, plan.max_examples)
            expected = plan.expected_weight(valid.num_examples)
            check_weight(valid.encoded, plan.merge.count_keys, expected)
            encoded = valid.encoded
            if plan.release is not None:  # DP: the bound must hold whatever the client sent
                encoded = plan.release.admit(encoded)
            combiner.add(encoded)
        except (ReplyError, MergeError) as err:
            record.drop(node, str(err))
            continue
        nbytes = record_bytes(reply.content.array_records[ARRAYS])
        record.accept(
            node, valid.num_examples, valid.train_loss, valid.metrics, nbytes, plan.on_reply
        )
    if record.ok or plan.release is not None:
        record.delta = combiner.result()
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
        record = RoundRecord(server_round=plan.server_round, bytes_down=down)
        return collect(plan, stream_replies(grid, plan.messages, self.timeout), record)


def build_aggregator(cfg: Config) -> Aggregator:
    """The run's aggregator: SecAgg+ when ``secagg.enabled``, else the plain path."""
    if cfg.secagg.enabled:
        from fedllama.server.secure import SecureAggregator

        return SecureAggregator(cfg.secagg, cfg.server.timeout_s)
    return PlainAggregator(cfg.server.timeout_s)
