"""Reply validation: keys, shapes, dtypes, finite values and metrics, before anything is summed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict

from fedllama.merge import AdapterState
from fedllama.wire.codecs import Codec
from fedllama.wire.records import (
    ARRAYS,
    CLIENT_ID,
    METRICS,
    NUM_EXAMPLES,
    PHASES,
    TRAIN_LOSS,
)
from fedllama.wire.records import ReplyError as ReplyError  # raised here; callers import it here


@dataclass
class ReplySpec:
    """What a valid reply carries: encoding keys with shapes, how they travel, and the metrics.

    ``codec`` is the run's ``wire.codec``; ``keep`` the keys that travel as exact float32
    whatever the codec (the strategy's count keys, DP's indicator).
    """

    shapes: dict[str, tuple[int, ...]]
    codec: Codec = field(default_factory=Codec)
    keep: frozenset[str] = frozenset()


@dataclass
class ValidReply:
    """A reply that passed :func:`validate_reply`."""

    encoded: AdapterState
    num_examples: float
    train_loss: float
    metrics: dict[str, Any]


def validate_reply(content: RecordDict, spec: ReplySpec) -> ValidReply:
    """Decode a train reply with the run's codec, check it, return its encoding and metrics.

    Raises:
        ReplyError: a missing or extra array, a wrong shape or dtype, a corrupt payload, a bad
            codec scale or index, a NaN/Inf value, or missing or non-finite metrics. The message
            names the key.
    """
    arrays = content.array_records.get(ARRAYS)
    metrics = content.metric_records.get(METRICS)
    if arrays is None:
        raise ReplyError(f"no ArrayRecord {ARRAYS!r} in the reply")
    if metrics is None:
        raise ReplyError(f"no MetricRecord {METRICS!r} in the reply")
    tensors: AdapterState = {}
    for key, values in spec.codec.decode(arrays, spec.shapes, spec.keep).items():
        if not np.isfinite(values).all():
            raise ReplyError(f"{key}: contains NaN or Inf")
        tensors[key] = torch.from_numpy(np.array(values, copy=True))
    num_examples, train_loss = check_metrics(metrics)
    return ValidReply(tensors, num_examples, train_loss, dict(metrics))


MAX_EXAMPLES = 2**53
"""The most examples one reply may declare (float64 counts them exactly; sums cannot overflow)."""

_INT, _NUM = "an integer", "a number"
METRIC_RULES: dict[str, tuple[str, float, float]] = {
    # name: (kind, least, most) of each metric the ClientApp sends (fedllama/client/round.py)
    NUM_EXAMPLES: (_NUM, 0.0, MAX_EXAMPLES),  # and > 0
    TRAIN_LOSS: (_NUM, 0.0, math.inf),
    "client-eval-loss": (_NUM, 0.0, math.inf),
    "steps": (_INT, 0, math.inf),
    "seconds": (_NUM, 0.0, math.inf),
    "tokens": (_INT, 0, math.inf),
    "lora-rank": (_INT, 1, math.inf),
    CLIENT_ID: (_INT, 0, math.inf),
    "secagg-clipped": (_INT, 0, math.inf),
    "threads": (_INT, 1, math.inf),  # torch threads the client trained with
    **{f"time-{phase}": (_NUM, 0.0, math.inf) for phase in PHASES},
}
"""Every metric a client may send: its kind and range. A reply with any other metric, or one
out of its kind or range, is dropped before it counts."""


def _check_metric(key: str, value: Any) -> None:
    rule = METRIC_RULES.get(key)
    if rule is None:
        raise ReplyError(f"unknown metric {key!r} (known: {', '.join(sorted(METRIC_RULES))})")
    kind, least, most = rule
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (kind == _INT and not isinstance(value, int)):
        raise ReplyError(f"metric {key!r} is {value!r}, expected {kind}")
    if not math.isfinite(float(value)) or not least <= value <= most:
        span = f">= {least:g}" if math.isinf(most) else f"in [{least:g}, {most:g}]"
        raise ReplyError(f"metric {key!r} is {value!r}, expected a finite number {span}")
    if key == NUM_EXAMPLES and value <= 0:
        raise ReplyError(f"metric {key!r} is {value!r}, expected > 0")


def check_weight(encoded: AdapterState, count_keys: Iterable[str], expected: float) -> None:
    """The weight an encoding carries in its count keys (the strategy's ``count_keys``: a
    scalar weight, or a weight on each rank slot the client owns) must be the one its reply
    declares: each value 0 or ``expected`` (``num-examples``, or 1 under DP), and not all 0.

    Raises:
        ReplyError: a count value is negative, differs from ``expected``, or all are 0.
    """
    tolerance = 1e-6 * max(1.0, abs(expected))  # float32 holds integers exactly up to 2^24
    for key in count_keys:
        if key not in encoded:
            continue
        values = encoded[key].reshape(-1).double()
        wrong = values[(values != 0) & ((values - expected).abs() > tolerance)]
        if wrong.numel() or (values < 0).any() or not bool((values != 0).any()):
            shown = float(wrong[0]) if wrong.numel() else float(values.min())
            raise ReplyError(
                f"{key}: the encoded weight {shown:g} is not the declared {expected:g} "
                "(num-examples, or 1 under DP)"
            )


def check_cap(num_examples: float, cap: int) -> None:
    """``num-examples`` within ``server.max_examples`` (0: no cap); ReplyError otherwise."""
    if cap and num_examples > cap:
        raise ReplyError(
            f"metric {NUM_EXAMPLES!r} is {num_examples:g}, over server.max_examples={cap}"
        )


def check_metrics(metrics: MetricRecord | None) -> tuple[float, float]:
    """(num-examples, train-loss) of a train reply's metrics (plain or masked), after checking
    every metric against :data:`METRIC_RULES`.

    Raises:
        ReplyError: the MetricRecord is missing, a required metric is absent, or any metric
            is unknown, of the wrong kind or out of range. The message names the metric.
    """
    if metrics is None:
        raise ReplyError(f"no MetricRecord {METRICS!r} in the reply")
    for key in (NUM_EXAMPLES, TRAIN_LOSS):
        if key not in metrics:
            raise ReplyError(f"metric {key!r} is missing")
    for key, value in metrics.items():
        _check_metric(key, value)
    return float(cast(float, metrics[NUM_EXAMPLES])), float(cast(float, metrics[TRAIN_LOSS]))
