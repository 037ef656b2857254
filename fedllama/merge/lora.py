"""LoRA factor bookkeeping: which keys are A and B, a state's rank, zero padding."""

from __future__ import annotations

import torch

from fedllama.merge.interface import AdapterState, MergeError


def is_a(key: str) -> bool:
    """A LoRA down-projection (A) key."""
    return key.endswith("lora_A.weight")


def is_b(key: str) -> bool:
    """A LoRA up-projection (B) key."""
    return key.endswith("lora_B.weight")


def lora_pairs(state: AdapterState) -> list[tuple[str, str]]:
    """(A key, B key) of every adapted module in ``state``."""
    return [(k, k.replace("lora_A", "lora_B")) for k in state if is_a(k)]


def rank_of(state: AdapterState) -> int:
    """The LoRA rank of an adapter state (rows of its A matrices)."""
    ranks = {int(v.shape[0]) for k, v in state.items() if is_a(k)}
    ranks |= {int(v.shape[1]) for k, v in state.items() if is_b(k)}
    if len(ranks) != 1:
        raise MergeError(f"adapter state has no single LoRA rank: {sorted(ranks)}")
    return ranks.pop()


def pad(state: AdapterState, rank: int) -> AdapterState:
    """Zero-pad A rows and B columns up to ``rank`` slots."""
    out = {}
    for key, value in state.items():
        if is_a(key):
            out[key] = torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])])
        elif is_b(key):
            out[key] = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1])], 1)
        else:
            out[key] = value
    return out
