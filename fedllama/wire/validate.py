"""Reply validation: keys, shapes, dtypes, finite values and metrics, before anything is summed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict

from fedllama.merge import AdapterState
from fedllama.wire.records import ARRAYS, METRICS, NUM_EXAMPLES, TRAIN_LOSS, WIRE_DTYPES


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
