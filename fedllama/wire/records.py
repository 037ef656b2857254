"""Record keys and tensors <-> Flower records: what crosses the wire, and its size.

The record and metric names are a wire format: deployed SuperNodes depend on them.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedllama.merge import AdapterState

ARRAYS = "arrays"


class ReplyError(ValueError):
    """A client reply is malformed; the message says why."""


CONFIG = "config"


METRICS = "metrics"


CONFIG_YAML = "fedllama-config"


ROUND = "server-round"
DP_CLIP_NORM = "dp-clip-norm"
"""Train config: the round's DP clip norm C (it adapts under ``dp.adaptive_clipping``)."""


NUM_EXAMPLES = "num-examples"


TRAIN_LOSS = "train-loss"
CLIENT_ID = "client-id"
"""Metric: the client's id (its partition id in a simulation, else its node id)."""


PHASES = ("message", "view", "model", "data", "train", "eval", "encode")
"""A client round's phases, each sent as a ``time-<phase>`` metric (seconds): reading the
message (the config, the global state), building the view, loading it into the model, loading
and encoding the data, the optimizer steps, the client eval, encoding the reply."""


def to_record(state: AdapterState) -> ArrayRecord:
    """Tensors -> Flower ``ArrayRecord`` (float32: Flower's ``Array`` rejects bf16)."""
    return ArrayRecord(
        torch_state_dict={k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    )


def from_record(record: ArrayRecord) -> AdapterState:
    """Flower ``ArrayRecord`` -> float32 tensors (a float16 downlink, ``wire.downlink=fp16``,
    widened back)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)).float() for k, a in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ``ArrayRecord`` (what crosses the wire, before framing)."""
    return sum(len(a.data) for a in record.values())
