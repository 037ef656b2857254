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
from typing import ClassVar, Protocol, cast

import torch

from fedllama.adapters import AdapterState

WEIGHT_KEY = "fedllama.weight"
"""Encoded key carrying a client's aggregation weight as a (1,) tensor."""


class MergeError(ValueError):
    """Client encodings cannot be merged (shape or key mismatch, zero total weight)."""


# LoRA state shapes follow peft: ``lora_A.weight`` is (r, in_features), ``lora_B.weight`` is
# (out_features, r); rank slot i is row i of A together with column i of B.


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


def residual_view(strategy: MergeStrategy, global_state: AdapterState, rank: int) -> AdapterState:
    """The frozen residual a client of ``rank`` installs (empty for rules without one)."""
    if not strategy.residual:
        return {}
    return cast(ResidualMergeStrategy, strategy).residual_view(global_state, rank)


RESIDUAL = "fedllama.residual."
"""Prefix of the residual adapter's factors in a global state or an aggregated delta."""


def split_residual(state: AdapterState) -> tuple[AdapterState, AdapterState]:
    """(trainable adapter keys, residual factors with the prefix removed)."""
    lora = {k: v for k, v in state.items() if not k.startswith(RESIDUAL)}
    residual = {k.removeprefix(RESIDUAL): v for k, v in state.items() if k.startswith(RESIDUAL)}
    return lora, residual


def with_prefix(residual: AdapterState) -> AdapterState:
    """Residual factors keyed for a global state (the inverse of :func:`split_residual`)."""
    return {RESIDUAL + k: v for k, v in residual.items()}


def add_residual(residual: AdapterState, increment: AdapterState) -> AdapterState:
    """Residual factors whose product is ``residual``'s plus ``increment``'s, module by module.

    The factors are stacked ([B_res, B_inc], [A_res; A_inc]) and re-factored exactly at their
    numerical rank (:func:`fedllama.lowrank.compress`), then zero-padded to one rank shared by
    every module, so the residual is one peft adapter and never grows past min(out, in).
    """
    from fedllama.lowrank import compress

    merged: AdapterState = dict(residual)
    for a_key, b_key in lora_pairs(increment):
        b, a = increment[b_key], increment[a_key]
        if a_key in residual:
            b = torch.cat([residual[b_key], b], 1)  # (out, k_res + k_inc)
            a = torch.cat([residual[a_key], a], 0)  # (k_res + k_inc, in)
        merged[b_key], merged[a_key] = compress(b, a)
    rank = max([v.shape[0] for k, v in merged.items() if is_a(k)] + [1])
    return pad(merged, rank)


def with_residual(adapter: AdapterState, residual: AdapterState, scale: float) -> AdapterState:
    """One adapter at peft scale 1 equal to ``residual`` plus ``adapter`` (at ``scale``).

    B = [B_res, scale·B], A = [A_res; A]: save it with ``r = lora_alpha = `` its rank and
    ``PeftModel.from_pretrained`` gives the whole global model with a single adapter.
    """
    out: AdapterState = {}
    for a_key, b_key in lora_pairs(adapter):
        res_a = residual.get(a_key, adapter[a_key][:0])
        res_b = residual.get(b_key, adapter[b_key][:, :0])
        out[a_key] = torch.cat([res_a, adapter[a_key]], 0)
        out[b_key] = torch.cat([res_b, scale * adapter[b_key]], 1)
    return out


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
