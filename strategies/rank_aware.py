"""Rank-aware averaging for heterogeneous LoRA ranks.

Each rank slot i (row i of A, column i of B) is averaged only over the clients whose rank
covers it, weighted by example counts: Δ[i] = Σ_{k: r_k > i} w_k Δ_k[i] / Σ_{k: r_k > i} w_k.
Unlike zero-padding, a slot trained by few (high-rank) clients is not diluted by the zeros of
the others. It stays summable: clients also send a weighted slot mask whose sum is the per-slot
denominator (see ``strategies._rank.SlotAveraged``).
"""

from __future__ import annotations

from typing import ClassVar

from strategies._rank import SlotAveraged


class RankAware(SlotAveraged):
    """Per-slot weighted mean over the clients that own the slot."""

    name: ClassVar[str] = "rank_aware"
