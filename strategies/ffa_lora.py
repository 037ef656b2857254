"""FFA-LoRA: federated LoRA with A frozen.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024. Every client
keeps A at its shared random initialisation (the global adapter's initial A, drawn from
``data.seed`` and sent with the global state) and trains only B. Because A is common, averaging
B is exact: Σ_k p_k B_k A = (Σ_k p_k B_k) A. Only B crosses the wire, halving the upload. With
heterogeneous ranks B's columns are averaged per slot over the clients that own them.
"""

from __future__ import annotations

from typing import ClassVar

from strategies._rank import SlotAveraged


class FFALoRA(SlotAveraged):
    """Only B is trained and averaged; A stays at its shared initialisation."""

    name: ClassVar[str] = "ffa_lora"
    dora_refusal: ClassVar[str] = (
        "averaging B alone is exact only while the model is linear in B, and DoRA "
        "(Liu et al., ICML 2024) divides W0 + s·B A by its norm"
    )

    def frozen(self, server_round: int) -> frozenset[str]:
        """A never trains."""
        return frozenset({"lora_A"})
