"""LoRA factor bookkeeping: which keys are A, B and DoRA magnitudes, a state's rank, zero padding.

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024) adds one trained
magnitude vector per adapted layer, m: (out_features,), under peft's key
``...<module>.lora_magnitude_vector``. It has no rank slots: its shape is the same at every client
rank, so padding and truncation leave it as it is and every client owns all of it.
"""

from __future__ import annotations

import torch

from fedllama.merge.interface import AdapterState, MergeError


def is_a(key: str) -> bool:
    """A LoRA down-projection (A) key."""
    return key.endswith("lora_A.weight")


def is_b(key: str) -> bool:
    """A LoRA up-projection (B) key."""
    return key.endswith("lora_B.weight")


MAGNITUDE = "lora_magnitude_vector"
"""The end of a DoRA magnitude key in peft's adapter state dict (``get_peft_model_state_dict``)."""


def is_magnitude(key: str) -> bool:
    """A DoRA magnitude vector key (m: (out_features,))."""
    return key.endswith(MAGNITUDE)


def lora_pairs(state: AdapterState) -> list[tuple[str, str]]:
    """(A key, B key) of every adapted module in ``state``."""
    return [(k, k.replace("lora_A", "lora_B")) for k in state if is_a(k)]


def is_dense(state: AdapterState) -> bool:
    """A state without LoRA factors: a dense adapter (``adapter.kind``: LLaMA-Adapter, IA³,
    prompt or prefix tuning), the same shapes on every client."""
    return not any(is_a(key) or is_b(key) for key in state)


EXPERTS = ".experts."
"""In a key: peft's LoRA on a mixture-of-experts model's fused expert parameters
(``lora.target_parameters``), whose factors hold r rank slots per expert (r x experts)."""


def is_expert(key: str) -> bool:
    """A LoRA factor on fused expert parameters: not r slots wide, so no rank is read off it
    (only ``fedavg`` merges it, element by element)."""
    return EXPERTS in key


def rank_of(state: AdapterState) -> int:
    """The LoRA rank of an adapter state (rows of its A matrices; expert factors, r slots per
    expert, left out)."""
    ranks = {int(v.shape[0]) for k, v in state.items() if is_a(k) and not is_expert(k)}
    ranks |= {int(v.shape[1]) for k, v in state.items() if is_b(k) and not is_expert(k)}
    if len(ranks) != 1:
        raise MergeError(f"adapter state has no single LoRA rank: {sorted(ranks)}")
    return ranks.pop()


def pad(state: AdapterState, rank: int) -> AdapterState:
    """Zero-pad A rows and B columns up to ``rank`` slots (other keys, e.g. DoRA's magnitudes,
    are rank-free and kept as they are)."""
    out = {}
    for key, value in state.items():
        if is_a(key):
            out[key] = torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])])
        elif is_b(key):
            out[key] = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1])], 1)
        else:
            out[key] = value
    return out
