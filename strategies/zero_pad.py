"""Zero-padding aggregation for heterogeneous LoRA ranks.

The baseline of HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024): every client's *trained* A and B are zero-padded to the global
rank R and averaged with example-count weights p_k; each client then receives the first r_k
slots. A slot only some clients own is diluted by the others' zeros.

Clients send deltas, so the rule is applied to what they imply: client k's trained factors are
G[:r_k] + Δ_k, and slot i of the new global adapter is Σ_{k owns i} p_k·(G_i + Δ_{k,i}). The
aggregated delta is therefore Σ_k p_k·pad(Δ_k)_i − (1 − P_i)·G_i, with P_i the weight share of
the clients that own slot i: the non-owners' zeros pull the slot towards zero. DoRA's
magnitude vectors (Liu et al., ICML 2024) are owned by every client: their weighted mean.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedllama.merge import WEIGHT_KEY, AdapterState, MergeError, is_a, is_b
from fedllama.merge.lora import is_magnitude
from strategies._rank import SLOT_WEIGHT, SlotAveraged


class ZeroPad(SlotAveraged):
    """Δ_i = Σ_k w_k pad(Δ_k)_i / W − (1 − W_i / W)·G_i; client k gets G[:r_k]."""

    name: ClassVar[str] = "zero_pad"
    count_keys: ClassVar[frozenset[str]] = frozenset({WEIGHT_KEY, SLOT_WEIGHT})
    robust_refusal: ClassVar[str] = (
        "zero-padding counts a client that does not own a rank slot as a vote for zero there; "
        "a robust statistic over the owners (use rank_aware) or over implied zeros is not "
        "HetLoRA's baseline"
    )

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """``w·Δ`` padded to the global rank, the weighted slot mask, and the weight."""
        encoded = super().encode(delta, weight)
        encoded[WEIGHT_KEY] = torch.tensor([float(weight)])
        return encoded

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """The weighted mean of the padded deltas, minus the share of each slot that the
        clients not owning it pad with zeros, times the slot's global value."""
        total = float(summed[WEIGHT_KEY][0])
        if total <= 0:
            raise MergeError(f"total client weight is {total}; nothing to average")
        padded = 1.0 - summed[SLOT_WEIGHT] / total  # (R,): 1 − P_i
        out = {}
        for key, value in global_state.items():
            if is_a(key):  # A: (R, in); slot i is row i
                out[key] = summed[key] / total - padded[:, None] * value
            elif is_b(key):  # B: (out, R); slot i is column i
                out[key] = summed[key] / total - padded[None, :] * value
            elif is_magnitude(key):  # m: (out,); every client owns it
                out[key] = summed[key] / total
            else:
                raise MergeError(f"{key}: {self.name} merges only LoRA A and B weights")
        return out
