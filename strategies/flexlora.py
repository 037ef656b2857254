"""FlexLoRA, dense (summable) form.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024. Each client k trains LoRA at its own rank r_k; the server forms the
weighted sum of the full products W = Σ_k p_k B_k A_k (p_k ∝ examples), takes its SVD
W = U S Vᵀ and gives client k the rank-r_k truncation. We split the singular values evenly,
B = U_R S_R^½ and A = S_R^½ V_Rᵀ at the global rank R, so that a client's first r_k slots are
exactly the best rank-r_k approximation of W.

Summable form: client k sends p_k·(B_k'A_k' − B_k A_k), the dense change of its product over its
view, plus a weighted slot mask m_k. Since the views are truncations of the global factors,
Σ_k p_k B_k A_k = B diag(Σ_k p_k m_k) A, so the server recovers W from sums alone. The dense
encoding is large (out × in per module); the factored, trusted-server form is still to come.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedllama.adapters import AdapterState
from fedllama.merge import MergeError
from strategies._rank import SLOT_WEIGHT, SlotAveraged, is_a, is_b, module_of, rank_of

DENSE = "fedllama.dense."


class FlexLoRA(SlotAveraged):
    """Σ_k p_k B_k A_k, SVD, truncate to each client's rank."""

    name: ClassVar[str] = "flexlora"

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """Per module ``w·(B'A' − B A)`` (out, in), plus the weighted slot mask."""
        if weight <= 0:
            raise MergeError(f"a client's weight must be > 0, got {weight}")
        if view is None:
            raise MergeError("flexlora needs the client's view to form its product update")
        encoded: AdapterState = {}
        for key in delta:
            if not is_a(key):
                continue
            b_key = key.replace("lora_A", "lora_B")
            before = view[b_key] @ view[key]  # (out, r) @ (r, in)
            after = (view[b_key] + delta[b_key]) @ (view[key] + delta[key])
            encoded[DENSE + module_of(key)] = (after - before) * weight
        if 2 * len(encoded) != len(delta):
            raise MergeError("flexlora needs the A and B delta of every module")
        mask = torch.zeros(self.global_rank)
        mask[: rank_of(view)] = weight
        encoded[SLOT_WEIGHT] = mask
        return encoded

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """Rebuild W per module, SVD it, and return the change of the rank-R factors."""
        slots = summed[SLOT_WEIGHT]
        total = float(slots[0])  # every client owns slot 0
        if total <= 0:
            raise MergeError(f"total client weight is {total}; nothing to average")
        out: AdapterState = {}
        for key, a in global_state.items():
            if not is_a(key):
                continue
            b_key = key.replace("lora_A", "lora_B")
            b = global_state[b_key]
            views = (b * (slots / total)[None, :]) @ a  # Σ p_k B[:, :r_k] A[:r_k]
            w = views + summed[DENSE + module_of(key)] / total
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = s[: self.global_rank].sqrt()
            out[b_key] = u[:, : self.global_rank] * root[None, :] - b
            out[key] = root[:, None] * vh[: self.global_rank] - a
        missing = set(global_state) - set(out)
        if missing or any(not (is_a(k) or is_b(k)) for k in global_state):
            raise MergeError(
                f"flexlora merges only LoRA A and B weights; got {sorted(missing)[:3]}"
            )
        return out
