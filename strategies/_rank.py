"""Rank bookkeeping shared by the heterogeneous-rank strategies (plain torch).

Shapes follow peft: ``lora_A.weight`` is (r, in_features), ``lora_B.weight`` is (out_features, r).
Rank slot i is row i of A together with column i of B. DoRA's magnitude vectors (m:
(out_features,), Liu et al., ICML 2024) have no slots: every client owns all of m.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedllama.config import Config
from fedllama.merge import AdapterState, MergeError, is_a, is_b, pad, rank_of
from fedllama.merge.lora import is_magnitude


def module_of(key: str) -> str:
    """The adapted layer a LoRA key belongs to (``...q_proj`` of ``...q_proj.lora_A.weight``)."""
    return key.rsplit(".lora_", 1)[0]


def truncate(state: AdapterState, rank: int) -> AdapterState:
    """The first ``rank`` slots: A[:rank], B[:, :rank]."""
    out = {}
    for key, value in state.items():
        if is_a(key):
            out[key] = value[:rank].clone()
        elif is_b(key):
            out[key] = value[:, :rank].clone()
        else:
            out[key] = value.clone()
    return out


def check_view_rank(global_rank: int, rank: int, strategy: str) -> None:
    """A client's rank must be between 1 and the global rank."""
    if not 1 <= rank <= global_rank:
        raise MergeError(
            f"strategy {strategy} serves ranks 1..{global_rank} (lora.r), got a client of rank "
            f"{rank}"
        )


SLOT_WEIGHT = "fedllama.slot_weight"
"""(R,) tensor a client sends: its weight on the rank slots it owns, 0 on the others."""


class SlotAveraged:
    """Base of the summable heterogeneous-rank strategies.

    The global state is the adapter at the global rank R (``lora.r``); client k's view is its
    first r_k slots. A client encodes ``w_k·Δ_k`` zero-padded to R plus a weighted slot mask;
    the server divides the summed slot i by the summed mask at i, so each slot is the weighted
    mean over the clients that own it. Factors a client did not send get a zero delta. A DoRA
    magnitude vector is owned by every client, so it is divided by the total weight (the weight
    on slot 0, which every client owns): the example-weighted mean of the magnitudes.
    Subclasses choose which factors are frozen in which round.
    """

    name: ClassVar[str] = "slot_averaged"
    summable: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = True
    local: ClassVar[frozenset[str]] = frozenset()
    residual: ClassVar[bool] = False
    count_keys: ClassVar[frozenset[str]] = frozenset({SLOT_WEIGHT})
    dp_refusal: ClassVar[str] = ""
    robust_refusal: ClassVar[str] = ""
    dora_refusal: ClassVar[str] = ""
    dense_refusal: ClassVar[str] = (
        "it averages LoRA's rank slots (rows of A, columns of B) and a dense adapter has none; "
        "its example-weighted average is strategy fedavg"
    )

    def __init__(self, cfg: Config) -> None:
        self.global_rank = cfg.lora.r

    def frozen(self, server_round: int) -> frozenset[str]:
        """Both factors train."""
        return frozenset()

    def init_global(self, initial: AdapterState) -> AdapterState:
        """The adapter at the global rank."""
        return {k: v.clone() for k, v in initial.items()}

    def client_view(self, global_state: AdapterState, rank: int) -> AdapterState:
        """The first ``rank`` slots of the global adapter."""
        check_view_rank(rank_of(global_state), rank, self.name)
        return truncate(global_state, rank)

    def slot_mask(self, rank: int, weight: float) -> torch.Tensor:
        """(R,): ``weight`` on the ``rank`` slots a client owns, 0 on the others."""
        if weight <= 0:
            raise MergeError(f"a client's weight must be > 0, got {weight}")
        mask = torch.zeros(self.global_rank)
        mask[:rank] = weight
        return mask

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """``w·Δ`` padded to the global rank, plus the weighted slot mask."""
        mask = self.slot_mask(rank_of(delta), weight)
        encoded = pad({k: v.float() * weight for k, v in delta.items()}, self.global_rank)
        encoded[SLOT_WEIGHT] = mask
        return encoded

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """Slot i divided by the total weight of the clients owning it (0 where none does)."""
        slots = summed[SLOT_WEIGHT]
        if float(slots.sum()) <= 0:
            raise MergeError("no client owns any rank slot; nothing to average")
        inverse = torch.where(slots > 0, 1.0 / slots.clamp_min(1e-30), torch.zeros_like(slots))
        out = {}
        for key, value in global_state.items():
            if key not in summed:
                out[key] = torch.zeros_like(value)  # a frozen factor
            elif is_a(key):
                out[key] = summed[key] * inverse[:, None]  # A: (R, in); scale row i
            elif is_b(key):
                out[key] = summed[key] * inverse[None, :]  # B: (out, R); scale column i
            elif is_magnitude(key):
                out[key] = summed[key] * inverse[0]  # m: (out,); every client owns slot 0
            else:
                raise MergeError(f"{key}: {self.name} merges only LoRA A and B weights")
        return out


class SendsFactors(SlotAveraged):
    """Base of the trusted-server rules that need each client's trained factors.

    A client sends its trained A and B (view + Δ) zero-padded to the global rank, plus the
    weighted slot mask from which the server reads the client's weight and rank. There is no
    sum form: the server merges the individual encodings in ``aggregate``.
    """

    summable: ClassVar[bool] = False
    dp_refusal: ClassVar[str] = (
        "it is a trusted-server rule: it merges each client's factors non-linearly, while "
        "DP-FedAvg's sensitivity bound holds for a sum of clipped updates"
    )
    robust_refusal: ClassVar[str] = (
        "it is a trusted-server rule that merges each client's trained factors non-linearly; "
        "a coordinate-wise statistic of them is not the rule's merge"
    )
    dora_refusal: ClassVar[str] = (
        "it is a trusted-server rule that merges each client's product B_k A_k, and under DoRA "
        "a client's update is not s·B_k A_k but m_k (W0 + s·B_k A_k) / ‖W0 + s·B_k A_k‖"
    )
    dense_refusal: ClassVar[str] = (
        "it is a trusted-server rule that merges each client's LoRA product B_k A_k, which a "
        "dense adapter does not have"
    )

    def encode(
        self, delta: AdapterState, weight: float, view: AdapterState | None = None
    ) -> AdapterState:
        """The trained factors padded to the global rank, plus the weighted slot mask."""
        if view is None:
            raise MergeError(f"{self.name} needs the client's view to send its trained factors")
        trained = pad({k: view[k] + delta[k] for k in delta}, self.global_rank)
        return {**trained, SLOT_WEIGHT: self.slot_mask(rank_of(delta), weight)}

    def decode(self, summed: AdapterState, global_state: AdapterState) -> AdapterState:
        """Not available: this rule needs each client's factors (see ``aggregate``)."""
        raise MergeError(f"{self.name} is a trusted-server rule; it has no sum form")


def client_weights(encodings: list[AdapterState]) -> tuple[list[float], list[int]]:
    """Each encoding's share p_k = w_k / Σw and rank r_k, read off its slot mask."""
    weights = [float(e[SLOT_WEIGHT][0]) for e in encodings]
    total = sum(weights)
    if not encodings or total <= 0:
        raise MergeError(f"total client weight is {total}; nothing to merge")
    ranks = [int((e[SLOT_WEIGHT] > 0).sum()) for e in encodings]
    return [w / total for w in weights], ranks
