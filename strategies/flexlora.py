"""FlexLoRA, in a dense (summable) and a factored (trusted-server) form.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024. Each client k trains LoRA at its own rank r_k; the server forms the
weighted sum of the full products W = Σ_k p_k B_k A_k (p_k ∝ examples), takes its SVD
W = U S Vᵀ and gives client k the rank-r_k truncation. We split the singular values evenly,
B = U_R S_R^½ and A = S_R^½ V_Rᵀ at the global rank R, so that a client's first r_k slots are
exactly the best rank-r_k approximation of W.

Dense, summable form (``strategy.flexlora_form=dense``): client k sends p_k·(B_k'A_k' − B_k A_k),
the dense change of its product over its view, plus a weighted slot mask m_k. Since the views
are truncations of the global factors, Σ_k p_k B_k A_k = B diag(Σ_k p_k m_k) A, so the server
recovers W from sums alone. The dense
encoding is large (out × in per module).

Factored, trusted-server form (``factored``): clients send their trained factors; the server
stacks B_s = [p_1 B_1 … p_K B_K] and A_s = [A_1; …; A_K] (so W = B_s A_s), takes QR of B_s and
A_sᵀ and the SVD of the small (Σr_k)² core: W = (Q_b U) S (Q_a V)ᵀ, never forming the out × in
matrix. Same result as dense up to floating point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from fedllama.config import Config
from fedllama.merge import AdapterState, MergeError, MergeStrategy, is_a, is_b, lora_pairs, rank_of
from fedllama.merge.lowrank import product_svd, split_singular
from strategies._rank import SLOT_WEIGHT, SendsFactors, SlotAveraged, client_weights, module_of

DENSE = "fedllama.dense."
DORA_REFUSAL = (
    "it re-factors the clients' mean product Σ p_k B_k A_k, and under DoRA (Liu et al., ICML "
    "2024) a client's update is m_k (W0 + s·B_k A_k) / ‖W0 + s·B_k A_k‖, not s·B_k A_k"
)


class FlexLoRA(SlotAveraged):
    """Σ_k p_k B_k A_k, SVD, truncate to each client's rank."""

    name: ClassVar[str] = "flexlora"
    robust_refusal: ClassVar[str] = (
        "it factorises the weighted mean of the clients' products B_k A_k with their views; a "
        "coordinate-wise statistic of the product updates would not match the views' weights"
    )
    dora_refusal: ClassVar[str] = DORA_REFUSAL

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """Per module ``w·(B'A' − B A)`` (out, in), plus the weighted slot mask."""
        if view is None:
            raise MergeError("flexlora needs the client's view to form its product update")
        mask = self.slot_mask(rank_of(view), weight)
        encoded: AdapterState = {}
        for key, b_key in lora_pairs(delta):
            before = view[b_key] @ view[key]  # (out, r) @ (r, in)
            after = (view[b_key] + delta[b_key]) @ (view[key] + delta[key])
            encoded[DENSE + module_of(key)] = (after - before) * weight
        if 2 * len(encoded) != len(delta):
            raise MergeError("flexlora needs the A and B delta of every module")
        encoded[SLOT_WEIGHT] = mask
        return encoded

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """Rebuild W per module, SVD it, and return the change of the rank-R factors."""
        slots = summed[SLOT_WEIGHT]
        total = float(slots[0])  # every client owns slot 0
        if total <= 0:
            raise MergeError(f"total client weight is {total}; nothing to average")
        out: AdapterState = {}
        for key, b_key in lora_pairs(global_state):
            a, b = global_state[key], global_state[b_key]
            views = (b * (slots / total)[None, :]) @ a  # Σ p_k B[:, :r_k] A[:r_k]
            w = views + summed[DENSE + module_of(key)] / total
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            new_b, new_a = split_singular(u, s, vh, self.global_rank)
            out[b_key] = new_b - b
            out[key] = new_a - a
        missing = set(global_state) - set(out)
        if missing or any(not (is_a(k) or is_b(k)) for k in global_state):
            raise MergeError(
                f"flexlora merges only LoRA A and B weights; got {sorted(missing)[:3]}"
            )
        return out


class FlexLoRAFactored(SendsFactors):
    """FlexLoRA from the clients' factors: QR of the stacked factors, SVD of the small core."""

    name: ClassVar[str] = "flexlora"
    dora_refusal: ClassVar[str] = DORA_REFUSAL

    def aggregate(
        self, encodings: Sequence[AdapterState], global_state: AdapterState, server_round: int = 0
    ) -> AdapterState:
        """W = Σ_k p_k B_k A_k through QR + a (Σr_k)² SVD; return the change of the factors."""
        shares, ranks = client_weights(list(encodings))
        out: AdapterState = {}
        for key, b_key in lora_pairs(global_state):
            # B_s: (out, Σr) with p_k folded in; A_s: (Σr, in); W = B_s A_s
            b_s = torch.cat(
                [e[b_key][:, :r] * p for e, r, p in zip(encodings, ranks, shares, strict=True)], 1
            )
            a_s = torch.cat([e[key][:r] for e, r in zip(encodings, ranks, strict=True)], 0)
            new_b, new_a = split_singular(*product_svd(b_s, a_s), self.global_rank)
            out[b_key] = new_b - global_state[b_key]
            out[key] = new_a - global_state[key]
        if set(out) != set(global_state):
            raise MergeError("flexlora merges only LoRA A and B weights")
        return out


def build(cfg: Config) -> MergeStrategy:
    """FlexLoRA in the form ``strategy.flexlora_form`` asks for."""
    return FlexLoRAFactored(cfg) if cfg.strategy.flexlora_form == "factored" else FlexLoRA(cfg)
