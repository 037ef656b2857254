"""HetLoRA: heterogeneous LoRA ranks with sparsity-weighted aggregation.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024. Clients train at their own ranks r_k ≤ R; the server zero-pads each client's trained
factors to R and averages them with weights proportional to the Frobenius norm of the client's
reconstructed update, p_k = ||B_k A_k||_F / Σ_j ||B_j A_j||_F (larger, less sparse updates
count more), then truncates the result to each client's rank. Norms are taken per LoRA module
(each adapted layer is merged with its own weights). Rank self-pruning is not implemented.

Summable form: with trained_k = view_k + Δ_k, the paper's rule is
G' = Σ_k p_k pad(view_k + Δ_k) = (G ⊙ Σ_k n_k m_k + Σ_k n_k pad(Δ_k)) / Σ_k n_k, where n_k is the
client's norm and m_k its slot mask; so each client sends n_k·pad(Δ_k), n_k·m_k and n_k per
module, and the server needs only their sums.

DoRA (Liu et al., ICML 2024): a module's magnitude vector m belongs to the module and is merged
with the module's weights, m' = Σ_k n_k m_k / Σ_k n_k, so each client sends n_k·Δm_k.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedllama.merge import AdapterState, MergeError, is_a, is_b, lora_pairs, pad, rank_of
from fedllama.merge.lora import MAGNITUDE, is_magnitude
from strategies._rank import SlotAveraged, module_of

NORM = "fedllama.norm."
SLOTS = "fedllama.slot_norm."


class HetLoRA(SlotAveraged):
    """Zero-pad, weight each module by its ||B_k A_k||_F, truncate per client."""

    name: ClassVar[str] = "hetlora"
    dp_refusal: ClassVar[str] = (
        "it weighs each client's update by the norms of its trained factors, which depend on "
        "its data; under DP every client must weigh the same"
    )
    robust_refusal: ClassVar[str] = (
        "it weighs each module by the norm of the client's trained factors, which a robust "
        "statistic (every client weighing the same) would discard"
    )

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """Per module: n·pad(Δ) (and n·Δm under DoRA), n on the owned slots, and
        n = ||B A||_F of the trained factors."""
        if view is None:
            raise MergeError("hetlora needs the client's view to weigh its trained factors")
        rank = rank_of(view)
        padded = pad(delta, self.global_rank)
        encoded: AdapterState = {}
        for key, b_key in lora_pairs(delta):
            module = module_of(key)
            trained_a = view[key] + delta[key]  # A: (r, in)
            trained_b = view[b_key] + delta[b_key]  # B: (out, r)
            norm = torch.linalg.matrix_norm(trained_b @ trained_a).reshape(1).float()
            encoded[key] = padded[key] * norm
            encoded[b_key] = padded[b_key] * norm
            magnitude = f"{module}.{MAGNITUDE}"
            if magnitude in delta:
                encoded[magnitude] = delta[magnitude] * norm  # m: (out,)
            slots = torch.zeros(self.global_rank)
            slots[:rank] = norm
            encoded[NORM + module] = norm
            encoded[SLOTS + module] = slots
        if len(encoded) != len(delta) + 2 * len(lora_pairs(delta)):
            raise MergeError("hetlora needs the A and B delta of every module")
        return encoded

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """G' = (G ⊙ Σ n·m + Σ n·pad(Δ)) / Σ n per module (for a DoRA magnitude, owned by every
        client: G + Σ n·Δm / Σ n); returns G' - G."""
        out = {}
        for key, g in global_state.items():
            module = module_of(key)
            total = float(summed[NORM + module][0])
            if total <= 0:
                out[key] = torch.zeros_like(g)  # no client changed this module
                continue
            slots = summed[SLOTS + module]
            if is_a(key):
                new = (g * slots[:, None] + summed[key]) / total
            elif is_b(key):
                new = (g * slots[None, :] + summed[key]) / total
            elif is_magnitude(key):
                new = g + summed[key] / total
            else:
                raise MergeError(f"{key}: hetlora merges only LoRA A and B weights")
            out[key] = new - g
        return out
