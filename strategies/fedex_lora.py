"""FedEx-LoRA: exact aggregation of LoRA through a residual.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025. Clients train A and B from the global adapter; the server
averages them as FedIT does (Ā = Σ_k p_k A_k, B̄ = Σ_k p_k B_k) and keeps the error of that
average, Σ_k p_k B_k A_k − B̄ Ā, which the paper adds to the frozen pretrained weights, so the
global model is exactly the clients' weighted mean.

Here the error accumulates in the frozen residual adapter of the global state instead of the
(4-bit) base (see ``strategies._residual``). The paper trains every client at one rank; with
mixed ranks the factors are zero-padded before averaging and each client receives the global
slots above its rank inside its frozen residual, so every client still starts from exactly
the global model.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from strategies._residual import Factors, ResidualExact


class FedExLoRA(ResidualExact):
    """(A', B') = (Σ p_k A_k, Σ p_k B_k); R' = R + Σ_k p_k s·B_k A_k − s·B̄ Ā (+ the tails)."""

    name: ClassVar[str] = "fedex_lora"

    def next_adapter(
        self, trained: list[Factors], shares: list[float], current: Factors, rng: torch.Generator
    ) -> Factors:
        """FedIT's averages of the padded factors."""
        mean_a = sum(p * a_k for (a_k, _), p in zip(trained, shares, strict=True))
        mean_b = sum(p * b_k for (_, b_k), p in zip(trained, shares, strict=True))
        return torch.as_tensor(mean_a), torch.as_tensor(mean_b)
