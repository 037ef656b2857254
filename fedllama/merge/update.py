"""The server's update of the global state from an aggregated delta."""

from __future__ import annotations

from fedllama.merge.interface import AdapterState
from fedllama.merge.optimizer import ServerOptimizer
from fedllama.merge.residual import add_residual, split_residual, with_prefix


def apply_delta(
    global_state: AdapterState, delta: AdapterState, optimizer: ServerOptimizer
) -> AdapterState:
    """The next global state: the optimizer steps the trainable adapter, and a residual
    increment (exact strategies) is added to the residual's product."""
    lora, residual = split_residual(global_state)
    lora_delta, increment = split_residual(delta)
    stepped = optimizer.step(lora, lora_delta)
    if increment:
        residual = add_residual(residual, increment)
    return {**stepped, **with_prefix(residual)}
