"""The frozen residual adapter of exact rules (FLoRA, FedEx-LoRA): its keys and algebra."""

from __future__ import annotations

from typing import cast

import torch

from fedllama.merge.interface import AdapterState, MergeStrategy, ResidualMergeStrategy
from fedllama.merge.lora import is_a, lora_pairs, pad


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
    numerical rank (:func:`fedllama.merge.lowrank.compress`), then zero-padded to one rank shared by
    every module, so the residual is one peft adapter and never grows past min(out, in).
    """
    from fedllama.merge.lowrank import compress

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
