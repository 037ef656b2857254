"""The one Flower strategy subclass: node sampling and the train messages; merging is ours.

:class:`FedLlamaStrategy` subclasses Flower's Message-API ``FedAvg`` and overrides its hooks:

* ``configure_train`` sends every sampled node the global state (in the merge strategy's own
  form) plus the run's whole config, so a stock SuperNode needs nothing but its node config. The
  client derives its view with ``strategy.client_view(global, own rank)``: the server need not
  know a node's LoRA rank, which lives in that node's config;
* ``aggregate_train`` is the plain path of :mod:`fedllama.server.aggregate` for Flower's own
  callers (the round loop calls the run's aggregator instead);
* ``configure_evaluate`` sends nothing: evaluation is server-side on the global eval split,
  which saves a network hop per round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedllama.merge import AdapterState, MergeStrategy, frozen_key
from fedllama.privacy.dp import Sampler
from fedllama.server.aggregate import OnReply, RoundPlan, RoundRecord, collect
from fedllama.wire.codecs import Codec, encode_view
from fedllama.wire.records import CONFIG_YAML, DP_CLIP_NORM, NUM_EXAMPLES, TRAIN_LOSS, to_record
from fedllama.wire.validate import ReplySpec

log = logging.getLogger(__name__)


class FedLlamaStrategy(FedAvg):  # type: ignore[misc]
    """Flower strategy that delegates merging to a fedllama :class:`MergeStrategy`.

    Args:
        merge: the merge strategy (from ``strategies.build``).
        config_yaml: the run's resolved config, sent to every client.
        rank: a LoRA rank clients may have (``lora.r``); it fixes the expected reply shapes, which
            a summable strategy's encodings keep equal across ranks.
        fraction_train: share of connected nodes sampled per round.
        min_nodes: nodes that must be connected before a round starts.
        sampler: under differential privacy, who takes part (instead of ``fraction_train``).
        codec: how replies travel (``wire.codec``; default float32 as it is).
        downlink: how the global state travels to clients (``wire.downlink``).
    """

    def __init__(
        self,
        merge: MergeStrategy,
        config_yaml: str,
        rank: int,
        fraction_train: float = 1.0,
        min_nodes: int = 1,
        sampler: Sampler | None = None,
        codec: Codec | None = None,
        downlink: str = "none",
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=min_nodes,
            min_available_nodes=min_nodes,
        )
        self.merge = merge
        self.sampler = sampler
        self.codec = codec or Codec()
        self.downlink = downlink
        self.population = 0
        """Nodes connected when ``sampler`` last drew a round."""
        self.extra_keys: dict[str, tuple[int, ...]] = {}
        """Keys every reply carries besides the merge strategy's encoding (DP's indicator)."""
        self.clip_norm: float | None = None
        """Under DP: the round's clip norm C, sent to clients (it adapts each round)."""
        self.config_yaml = config_yaml
        self.rank = rank
        self.global_state: AdapterState = {}
        self.spec = ReplySpec(shapes={})
        self.report = RoundRecord()
        self.client_ids: dict[int, int] = {}
        """Node -> client id, learned from replies; names nodes in logs and rows."""

    def set_global(self, global_state: AdapterState, server_round: int) -> None:
        """Install the global state ``server_round`` starts from, and the replies it expects."""
        self.global_state = global_state
        view = self.merge.client_view(global_state, self.rank)
        unsent = self.merge.frozen(server_round) | self.merge.local
        zero = {k: torch.zeros_like(v) for k, v in view.items() if not frozen_key(k, unsent)}
        encoded = self.merge.encode(zero, 1.0, view)
        shapes = {k: tuple(v.shape) for k, v in encoded.items()}
        self.spec = ReplySpec(
            shapes={**shapes, **self.extra_keys},
            codec=self.codec,
            keep=self.merge.count_keys | frozenset(self.extra_keys),
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node: the global state and the run config."""
        config[CONFIG_YAML] = self.config_yaml
        if self.clip_norm is not None:
            config[DP_CLIP_NORM] = self.clip_norm
        arrays = encode_view(self.global_state, self.downlink)
        if self.sampler is None:
            return list(super().configure_train(server_round, arrays, config, grid))
        _, connected = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        self.population = len(connected)
        chosen = self.sampler.sample(connected, server_round)
        log.info(
            "round %d: dp.sampling=%s chose %d of %d nodes",
            server_round,
            self.sampler.cfg.sampling,
            len(chosen),
            len(connected),
        )
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, chosen, MessageType.TRAIN))

    def plan(
        self, server_round: int, messages: Sequence[Message], on_reply: OnReply | None = None
    ) -> RoundPlan:
        """What the aggregator needs to know about the round ``configure_train`` started."""
        return RoundPlan(
            server_round,
            messages,
            self.merge,
            self.global_state,
            self.spec,
            on_reply,
            names=self.client_ids,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and combine replies one by one; return the aggregated delta.

        The round's :class:`RoundRecord` is kept as ``self.report``.
        """
        plan = self.plan(server_round, [])
        self.report = collect(plan, replies, RoundRecord(server_round=server_round))
        if self.report.delta is None:
            return None, None
        metrics = MetricRecord(
            {TRAIN_LOSS: self.report.train_loss, NUM_EXAMPLES: int(self.report.examples)}
        )
        return to_record(self.report.delta), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates on the global eval split."""
        return []
