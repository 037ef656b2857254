"""The merge-strategy interface and the summable aggregation path (DESIGN.md §2).

Every strategy turns a client's delta into fixed-shape tensors (``encode``); the server needs
only their **sum**, which :class:`SumAccumulator` builds one reply at a time (so memory does not
grow with the number of clients), and ``decode`` turns the sum into the aggregated delta in the
strategy's global form. Secure aggregation changes only who computes the sum.

Strategies live in ``strategies/`` (plain torch, one file each) and implement
:class:`MergeStrategy`; this module does not import them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar, Protocol

import torch

from fedllama.adapters import AdapterState

WEIGHT_KEY = "fedllama.weight"
"""Encoded key carrying a client's aggregation weight as a (1,) tensor."""


class MergeError(ValueError):
    """Client encodings cannot be merged (shape or key mismatch, zero total weight)."""


class MergeStrategy(Protocol):
    """How the server merges client adapter deltas.

    ``summable`` strategies need only the sum of the client encodings, so secure aggregation can
    protect them; trusted-server strategies need the individual encodings.
    """

    name: ClassVar[str]
    summable: ClassVar[bool]
    mixed_ranks: ClassVar[bool]
    """Whether clients of different LoRA ranks can take part."""
    local: ClassVar[frozenset[str]]
    """Factors each client trains but keeps to itself across rounds (never sent)."""

    def frozen(self, server_round: int) -> frozenset[str]:
        """LoRA factors (``"lora_A"``, ``"lora_B"``) clients keep fixed in ``server_round``.

        Frozen factors are neither trained nor sent; ``decode`` returns a zero delta for them.
        """
        ...

    def init_global(self, initial: AdapterState) -> AdapterState:
        """Global state from the initial adapter (peft's fresh init at ``lora.r``)."""
        ...

    def client_view(self, global_state: AdapterState, rank: int) -> AdapterState:
        """Adapter weights a client of LoRA rank ``rank`` starts its round from."""
        ...

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """Fixed-shape tensors a client sends for its ``delta`` (trained - view).

        ``view`` is the client's starting point (rules that weigh the trained factors, such as
        HetLoRA's norms, need it); ``weight`` is its example count.

        ``delta`` holds the trained (not frozen) keys of the client's view, at the client's
        rank; the encoding's shapes must not depend on that rank, so that encodings can be
        summed (and, under secure aggregation, masked) elementwise.
        """
        ...

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """Aggregated delta for every key of ``global_state``, from the sum of the encodings."""
        ...


class TrustedMergeStrategy(MergeStrategy, Protocol):
    """A rule that needs each client's encoding, not only their sum (``summable = False``).

    The server holds every reply of the round, so secure aggregation cannot protect it.
    """

    def aggregate(
        self, encodings: Sequence[AdapterState], global_state: AdapterState
    ) -> AdapterState:
        """Aggregated delta for every key of ``global_state`` from the individual encodings."""
        ...


def frozen_key(key: str, frozen: frozenset[str]) -> bool:
    """Whether an adapter key belongs to a frozen factor (``...lora_A.weight`` for "lora_A")."""
    return any(f".{factor}." in key for factor in frozen)


class SumAccumulator:
    """Running sum of encodings, checked key by key and shape by shape against the first."""

    def __init__(self) -> None:
        self.total: AdapterState = {}
        self.count = 0

    def add(self, encoded: AdapterState) -> None:
        """Add one client's encoding (raises :class:`MergeError` on a mismatch)."""
        if self.count == 0:
            self.total = {k: v.detach().to(torch.float32).clone() for k, v in encoded.items()}
        else:
            if set(encoded) != set(self.total):
                raise MergeError(
                    f"encoding keys differ from the first reply's: "
                    f"{sorted(set(encoded) ^ set(self.total))[:3]}"
                )
            for k, v in encoded.items():
                if v.shape != self.total[k].shape:
                    raise MergeError(
                        f"{k}: shape {tuple(v.shape)}, expected {tuple(self.total[k].shape)}"
                    )
                self.total[k].add_(v)
        self.count += 1


def weighted_mean(summed: AdapterState, keys: Iterable[str]) -> AdapterState:
    """``summed[k] / Σw`` for each key, where the sum carries the total weight at WEIGHT_KEY."""
    total = float(summed[WEIGHT_KEY][0])
    if total <= 0:
        raise MergeError(f"total client weight is {total}; nothing to average")
    return {k: summed[k] / total for k in keys}
