"""FedAvg (FedIT) on plain tensors, against numbers computed by hand."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedllama.merge import WEIGHT_KEY, MergeError, SumAccumulator
from strategies.fedavg import FedAvg

A = "base_model.model.layer.q_proj.lora_A.weight"
B = "base_model.model.layer.q_proj.lora_B.weight"


def _merge(strategy: FedAvg, deltas: list[dict[str, torch.Tensor]], weights: list[float]):
    acc = SumAccumulator()
    for delta, w in zip(deltas, weights, strict=True):
        acc.add(strategy.encode(delta, w))
    return strategy.decode(acc.total, deltas[0])


def test_fedavg_matches_hand_computed_weighted_mean() -> None:
    # client 1: 10 examples, client 2: 30 examples -> weights 1/4 and 3/4
    d1 = {A: torch.tensor([[1.0, 2.0]]), B: torch.tensor([[4.0], [0.0]])}
    d2 = {A: torch.tensor([[5.0, -2.0]]), B: torch.tensor([[0.0], [8.0]])}
    out = _merge(FedAvg(), [d1, d2], [10, 30])
    assert torch.allclose(out[A], torch.tensor([[4.0, -1.0]]))  # 0.25*[1,2] + 0.75*[5,-2]
    assert torch.allclose(out[B], torch.tensor([[1.0], [6.0]]))  # 0.25*[4,0] + 0.75*[0,8]
    assert set(out) == {A, B}, "the weight key is consumed by decode"


def test_encode_scales_by_weight_and_carries_it() -> None:
    enc = FedAvg().encode({A: torch.ones(2, 3)}, 4.0)
    assert torch.equal(enc[A], torch.full((2, 3), 4.0))
    assert enc[WEIGHT_KEY].tolist() == [4.0]


def test_client_order_does_not_change_the_result() -> None:
    torch.manual_seed(0)
    deltas = [{A: torch.randn(4, 8), B: torch.randn(8, 4)} for _ in range(3)]
    weights = [3.0, 1.0, 7.0]
    results = [
        _merge(FedAvg(), [deltas[i] for i in order], [weights[i] for i in order])
        for order in itertools.permutations(range(3))
    ]
    for r in results[1:]:
        for k in (A, B):
            assert torch.allclose(r[k], results[0][k], atol=1e-6)


def test_one_client_in_gives_its_update_out() -> None:
    delta = {A: torch.randn(4, 8), B: torch.randn(8, 4)}
    out = _merge(FedAvg(), [delta], [17.0])
    for k in delta:
        assert torch.allclose(out[k], delta[k], atol=1e-6)


def test_client_view_refuses_another_rank() -> None:
    state = {A: torch.zeros(4, 8), B: torch.zeros(8, 4)}
    assert FedAvg().client_view(state, 4)[A].shape == (4, 8)
    with pytest.raises(MergeError, match="global rank 4, got a client of rank 8"):
        FedAvg().client_view(state, 8)


def test_non_positive_weight_is_rejected() -> None:
    with pytest.raises(MergeError, match="weight must be > 0"):
        FedAvg().encode({A: torch.ones(1)}, 0.0)


def test_accumulator_rejects_mismatched_shapes_and_keys() -> None:
    acc = SumAccumulator()
    acc.add({A: torch.ones(2, 2)})
    with pytest.raises(MergeError, match=r"shape \(3, 2\), expected \(2, 2\)"):
        acc.add({A: torch.ones(3, 2)})
    with pytest.raises(MergeError, match="keys differ"):
        acc.add({B: torch.ones(2, 2)})
