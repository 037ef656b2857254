"""The merge-strategy interface (docs/architecture.md, "The aggregation path").

Every strategy turns a client's delta into fixed-shape tensors (``encode``); a summable one's
server needs only their **sum**, which ``fedllama.merge.sum.SumAccumulator`` builds one reply
at a time (so memory does not grow with the number of clients), and ``decode`` turns the sum
into the aggregated delta in the strategy's global form. Secure aggregation changes only who
computes the sum.

Strategies live in ``strategies/`` (plain torch, one file each) and implement
:class:`MergeStrategy`; this module does not import them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch

AdapterState = dict[str, torch.Tensor]
"""Adapter tensors by peft state-dict key (without the adapter name), or a strategy's encoding."""

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
    residual: ClassVar[bool]
    """Whether the global state carries a frozen residual adapter (ResidualMergeStrategy)."""
    count_keys: ClassVar[frozenset[str]]
    """Encoding keys that carry the client's weight, not its update. Under differential privacy
    clients weigh 1, clip the other keys as one vector, and the server releases these as the
    expected number of clients (``fedllama.privacy.dp``)."""
    dp_refusal: ClassVar[str]
    """Why client-level DP cannot protect this rule; empty when it can. Empty also means that
    an encoding is its weight times the client's update plus count keys, which is what the
    server's norm bound (``robust.norm_bound``) needs too."""
    robust_refusal: ClassVar[str]
    """Why a robust combiner (``robust.combiner``: median, trimmed mean, Krum) cannot stand in
    for this rule's mean; empty when it can (``fedllama.merge.robust``)."""
    dora_refusal: ClassVar[str]
    """Why this rule cannot merge DoRA's magnitude vectors (``lora.use_dora``; Liu et al., ICML
    2024); empty when it can (docs/adapters.md)."""
    dense_refusal: ClassVar[str]
    """Why this rule cannot merge a dense adapter (``adapter.kind``: LLaMA-Adapter, IA³, prompt
    or prefix tuning: no LoRA factors, one shape on every client); empty when it can."""

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
        self, encodings: Sequence[AdapterState], global_state: AdapterState, server_round: int = 0
    ) -> AdapterState:
        """Aggregated delta for every key of ``global_state`` from the individual encodings of
        round ``server_round``."""
        ...


class ResidualMergeStrategy(TrustedMergeStrategy, Protocol):
    """An exact rule that keeps what the trainable adapter cannot hold in a frozen residual.

    FLoRA and FedEx-LoRA "merge into W" in their papers; writing into a 4-bit base is lossy, so
    the accumulated update lives instead in the global state under :data:`RESIDUAL` as low-rank
    factors (B_res A_res is the update itself, peft's scale already applied), which every client
    and the server's evaluator install as a second, frozen LoRA adapter. In an aggregated delta
    the :data:`RESIDUAL` keys are *increments* (B_inc, A_inc): :func:`add_residual` adds their
    product by stacking factors.
    """

    scale: float
    """peft's ``lora_alpha / r`` of the trainable adapter (equal for every client rank)."""

    def residual_view(self, global_state: AdapterState, rank: int) -> AdapterState:
        """Frozen residual factors (B: (out, k), A: (k, in)) a client of ``rank`` installs."""
        ...


def frozen_key(key: str, frozen: frozenset[str]) -> bool:
    """Whether an adapter key belongs to a frozen factor (``...lora_A.weight`` for "lora_A")."""
    return any(f".{factor}." in key for factor in frozen)
