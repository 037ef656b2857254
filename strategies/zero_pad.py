"""Zero-padding aggregation for heterogeneous LoRA ranks.

The baseline of HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024): every client's A and B are zero-padded to the global rank R and
averaged with example-count weights; each client then receives the first r_k slots. A slot only
some clients own is diluted by the others' zeros.
"""

from __future__ import annotations

from typing import ClassVar

from fedllama.merge import WEIGHT_KEY, AdapterState, weighted_mean
from strategies._rank import SLOT_WEIGHT, SlotAveraged


class ZeroPad(SlotAveraged):
    """Δ = Σ_k w_k pad(Δ_k) / Σ_k w_k; client k gets G[:r_k]."""

    name: ClassVar[str] = "zero_pad"
    count_keys: ClassVar[frozenset[str]] = frozenset({WEIGHT_KEY})

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """``w·Δ`` padded to the global rank, plus the weight (no slot mask needed)."""
        encoded = super().encode(delta, weight)
        encoded[WEIGHT_KEY] = encoded.pop(SLOT_WEIGHT)[:1].clone()  # slot 0 carries w
        return encoded

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """The weighted mean over all clients, padded zeros included."""
        return weighted_mean(summed, global_state)
