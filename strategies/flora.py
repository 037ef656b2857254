"""FLoRA: stacking-based exact aggregation of heterogeneous LoRA.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024. Every round each client k trains a freshly initialised LoRA
(A random, B = 0) at its own rank r_k; the server stacks the factors, B_s = [p_1 B_1 … p_K B_K]
and A_s = [A_1; …; A_K], so that B_s A_s = Σ_k p_k B_k A_k exactly — no cross terms, whatever
the ranks — and the clients add that product to their model weights before re-initialising.

Here the accumulated update is never merged into the (4-bit) base: it lives in the frozen
residual adapter of the global state (see ``strategies._residual``), which clients install
next to the fresh trainable adapter. The fresh A of round t+1 is drawn like peft's init
(Kaiming-uniform, bound 1/√in) from ``data.seed`` + t, so runs are reproducible.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from strategies._residual import Factors, ResidualExact


class FLoRA(ResidualExact):
    """R' = R + Σ_k p_k s·B_k A_k; the trainable adapter restarts fresh every round."""

    name: ClassVar[str] = "flora"

    def next_adapter(
        self, trained: list[Factors], shares: list[float], current: Factors, rng: torch.Generator
    ) -> Factors:
        """A fresh peft-style init: A ~ U(-1/√in, 1/√in), B = 0."""
        a, b = current
        bound = 1.0 / a.shape[1] ** 0.5
        fresh = (torch.rand(a.shape, generator=rng) * 2 - 1) * bound
        return fresh, torch.zeros_like(b)
