"""FedSA-LoRA: share A, keep B.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025.
A matrices learn general knowledge and are shared and averaged; B matrices capture each
client's specifics and never leave the client: each client trains both, sends only ΔA, and
keeps its own B across rounds (saved on its disk, so it survives restarts). With mixed ranks A's
rows are averaged per slot over the clients that own them.

The global adapter's B stays at its initialisation (zero), so the server's global eval measures
the shared A alone; each client's personalised model is scored by its ``client-eval-loss``.
"""

from __future__ import annotations

from typing import ClassVar

from strategies._rank import SlotAveraged


class FedSALoRA(SlotAveraged):
    """ΔA averaged (per slot); B is local to each client."""

    name: ClassVar[str] = "fedsa_lora"
    local: ClassVar[frozenset[str]] = frozenset({"lora_B"})
