"""Flower glue: records <-> tensors, reply validation, and the one Flower strategy subclass.

:class:`FedLlamaStrategy` subclasses Flower's Message-API ``FedAvg`` and overrides three hooks:

* ``configure_train`` sends every sampled node the global state (in the merge strategy's own
  form) plus the run's whole config, so a stock SuperNode needs nothing but its node config. The
  client derives its view with ``strategy.client_view(global, own rank)``: the server need not
  know a node's LoRA rank, which lives in that node's config;
* ``aggregate_train`` validates each reply (keys, shapes, dtypes, finite values, metrics), drops
  a bad one with a log line naming the node and the reason, and adds the good ones to a running
  sum as they arrive — it consumes an iterator, so replies streamed by :func:`stream_replies`
  are never all held at once — then decodes the sum with the merge strategy;
* ``configure_evaluate`` sends nothing: evaluation is server-side on the global eval split,
  which saves a network hop per round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedllama.adapters import AdapterState
from fedllama.merge import (
    MergeError,
    MergeStrategy,
    SumAccumulator,
    TrustedMergeStrategy,
    frozen_key,
)

log = logging.getLogger(__name__)

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CONFIG_YAML = "fedllama-config"
ROUND = "server-round"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
WIRE_DTYPES = ("float32",)


def to_record(state: AdapterState) -> ArrayRecord:
    """Tensors -> Flower ``ArrayRecord`` (float32: Flower's ``Array`` rejects bf16)."""
    return ArrayRecord(
        torch_state_dict={k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    )


def from_record(record: ArrayRecord) -> AdapterState:
    """Flower ``ArrayRecord`` -> float32 tensors."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ``ArrayRecord`` (what crosses the wire, before framing)."""
    return sum(len(a.data) for a in record.values())


class ReplyError(ValueError):
    """A client reply is malformed; the message says why."""


@dataclass
class ReplySpec:
    """What a valid reply carries: encoding keys with shapes, and the metrics."""

    shapes: dict[str, tuple[int, ...]]


@dataclass
class ValidReply:
    """A reply that passed :func:`validate_reply`."""

    encoded: AdapterState
    num_examples: float
    train_loss: float
    metrics: dict[str, Any]


def validate_reply(content: RecordDict, spec: ReplySpec) -> ValidReply:
    """Check a train reply and return its encoding and metrics.

    Raises:
        ReplyError: a missing or extra key, a wrong shape or dtype, a NaN/Inf value, or missing
            or non-finite metrics. The message names the key.
    """
    arrays = content.array_records.get(ARRAYS)
    metrics = content.metric_records.get(METRICS)
    if arrays is None:
        raise ReplyError(f"no ArrayRecord {ARRAYS!r} in the reply")
    if metrics is None:
        raise ReplyError(f"no MetricRecord {METRICS!r} in the reply")
    missing = sorted(set(spec.shapes) - set(arrays))
    extra = sorted(set(arrays) - set(spec.shapes))
    if missing:
        raise ReplyError(f"missing key {missing[0]} ({len(missing)} missing)")
    if extra:
        raise ReplyError(f"unexpected key {extra[0]} ({len(extra)} unexpected)")
    for key, shape in spec.shapes.items():
        array = arrays[key]
        if array.dtype not in WIRE_DTYPES:
            raise ReplyError(f"{key}: dtype {array.dtype}, expected one of {WIRE_DTYPES}")
        if tuple(array.shape) != shape:
            raise ReplyError(f"{key}: shape {tuple(array.shape)}, expected {shape}")
    tensors: AdapterState = {}
    for key, shape in spec.shapes.items():
        try:
            values = arrays[key].numpy()
        except Exception as err:  # a corrupt payload fails inside numpy's loader
            raise ReplyError(f"{key}: payload cannot be decoded ({err})") from None
        if values.dtype.name not in WIRE_DTYPES or tuple(values.shape) != shape:
            raise ReplyError(f"{key}: payload is {values.dtype} {values.shape}, not as declared")
        if not np.isfinite(values).all():
            raise ReplyError(f"{key}: contains NaN or Inf")
        tensors[key] = torch.from_numpy(np.array(values, copy=True))
    num_examples, train_loss = check_metrics(metrics)
    return ValidReply(tensors, num_examples, train_loss, dict(metrics))


def check_metrics(metrics: MetricRecord | None) -> tuple[float, float]:
    """(num-examples, train-loss) of a train reply's metrics (plain or masked).

    Raises:
        ReplyError: the MetricRecord is missing, or either metric is not a finite number (or
            num-examples is not > 0). The message names the metric.
    """
    if metrics is None:
        raise ReplyError(f"no MetricRecord {METRICS!r} in the reply")
    numbers = {}
    for key in (NUM_EXAMPLES, TRAIN_LOSS):
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ReplyError(f"metric {key!r} is {value!r}, expected a finite number")
        numbers[key] = float(value)
    if numbers[NUM_EXAMPLES] <= 0:
        raise ReplyError(f"metric {NUM_EXAMPLES!r} is {numbers[NUM_EXAMPLES]}, expected > 0")
    return numbers[NUM_EXAMPLES], numbers[TRAIN_LOSS]


SUPERLINK_NODE_ID = 1
"""Source node id of the error replies the SuperLink itself makes (Flower 1.39)."""


def stream_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    poll_s: float = 0.2,
    setting: str = "server.timeout_s",
) -> Iterator[Message]:
    """Push messages and yield replies as they arrive (``send_and_receive``, streamed).

    Nodes that do not answer are named in the log. A SuperNode that died is reported by the
    SuperLink itself with an error reply (``Node Unavailable``) once its heartbeat lapses: in
    Flower 1.39 a SuperNode sends one about every 20 s and is declared offline 2 x 30 s after
    the last, so 40-60 s after it died. That reply comes from the SuperLink's node id; it is
    re-addressed here as a reply from the node it stands for, so that the caller logs and
    counts it against that node. A node still silent at ``timeout`` is logged by id, with
    ``setting``, the config key the timeout came from.
    """
    sent = list(messages)
    ids: list[str | None] = list(grid.push_messages(sent))
    ids += [None] * (len(sent) - len(ids))  # Flower returns [] for a payload that is too large
    pairs = list(zip(ids, sent, strict=True))
    by_id = {mid: msg for mid, msg in pairs if mid}
    unpushed = sorted(msg.metadata.dst_node_id for mid, msg in pairs if not mid)
    if unpushed:
        log.warning("could not push messages to node(s) %s", ", ".join(map(str, unpushed)))
    pending = set(by_id)
    start = time.monotonic()
    while pending and time.monotonic() < start + timeout:
        replies = list(grid.pull_messages(pending))
        for reply in replies:
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            if reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                original = by_id.get(mid)
                if original is not None:
                    log.warning(
                        "node %d is unreachable (reported by the SuperLink %.1f s after the "
                        "message was sent): %s",
                        original.metadata.dst_node_id,
                        time.monotonic() - start,
                        reply.error.reason,
                    )
                    reply = Message(reply.error, reply_to=original)
            yield reply
        if pending and not replies:
            time.sleep(poll_s)
    if pending:
        silent = sorted(by_id[mid].metadata.dst_node_id for mid in pending)
        log.warning(
            "%d node(s) did not reply within %s=%.0f s: %s",
            len(silent),
            setting,
            timeout,
            ", ".join(map(str, silent)),
        )


@dataclass
class RoundReport:
    """What aggregate_train learned about a round."""

    delta: AdapterState | None = None
    ok: int = 0
    dropped: int = 0
    train_loss: float = float("nan")
    bytes_up: int = 0
    bytes_down: int = 0
    clients: list[dict[str, Any]] = field(default_factory=list)


class FedLlamaStrategy(FedAvg):  # type: ignore[misc]
    """Flower strategy that delegates merging to a fedllama :class:`MergeStrategy`.

    Args:
        merge: the merge strategy (from ``strategies.build``).
        config_yaml: the run's resolved config, sent to every client.
        rank: a LoRA rank clients may have (``lora.r``); it fixes the expected reply shapes, which
            a summable strategy's encodings keep equal across ranks.
        fraction_train: share of connected nodes sampled per round.
        min_nodes: nodes that must be connected before a round starts.
        on_reply: called with each client's summary as its reply is aggregated (progress).
    """

    def __init__(
        self,
        merge: MergeStrategy,
        config_yaml: str,
        rank: int,
        fraction_train: float = 1.0,
        min_nodes: int = 1,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=min_nodes,
            min_available_nodes=min_nodes,
        )
        self.merge = merge
        self.config_yaml = config_yaml
        self.rank = rank
        self.on_reply = on_reply
        self.global_state: AdapterState = {}
        self.spec = ReplySpec(shapes={})
        self.report = RoundReport()

    def set_global(self, global_state: AdapterState, server_round: int) -> None:
        """Install the global state ``server_round`` starts from, and the replies it expects."""
        self.global_state = global_state
        view = self.merge.client_view(global_state, self.rank)
        unsent = self.merge.frozen(server_round) | self.merge.local
        zero = {k: torch.zeros_like(v) for k, v in view.items() if not frozen_key(k, unsent)}
        encoded = self.merge.encode(zero, 1.0, view)
        self.spec = ReplySpec(shapes={k: tuple(v.shape) for k, v in encoded.items()})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node: the global state and the run config."""
        self.report = RoundReport()
        arrays = to_record(self.global_state)
        config[CONFIG_YAML] = self.config_yaml
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.report.bytes_down = record_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and sum replies one by one; return the decoded aggregated delta.

        A trusted-server strategy (``summable = False``) gets the individual encodings instead.
        """
        acc = SumAccumulator()
        held: list[AdapterState] = []
        report = self.report
        weighted_loss = 0.0
        weight = 0.0
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = reply.error.reason
                log.warning(
                    "round %d: dropped node %d: error reply: %s", server_round, node, reason
                )
                report.dropped += 1
                continue
            try:
                valid = validate_reply(reply.content, self.spec)
                if self.merge.summable:
                    acc.add(valid.encoded)
                else:
                    held.append(valid.encoded)
            except (ReplyError, MergeError) as err:
                log.warning("round %d: dropped node %d: %s", server_round, node, err)
                report.dropped += 1
                continue
            weighted_loss += valid.num_examples * valid.train_loss
            weight += valid.num_examples
            report.ok += 1
            report.bytes_up += record_bytes(reply.content.array_records[ARRAYS])
            summary = {"node": node, **valid.metrics}
            report.clients.append(summary)
            if self.on_reply is not None:
                self.on_reply(summary)
        if report.ok == 0:
            return None, None
        report.train_loss = weighted_loss / weight
        if self.merge.summable:
            report.delta = self.merge.decode(acc.total, self.global_state)
        else:
            trusted = cast(TrustedMergeStrategy, self.merge)
            report.delta = trusted.aggregate(held, self.global_state, server_round)
        metrics = MetricRecord({TRAIN_LOSS: report.train_loss, NUM_EXAMPLES: int(weight)})
        return to_record(report.delta), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates on the global eval split."""
        return []
