"""FedAvg / FedIT over LoRA deltas.

FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024) averages the LoRA factors A and B separately, weighted by example counts, exactly
as FedAvg (McMahan et al., AISTATS 2017) averages model weights. Every client must train at the
global rank: a rank mismatch is refused (heterogeneous ranks need another strategy).

DoRA (Liu et al., ICML 2024): the magnitude vectors are trained tensors like A and B and are
averaged the same way, m' = Σ_k w_k m_k / Σ_k w_k. So is every tensor of a dense adapter
(``adapter.kind``: LLaMA-Adapter, IA³, prompt and prefix tuning): FedAvg itself.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedllama.config import Config
from fedllama.merge import WEIGHT_KEY, AdapterState, MergeError, is_dense, rank_of, weighted_mean


class FedAvg:
    """Weighted average of A and B separately: Δ = Σ_k w_k Δ_k / Σ_k w_k."""

    name: ClassVar[str] = "fedavg"
    summable: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False
    local: ClassVar[frozenset[str]] = frozenset()
    residual: ClassVar[bool] = False
    count_keys: ClassVar[frozenset[str]] = frozenset({WEIGHT_KEY})
    dp_refusal: ClassVar[str] = ""
    robust_refusal: ClassVar[str] = ""
    dora_refusal: ClassVar[str] = ""
    dense_refusal: ClassVar[str] = ""

    def __init__(self, cfg: Config | None = None) -> None:
        """FedAvg has no settings."""

    def frozen(self, server_round: int) -> frozenset[str]:
        """Both factors train."""
        return frozenset()

    def init_global(self, initial: AdapterState) -> AdapterState:
        """The global state is the adapter itself."""
        return {k: v.clone() for k, v in initial.items()}

    def client_view(self, global_state: AdapterState, rank: int) -> AdapterState:
        """The global adapter, unchanged; refuses a client rank other than the global one."""
        if is_dense(global_state):  # adapter.kind other than lora: one shape, no rank
            return {k: v.clone() for k, v in global_state.items()}
        global_rank = rank_of(global_state)
        if rank != global_rank:
            raise MergeError(
                f"strategy fedavg needs every client at the global rank {global_rank}, "
                f"got a client of rank {rank}"
            )
        return {k: v.clone() for k, v in global_state.items()}

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """``{key: w·Δ_key}`` (A, B and DoRA's magnitudes alike) plus the weight itself."""
        if weight <= 0:
            raise MergeError(f"a client's weight must be > 0, got {weight}")
        encoded = {k: v.to(torch.float32) * weight for k, v in delta.items()}
        encoded[WEIGHT_KEY] = torch.tensor([float(weight)])
        return encoded

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """Divide the weighted sum by the total weight."""
        return weighted_mean(summed, global_state)
