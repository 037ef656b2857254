"""Exact aggregation with a frozen residual adapter (shared by FLoRA and FedEx-LoRA).

Shapes follow peft: A: (r, in), B: (out, r); s = lora_alpha / r is peft's scale (lora_alpha / √r
under rsLoRA, Kalajdzievski 2023), equal for every client rank (``LoraConfig.at_rank``). Client
k starts from the global model

    W_k = W0 + R + s·B[:, :r_k] A[:r_k] + T_k,     T_k = s·B[:, r_k:] A[r_k:]

(R is the residual, T_k the slots above the client's rank, which it receives frozen inside its
residual so that every client starts from the same function), trains B_k, A_k and ends at
W0 + R + T_k + s·B_k A_k. The exact aggregate is their weighted mean,

    W' = W0 + R + Σ_k p_k T_k + s·Σ_k p_k B_k A_k,

and the new global state keeps it exactly: the rule picks the next trainable factors (B', A')
and the residual takes the rest, R' = R + Σ_k p_k T_k + s·Σ_k p_k B_k A_k − s·B' A'. Every term
is a product of factors, so the increment is sent to :func:`fedllama.merge.add_residual` as
stacked factors and never formed as an out × in matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from fedllama.config import Config
from fedllama.merge import RESIDUAL, AdapterState, MergeError, lora_pairs, split_residual
from strategies._rank import SendsFactors, check_view_rank, client_weights

Factors = tuple[torch.Tensor, torch.Tensor]
"""One module's (A: (r, in), B: (out, r))."""


class ResidualExact(SendsFactors):
    """Trusted-server rule whose merged global model equals Σ_k p_k (each client's model)."""

    name: ClassVar[str] = "residual_exact"
    residual: ClassVar[bool] = True
    dora_refusal: ClassVar[str] = (
        "the frozen residual is a plain LoRA update added outside DoRA's norm (Liu et al., ICML "
        "2024), so the merged model would not be the clients' mean"
    )

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.scale = cfg.lora.scale()
        self.seed = cfg.data.seed

    def client_view(self, global_state: AdapterState, rank: int) -> AdapterState:
        """The first ``rank`` slots of the trainable adapter (the residual travels apart)."""
        return super().client_view(split_residual(global_state)[0], rank)

    def residual_view(self, global_state: AdapterState, rank: int) -> AdapterState:
        """R ⊕ T_rank: the residual plus the trainable slots above ``rank``, all frozen."""
        lora, residual = split_residual(global_state)
        check_view_rank(self.global_rank, rank, self.name)
        tail_is_zero = all(not lora[b][:, rank:].any() for _, b in lora_pairs(lora))
        out: AdapterState = {}
        for a_key, b_key in lora_pairs(lora):
            parts_a = [residual[a_key]] if a_key in residual else []
            parts_b = [residual[b_key]] if b_key in residual else []
            if not tail_is_zero:
                parts_a.append(lora[a_key][rank:])  # (R - rank, in)
                parts_b.append(self.scale * lora[b_key][:, rank:])  # (out, R - rank)
            if parts_a:
                out[a_key] = torch.cat(parts_a, 0)
                out[b_key] = torch.cat(parts_b, 1)
        return out

    def next_adapter(
        self, trained: list[Factors], shares: list[float], current: Factors, rng: torch.Generator
    ) -> Factors:
        """The next round's trainable (A', B') of one module at the global rank.

        Args:
            trained: each client's (A_k (R, in), B_k (out, R)), zero-padded to the global rank.
            shares: p_k.
            current: the global (A, B) the round started from.
            rng: seeded by the round, for rules that re-initialise.
        """
        raise NotImplementedError

    def aggregate(
        self, encodings: Sequence[AdapterState], global_state: AdapterState, server_round: int = 0
    ) -> AdapterState:
        """Delta of the trainable factors, plus the residual increment under ``RESIDUAL``."""
        lora, _ = split_residual(global_state)
        shares, ranks = client_weights(list(encodings))
        generator = torch.Generator().manual_seed(self.seed + server_round)
        s = self.scale
        # Σ_k p_k T_k = s·B diag(u) A, u_i = Σ_k p_k [i >= r_k]: the share not owning slot i
        unowned = torch.zeros(self.global_rank)
        for p, r in zip(shares, ranks, strict=True):
            unowned[r:] += p
        out: AdapterState = {}
        for a_key, b_key in lora_pairs(lora):
            a, b = lora[a_key], lora[b_key]
            trained = [(e[a_key], e[b_key]) for e in encodings]
            new_a, new_b = self.next_adapter(trained, shares, (a, b), generator)
            inc_b = [s * b * unowned[None, :]]
            inc_a = [a]
            for (a_k, b_k), p, r in zip(trained, shares, ranks, strict=True):
                inc_b.append(s * p * b_k[:, :r])  # (out, r_k)
                inc_a.append(a_k[:r])  # (r_k, in)
            if new_b.any():
                inc_b.append(-s * new_b)
                inc_a.append(new_a)
            out[RESIDUAL + b_key] = torch.cat(inc_b, 1)
            out[RESIDUAL + a_key] = torch.cat(inc_a, 0)
            out[a_key] = new_a - a
            out[b_key] = new_b - b
        if len(out) != 2 * len(lora):
            raise MergeError(f"{self.name} merges only LoRA A and B weights")
        return out
