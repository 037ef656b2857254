"""Records <-> tensors and reply validation, with faked Flower replies (no network)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedllama.merge import WEIGHT_KEY
from fedllama.server.strategy import FedLlamaStrategy
from fedllama.wire.records import ARRAYS, METRICS, from_record, to_record
from fedllama.wire.validate import ReplyError, ReplySpec, validate_reply
from strategies.fedavg import FedAvg

A = "base_model.model.layer.q_proj.lora_A.weight"
B = "base_model.model.layer.q_proj.lora_B.weight"
SPEC = ReplySpec(shapes={A: (2, 3), B: (3, 2), WEIGHT_KEY: (1,)})


def _content(arrays: dict[str, np.ndarray], metrics: dict[str, float] | None = None) -> RecordDict:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    metrics = {"num-examples": 5, "train-loss": 1.5} if metrics is None else metrics
    return RecordDict({ARRAYS: record, METRICS: MetricRecord(metrics)})


def _good() -> dict[str, np.ndarray]:
    return {
        A: np.ones((2, 3), np.float32),
        B: np.ones((3, 2), np.float32),
        WEIGHT_KEY: np.array([5.0], np.float32),
    }


def test_record_round_trip_casts_bf16_to_float32() -> None:
    state = {A: torch.randn(2, 3, dtype=torch.bfloat16), B: torch.randn(3, 2)}
    back = from_record(to_record(state))
    assert back[A].dtype == torch.float32
    assert torch.equal(back[A], state[A].float())
    assert torch.equal(back[B], state[B])


def test_valid_reply_passes() -> None:
    valid = validate_reply(_content(_good()), SPEC)
    assert valid.num_examples == 5 and valid.train_loss == 1.5
    assert torch.equal(valid.encoded[A], torch.ones(2, 3))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda a: a[A].__setitem__((0, 0), np.nan), f"{A}: contains NaN or Inf"),
        (lambda a: a[B].__setitem__((1, 1), np.inf), f"{B}: contains NaN or Inf"),
        (lambda a: a.__setitem__(A, np.ones((4, 3), np.float32)), "shape (4, 3), expected (2, 3)"),
        (lambda a: a.pop(B), f"missing key {B}"),
        (lambda a: a.__setitem__("extra.weight", np.ones(1, np.float32)), "unexpected key extra"),
        (lambda a: a.__setitem__(A, np.ones((2, 3), np.float64)), "dtype float64"),
    ],
    ids=["nan", "inf", "wrong-shape", "missing-key", "extra-key", "wrong-dtype"],
)
def test_malformed_reply_is_rejected_with_reason(mutate, reason: str) -> None:
    arrays = _good()
    mutate(arrays)
    with pytest.raises(ReplyError) as err:
        validate_reply(_content(arrays), SPEC)
    assert reason in str(err.value)


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"train-loss": 1.0}, "'num-examples' is missing"),
        ({"num-examples": 0, "train-loss": 1.0}, "expected > 0"),
        ({"num-examples": 3, "train-loss": float("nan")}, "'train-loss' is nan"),
        ({"num-examples": 3, "train-loss": -0.5}, "'train-loss' is -0.5, expected a finite"),
        ({"num-examples": 1e308, "train-loss": 1.0}, "'num-examples' is 1e+308"),
        ({"num-examples": 3, "train-loss": 1.0, "steps": [1, 2]}, "'steps' is [1, 2]"),
        ({"num-examples": 3, "train-loss": 1.0, "steps": 1.5}, "expected an integer"),
        ({"num-examples": 3, "train-loss": 1.0, "seconds": float("inf")}, "'seconds' is inf"),
        ({"num-examples": 3, "train-loss": 1.0, "client-eval-loss": [1.0]}, "client-eval-loss"),
        ({"num-examples": 3, "train-loss": 1.0, "mood": 1.0}, "unknown metric 'mood'"),
    ],
)
def test_bad_metrics_are_rejected(metrics: dict[str, float], reason: str) -> None:
    with pytest.raises(ReplyError, match=re.escape(reason)):
        validate_reply(_content(_good(), metrics), SPEC)


def _reply(node: int, content: RecordDict) -> Message:
    """A reply as the SuperLink would deliver it from ``node`` (no network involved)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"m{node}",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def test_aggregate_drops_bad_reply_logs_node_and_averages_the_rest(caplog) -> None:
    strategy = FedLlamaStrategy(FedAvg(), config_yaml="", rank=2)
    strategy.set_global({A: torch.zeros(2, 3), B: torch.zeros(3, 2)}, 1)
    good1 = {
        **_good(),
        A: np.full((2, 3), 1.0, np.float32),
        WEIGHT_KEY: np.array([1.0], np.float32),
    }
    good2 = {
        **_good(),
        A: np.full((2, 3), 27.0, np.float32),
        WEIGHT_KEY: np.array([3.0], np.float32),
    }
    bad = _good()
    bad[A][0, 0] = np.nan
    replies = [
        _reply(11, _content(good1, {"num-examples": 1, "train-loss": 2.0})),
        _reply(22, _content(bad)),
        _reply(33, _content(good2, {"num-examples": 3, "train-loss": 1.0})),
    ]
    with caplog.at_level(logging.WARNING, logger="fedllama"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert "dropped node 22" in caplog.text and "NaN" in caplog.text
    assert strategy.report.ok == 2 and strategy.report.dropped == 1
    # encodings carry w·Δ: A = (1·1 + 3·9) / (1 + 3) = 7; train loss (1·2 + 3·1) / 4 = 1.25
    assert torch.allclose(strategy.report.delta[A], torch.full((2, 3), 7.0))
    assert metrics is not None and metrics["train-loss"] == pytest.approx(1.25)
    assert arrays is not None and set(arrays) == {A, B}


def test_duplicate_forged_and_foreign_replies_are_refused() -> None:
    from fedllama.server.inprocess import InProcessGrid as Grid
    from fedllama.server.replies import stream_replies
    from tests.harness import logged

    class Replaying(Grid):
        """Before each reply, one forged by another node; after it, the reply again and one
        that answers a message this round never sent."""

        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            replies = list(super().pull_messages(message_ids))
            forged, foreign = [], []
            for reply in replies:
                fake = Message(RecordDict(), reply_to=reply)
                fake.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
                fake.metadata.__dict__["_src_node_id"] = 999
                forged.append(fake)
                other = Message(RecordDict(), reply_to=reply)
                other.metadata.__dict__["_reply_to_message_id"] = "msg-of-another-round"
                other.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
                foreign.append(other)
            return forged + replies + replies + foreign

    grid = Replaying(lambda msg, ctx: Message(RecordDict(), reply_to=msg), num_nodes=3)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (100, 101, 102)]
    with logged() as lines:
        got = list(stream_replies(grid, messages, timeout=5))

    assert sorted(r.metadata.src_node_id for r in got) == [100, 101, 102]  # once each
    text = "\n".join(lines)
    assert text.count("refused a reply from node 999 to the message sent to node") == 3
    assert text.count("which was already answered") == 3
    assert text.count("which this round did not send") == 3
