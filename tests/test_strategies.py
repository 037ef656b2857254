"""Merge strategies on plain tensors: each paper's rule by hand, then registry-wide contracts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import strategies
from fedllama import adapters, config
from fedllama.client import NodeSettings, client_state_path
from fedllama.merge import MergeError, SumAccumulator, frozen_key
from tests.conftest import tiny_config
from tests.grid import InProcessGrid, run

A = "base_model.model.layers.0.q_proj.lora_A.weight"  # (r, in=2)
B = "base_model.model.layers.0.q_proj.lora_B.weight"  # (out=2, r)
R = 2


def _cfg(name: str, rank: int = R) -> config.Config:
    return config.load(None, [f"strategy.name={name}", f"lora.r={rank}"])


def _merge(name: str, deltas: list[dict[str, torch.Tensor]], weights: list[float], rnd: int = 1):
    strategy = strategies.build(_cfg(name))
    frozen = strategy.frozen(rnd) | strategy.local  # factors not sent
    acc = SumAccumulator()
    for delta, w in zip(deltas, weights, strict=True):
        acc.add(strategy.encode({k: v for k, v in delta.items() if not frozen_key(k, frozen)}, w))
    global_state = {A: torch.zeros(R, 2), B: torch.zeros(2, R)}
    return strategy.decode(acc.total, global_state)


# client 1 at rank 1, client 2 at rank 2, equal weights
RANK1 = {A: torch.tensor([[1.0, 1.0]]), B: torch.tensor([[2.0], [2.0]])}
RANK2 = {A: torch.tensor([[3.0, 3.0], [5.0, 5.0]]), B: torch.tensor([[4.0, 6.0], [4.0, 6.0]])}


def test_zero_pad_averages_padded_zeros_into_high_slots() -> None:
    out = _merge("zero_pad", [RANK1, RANK2], [1, 1])
    assert out[A].tolist() == [[2.0, 2.0], [2.5, 2.5]]  # row 1: (0 + 5) / 2
    assert out[B].tolist() == [[3.0, 3.0], [3.0, 3.0]]  # col 1: (0 + 6) / 2


def test_rank_aware_averages_each_slot_over_its_owners() -> None:
    out = _merge("rank_aware", [RANK1, RANK2], [1, 3])
    assert out[A].tolist() == [[2.5, 2.5], [5.0, 5.0]]  # row 0: (1·1 + 3·3) / 4; row 1: 5
    assert out[B].tolist() == [[3.5, 6.0], [3.5, 6.0]]  # col 0: (1·2 + 3·4) / 4; col 1: 6


def test_ffa_lora_averages_b_only() -> None:
    out = _merge("ffa_lora", [RANK1, RANK2], [1, 1])
    assert out[A].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert out[B].tolist() == [[3.0, 6.0], [3.0, 6.0]]


def test_fedsa_lora_averages_a_and_leaves_b_to_the_clients() -> None:
    out = _merge("fedsa_lora", [RANK1, RANK2], [1, 3])
    assert out[A].tolist() == [[2.5, 2.5], [5.0, 5.0]]  # per slot, like rank_aware
    assert not out[B].any()


def test_rolora_alternates_a_then_b() -> None:
    odd = _merge("rolora", [RANK1, RANK2], [1, 1], rnd=1)
    assert odd[A].tolist() == [[2.0, 2.0], [5.0, 5.0]] and not odd[B].any()
    even = _merge("rolora", [RANK1, RANK2], [1, 1], rnd=2)
    assert even[B].tolist() == [[3.0, 6.0], [3.0, 6.0]] and not even[A].any()


def test_hetlora_weights_modules_by_the_norm_of_the_trained_update() -> None:
    strategy = strategies.build(_cfg("hetlora"))
    zero1 = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    zero2 = {A: torch.zeros(2, 2), B: torch.zeros(2, 2)}
    c1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[3.0], [4.0]])}  # ||B A||_F = 5
    c2 = {A: torch.eye(2), B: torch.tensor([[0.0, 0.0], [0.0, 12.0]])}  # ||B A||_F = 12
    acc = SumAccumulator()
    acc.add(strategy.encode(c1, 10.0, zero1))  # example counts do not enter HetLoRA's weights
    acc.add(strategy.encode(c2, 1.0, zero2))

    out = strategy.decode(acc.total, {A: torch.zeros(2, 2), B: torch.zeros(2, 2)})

    # A: row 0 (5·[1,0] + 12·[1,0]) / 17; row 1 (12·[0,1]) / 17
    assert torch.allclose(out[A], torch.tensor([[1.0, 0.0], [0.0, 12 / 17]]))
    # B: col 0 (5·[3,4] + 12·[0,0]) / 17; col 1 (12·[0,12]) / 17
    assert torch.allclose(out[B], torch.tensor([[15 / 17, 0.0], [20 / 17, 144 / 17]]))


def test_flexlora_svd_of_the_weighted_product_sum_truncates_per_rank() -> None:
    strategy = strategies.build(_cfg("flexlora"))
    zero1 = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    zero2 = {A: torch.zeros(2, 2), B: torch.zeros(2, 2)}
    c1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[2.0], [0.0]])}  # B A = [[2,0],[0,0]]
    c2 = {A: torch.eye(2), B: torch.tensor([[0.0, 0.0], [0.0, 3.0]])}  # B A = [[0,0],[0,3]]
    acc = SumAccumulator()
    acc.add(strategy.encode(c1, 1.0, zero1))
    acc.add(strategy.encode(c2, 1.0, zero2))
    g = {A: torch.zeros(2, 2), B: torch.zeros(2, 2)}

    new = {k: g[k] + d for k, d in strategy.decode(acc.total, g).items()}

    w = torch.tensor([[1.0, 0.0], [0.0, 1.5]])  # (B1 A1 + B2 A2) / 2
    assert torch.allclose(new[B] @ new[A], w, atol=1e-6)
    rank1 = strategy.client_view(new, 1)  # best rank-1 approximation: the 1.5 direction
    assert torch.allclose(rank1[B] @ rank1[A], torch.tensor([[0.0, 0.0], [0.0, 1.5]]), atol=1e-6)
    assert torch.allclose(new[B].norm(dim=0), torch.tensor([1.5, 1.0]).sqrt(), atol=1e-6)


@pytest.mark.parametrize(("name", "rnd"), [("ffa_lora", 1), ("rolora", 1), ("rolora", 2)])
def test_merge_is_exact_when_one_factor_is_shared(name: str, rnd: int) -> None:
    torch.manual_seed(0)
    strategy = strategies.build(_cfg(name, rank=4))
    frozen = strategy.frozen(rnd) | strategy.local  # factors not sent
    shared = {A: torch.randn(4, 6), B: torch.randn(5, 4)}
    weights = [1.0, 2.0, 5.0]
    trained = [
        {k: v + torch.randn_like(v) * (not frozen_key(k, frozen)) for k, v in shared.items()}
        for _ in weights
    ]
    acc = SumAccumulator()
    for t, w in zip(trained, weights, strict=True):
        acc.add(strategy.encode({k: t[k] - shared[k] for k in t if not frozen_key(k, frozen)}, w))
    merged = {k: shared[k] + d for k, d in strategy.decode(acc.total, shared).items()}

    p = [w / sum(weights) for w in weights]
    exact = sum(pk * (t[B] @ t[A]) for pk, t in zip(p, trained, strict=True))
    assert torch.allclose(merged[B] @ merged[A], exact, atol=1e-5)


# ---------------------------------------------------------------- contracts over the registry

HETERO = sorted(n for n in strategies.REGISTRY if n != "fedavg")


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_registry_builds_each_name_with_a_summable_flag(name: str) -> None:
    built = strategies.build(_cfg(name))
    assert built.name == name and isinstance(built.summable, bool)


def test_unknown_strategy_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="valid: fedavg, fedsa_lora, ffa_lora, flexlora, hetlora, rank_aware,"
    ):
        strategies.build(_cfg("nope"))


def _random_global(rank: int) -> dict[str, torch.Tensor]:
    return {A: torch.randn(rank, 6), B: torch.randn(5, rank)}


@pytest.mark.parametrize("name", HETERO)
def test_views_have_the_client_rank_and_encodings_do_not(name: str) -> None:
    strategy = strategies.build(_cfg(name, rank=4))
    global_state = strategy.init_global(_random_global(4))
    shapes = set()
    for rank in (1, 2, 4):
        view = strategy.client_view(global_state, rank)
        assert view[A].shape == (rank, 6) and view[B].shape == (5, rank)
        assert view[A].dtype == torch.float32
        frozen = strategy.frozen(1) | strategy.local
        enc = strategy.encode(
            {k: v for k, v in view.items() if not frozen_key(k, frozen)}, 1.0, view
        )
        shapes.add(tuple(sorted((k, tuple(v.shape)) for k, v in enc.items())))
    assert len(shapes) == 1, "encodings of every rank must be summable elementwise"
    with pytest.raises(MergeError, match="serves ranks 1..4"):
        strategy.client_view(global_state, 5)


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
@pytest.mark.parametrize("rnd", [1, 2])
def test_client_order_is_irrelevant_and_one_client_gives_its_update(name: str, rnd: int) -> None:
    torch.manual_seed(1)
    strategy = strategies.build(_cfg(name, rank=4))
    global_state = strategy.init_global(_random_global(4))
    frozen = strategy.frozen(rnd) | strategy.local  # factors not sent
    ranks = [4] * 3 if name == "fedavg" else [4, 2, 3]
    views = [strategy.client_view(global_state, r) for r in ranks]
    deltas = [
        {
            k: torch.randn_like(v)
            for k, v in strategy.client_view(global_state, r).items()
            if not frozen_key(k, frozen)
        }
        for r in ranks
    ]
    weights = [2.0, 1.0, 4.0]

    def merged(order: tuple[int, ...]) -> dict[str, torch.Tensor]:
        acc = SumAccumulator()
        for i in order:
            acc.add(strategy.encode(deltas[i], weights[i], views[i]))
        return strategy.decode(acc.total, global_state)

    def product(delta: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
        return (base[B] + delta.get(B, 0)) @ (base[A] + delta.get(A, 0))

    reference = merged((0, 1, 2))
    for order in itertools.permutations(range(3)):
        out = merged(order)
        assert torch.allclose(
            product(out, global_state), product(reference, global_state), atol=1e-4
        )
        if name != "flexlora":  # factor by factor, too, where the rule is per factor
            assert all(torch.allclose(out[k], reference[k], atol=1e-6) for k in reference)
    assert set(reference) == set(global_state)
    alone = merged((0,))  # one full-rank client in -> its update out
    if name == "flexlora":  # the rule re-factorises the product: compare B·A
        assert torch.allclose(product(alone, global_state), product(deltas[0], views[0]), atol=1e-4)
        return
    for k, v in global_state.items():
        expected = torch.zeros_like(v) if frozen_key(k, frozen) else deltas[0][k]
        assert torch.allclose(alone[k], expected, atol=1e-6)


# ---------------------------------------------------------------- federations with mixed ranks


@pytest.mark.parametrize(
    ("name", "extra"), [*((n, "") for n in HETERO), ("flexlora", "strategy.flexlora_form=factored")]
)
def test_mixed_rank_federation_writes_adapters_peft_loads_at_each_rank(
    name: str, extra: str, cache_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    overrides = [f"strategy.name={name}", "lora.client_ranks=[2,3,4]", *([extra] if extra else [])]
    cfg = tiny_config(cache_dir, out, *overrides)

    rows = run(InProcessGrid(3), cfg)

    assert [r["clients_ok"] for r in rows[1:]] == [3, 3]
    assert sorted(c["lora-rank"] for c in rows[1]["clients"]) == [2, 3, 4]
    base = json.loads((out / "round-002" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    for rank, sub in ((4, ""), (2, "rank-02"), (3, "rank-03")):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base), out / "round-002" / sub
        )
        assert model.peft_config["default"].r == rank
        # lora_alpha scales with the rank so that alpha / r (peft's scale) is the same everywhere
        assert model.peft_config["default"].lora_alpha / rank == cfg.lora.lora_alpha / cfg.lora.r


def test_fedavg_with_mixed_client_ranks_is_refused_before_the_run() -> None:
    import server.app

    cfg = config.load(None, ["lora.r=8", "lora.client_ranks=[4,8]"])
    with pytest.raises(
        config.ConfigError, match=r"strategy fedavg needs every client at lora.r=8.*\[4\]"
    ):
        server.app.check(cfg)
    server.app.check(
        config.load(None, ["lora.r=8", "lora.client_ranks=[4,8]", "strategy.name=rank_aware"])
    )


def test_flexlora_factored_equals_dense() -> None:
    torch.manual_seed(3)
    dense = strategies.build(config.load(None, ["strategy.name=flexlora", "lora.r=8"]))
    factored = strategies.build(
        config.load(None, ["strategy.name=flexlora", "lora.r=8", "strategy.flexlora_form=factored"])
    )
    assert dense.summable and not factored.summable
    g = dense.init_global({A: torch.randn(8, 12), B: torch.randn(10, 8)})
    ranks, weights = [2, 8, 4, 6], [3.0, 1.0, 2.0, 5.0]
    views = [dense.client_view(g, r) for r in ranks]
    deltas = [{k: torch.randn_like(v) for k, v in view.items()} for view in views]
    acc = SumAccumulator()
    for d, w, v in zip(deltas, weights, views, strict=True):
        acc.add(dense.encode(d, w, v))
    from_dense = dense.decode(acc.total, g)
    encodings = [factored.encode(d, w, v) for d, w, v in zip(deltas, weights, views, strict=True)]

    from_factored = factored.aggregate(encodings, g)  # type: ignore[attr-defined]

    for rank in (8, 4, 1):  # every client's view agrees, not only the full product
        x = dense.client_view({k: g[k] + from_dense[k] for k in g}, rank)
        y = dense.client_view({k: g[k] + from_factored[k] for k in g}, rank)
        assert torch.allclose(x[B] @ x[A], y[B] @ y[A], atol=1e-4)
    with pytest.raises(MergeError, match="trusted-server rule"):
        factored.decode(acc.total, g)


def test_fedsa_lora_clients_keep_their_own_b_across_rounds_and_restarts(
    cache_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "run"
    overrides = ["strategy.name=fedsa_lora", "lora.client_ranks=[2,4]"]
    cfg = tiny_config(cache_dir, out, *overrides, "server.rounds=1")
    run(InProcessGrid(2), cfg)
    mine = [client_state_path(cfg, NodeSettings(partition_id=p)) for p in (0, 1)]
    assert all(p.is_file() for p in mine)
    after_1 = {p: load_file(str(p)) for p in mine}
    assert all(k.endswith("lora_B.weight") for s in after_1.values() for k in s)
    assert all(v.any() for s in after_1.values() for v in s.values()), "B trained locally"
    global_b = adapters.load_adapter(out / "round-001")[0]
    assert not any(v.any() for k, v in global_b.items() if k.endswith("lora_B.weight"))

    rows = run(InProcessGrid(2), tiny_config(cache_dir, out, *overrides))  # a restart: resume

    assert [r["round"] for r in rows] == [0, 1, 2]
    for path, before in after_1.items():
        now = load_file(str(path))
        assert any(not torch.equal(now[k], before[k]) for k in before), "B kept training"
