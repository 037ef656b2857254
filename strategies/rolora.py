"""RoLoRA: alternating optimisation of the LoRA factors.

Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA" (2024).
In odd rounds every client trains only A (B frozen), in even rounds only B (A frozen); only the
trained factor is sent and averaged. With the other factor fixed and shared, averaging is exact:
Σ_k p_k B A_k = B (Σ_k p_k A_k). Heterogeneous ranks: the trained factor is averaged per slot
over the clients that own the slot.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedllama.merge import AdapterState, is_b
from strategies._rank import SlotAveraged


class RoLoRA(SlotAveraged):
    """Round t trains A if t is odd, B if t is even."""

    name: ClassVar[str] = "rolora"
    dora_refusal: ClassVar[str] = (
        "averaging one factor while the other is shared is exact only while the model is linear "
        "in that factor, and DoRA (Liu et al., ICML 2024) divides W0 + s·B A by its norm"
    )

    def frozen(self, server_round: int) -> frozenset[str]:
        """The factor not trained this round."""
        return frozenset({"lora_B"} if server_round % 2 == 1 else {"lora_A"})

    def init_global(self, initial: AdapterState) -> AdapterState:
        """The initial adapter, with B drawn small and random instead of peft's zeros.

        With B = 0 the gradient of A is zero, so round 1 (A only) would learn nothing; RoLoRA
        initialises both factors. B ~ N(0, 1/r²), drawn from a fixed seed.
        """
        generator = torch.Generator().manual_seed(0)
        out = {}
        for key, value in initial.items():
            if is_b(key) and not value.any():
                out[key] = torch.randn(value.shape, generator=generator) / value.shape[1]
            else:
                out[key] = value.clone()
        return out
