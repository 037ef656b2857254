"""Merge strategies on plain tensors: each paper's rule by hand, then registry-wide contracts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import strategies
from fedllama import config
from fedllama.client.settings import NodeSettings, client_state_path
from fedllama.merge import (
    RESIDUAL,
    MergeError,
    MergeStrategy,
    SumAccumulator,
    add_residual,
    frozen_key,
    residual_view,
    split_residual,
    with_prefix,
)
from fedllama.merge.lowrank import compress
from fedllama.merge.optimizer import ServerSGD
from fedllama.merge.update import apply_delta
from fedllama.model import adapters
from tests.harness import InProcessGrid, run, tiny_config

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


def test_zero_pad_averages_the_padded_trained_factors_of_hetloras_baseline() -> None:
    strategy = strategies.build(_cfg("zero_pad"))
    g = {A: torch.tensor([[10.0, 20.0], [30.0, 40.0]]), B: torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    acc = SumAccumulator()
    for delta, w in ((RANK1, 1.0), (RANK2, 3.0)):
        acc.add(strategy.encode(delta, w))

    new = apply_delta(g, strategy.decode(acc.total, g), ServerSGD(lr=1.0))

    # the published rule by hand: pad each client's trained factors G[:r] + Δ with zeros,
    # average with p = (1/4, 3/4)
    trained1 = {A: g[A][:1] + RANK1[A], B: g[B][:, :1] + RANK1[B]}
    trained2 = {A: g[A] + RANK2[A], B: g[B] + RANK2[B]}
    pad1 = {
        A: torch.cat([trained1[A], torch.zeros(1, 2)]),
        B: torch.cat([trained1[B], torch.zeros(2, 1)], 1),
    }
    for key in (A, B):
        torch.testing.assert_close(new[key], 0.25 * pad1[key] + 0.75 * trained2[key])
    assert new[A][1].tolist() == [0.75 * 35.0, 0.75 * 45.0]  # slot 1 shrinks: client 1 pads 0


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


# ---------------------------------------------------------------- exact rules with a residual


def _merge_encodings(
    strategy: MergeStrategy,
    encodings: list[dict[str, torch.Tensor]],
    global_state: dict[str, torch.Tensor],
    rnd: int = 1,
) -> dict[str, torch.Tensor]:
    """The aggregated delta, through the sum (summable rules) or the individual encodings."""
    if not strategy.summable:
        return strategy.aggregate(encodings, global_state, rnd)  # type: ignore[attr-defined]
    acc = SumAccumulator()
    for e in encodings:
        acc.add(e)
    return strategy.decode(acc.total, global_state)


def _apply(
    global_state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return apply_delta(global_state, delta, ServerSGD(1.0))


def _effective(
    strategy: MergeStrategy,
    global_state: dict[str, torch.Tensor],
    rank: int,
    trained: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The update of a client of ``rank``'s model: its residual + s·B A (``trained`` or view)."""
    view = trained if trained is not None else strategy.client_view(global_state, rank)
    scale = strategy.scale  # type: ignore[attr-defined]
    update = scale * view[B] @ view[A]
    residual = residual_view(strategy, global_state, rank)
    return update + residual[B] @ residual[A] if residual else update


def _with_residual(strategy: MergeStrategy, rank: int) -> dict[str, torch.Tensor]:
    """A global state that already holds a residual and a trained (non-zero) adapter."""
    g = strategy.init_global({A: torch.randn(rank, 6), B: torch.randn(5, rank)})
    return {**g, **with_prefix({A: torch.randn(3, 6), B: torch.randn(5, 3)})}


def test_flora_stacks_the_clients_products_into_the_residual_and_restarts_fresh() -> None:
    strategy = strategies.build(
        config.load(None, ["strategy.name=flora", "lora.r=2", "lora.lora_alpha=4"])
    )  # s = 2
    g = strategy.init_global({A: torch.ones(2, 2), B: torch.zeros(2, 2)})  # peft init: B = 0
    c1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [0.0]])}  # rank 1
    c2 = {A: torch.tensor([[0.0, 1.0], [1.0, 1.0]]), B: torch.tensor([[0.0, 0.0], [2.0, 0.0]])}
    views = [strategy.client_view(g, 1), strategy.client_view(g, 2)]
    encodings = [
        strategy.encode({k: c[k] - v[k] for k in v}, w, v)
        for c, v, w in zip((c1, c2), views, (1.0, 3.0), strict=True)
    ]

    new = _apply(g, strategy.aggregate(encodings, g, 1))

    # R' = s·(1/4·B1 A1 + 3/4·B2 A2) = 2·(1/4·[[1,0],[0,0]] + 3/4·[[0,0],[0,2]])
    residual = split_residual(new)[1]
    assert torch.allclose(
        residual[B] @ residual[A], torch.tensor([[0.5, 0.0], [0.0, 3.0]]), atol=1e-6
    )
    assert not new[B].any(), "the trainable adapter restarts with B = 0"
    assert new[A].abs().max() <= 2**-0.5 and not torch.equal(new[A], g[A]), "a fresh A"
    again = _apply(g, strategy.aggregate(encodings, g, 1))
    assert torch.equal(again[A], new[A]), "the fresh A is drawn from data.seed + round"


def test_fedex_lora_averages_the_factors_and_keeps_the_error_in_the_residual() -> None:
    strategy = strategies.build(config.load(None, ["strategy.name=fedex_lora", "lora.r=1"]))
    s = strategy.scale  # type: ignore[attr-defined]
    g = strategy.init_global({A: torch.zeros(1, 2), B: torch.zeros(2, 1)})
    c1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [0.0]])}
    c2 = {A: torch.tensor([[0.0, 1.0]]), B: torch.tensor([[0.0], [1.0]])}
    encodings = [strategy.encode(c, 1.0, g) for c in (c1, c2)]  # deltas from a zero view

    new = _apply(g, strategy.aggregate(encodings, g, 1))

    assert new[A].tolist() == [[0.5, 0.5]] and new[B].tolist() == [[0.5], [0.5]]  # FedIT's mean
    residual = split_residual(new)[1]
    # Σ p_k B_k A_k - B̄ Ā = diag(.5, .5) - .25·ones, at peft's scale s
    error = torch.tensor([[0.25, -0.25], [-0.25, 0.25]])
    assert torch.allclose(residual[B] @ residual[A], s * error, atol=1e-6)


@pytest.mark.parametrize("name", ["flora", "fedex_lora"])
def test_exact_rules_merge_to_the_weighted_mean_of_the_client_models(name: str) -> None:
    torch.manual_seed(5)
    strategy = strategies.build(config.load(None, [f"strategy.name={name}", "lora.r=4"]))
    g = _with_residual(strategy, 4)
    full = _effective(strategy, g, 4)
    for rank in (1, 2, 3):  # every client starts from the same function, whatever its rank
        assert torch.allclose(_effective(strategy, g, rank), full, atol=1e-5)
    ranks, weights = [4, 2, 3], [2.0, 1.0, 4.0]
    views = [strategy.client_view(g, r) for r in ranks]
    deltas = [{k: torch.randn_like(v) for k, v in view.items()} for view in views]
    encodings = [strategy.encode(d, w, v) for d, w, v in zip(deltas, weights, views, strict=True)]

    new = _apply(g, strategy.aggregate(encodings, g, 1))

    p = [w / sum(weights) for w in weights]
    target = sum(
        pk * _effective(strategy, g, r, {k: v[k] + d[k] for k in v})
        for pk, r, v, d in zip(p, ranks, views, deltas, strict=True)
    )
    for rank in (4, 3, 2, 1):  # Σ p_k B_k A_k to 1e-5, seen from every rank
        assert torch.allclose(_effective(strategy, new, rank), target, rtol=1e-5, atol=1e-5)


def test_add_residual_is_exact_capped_at_full_rank_and_one_rank_for_all_modules() -> None:
    torch.manual_seed(2)
    a2, b2 = A.replace("q_proj", "k_proj"), B.replace("q_proj", "k_proj")
    residual = {
        A: torch.randn(2, 6),
        B: torch.randn(5, 2),
        a2: torch.randn(2, 3),
        b2: torch.randn(4, 2),
    }
    increment = {
        A: torch.randn(7, 6),
        B: torch.randn(5, 7),
        a2: torch.randn(1, 3),
        b2: torch.randn(4, 1),
    }

    out = add_residual(residual, increment)

    for a_key, b_key in ((A, B), (a2, b2)):
        expected = residual[b_key] @ residual[a_key] + increment[b_key] @ increment[a_key]
        assert torch.allclose(out[b_key] @ out[a_key], expected, atol=1e-5)
    assert out[A].shape == (5, 6), "rank capped at min(out, in) = 5"
    assert out[a2].shape == (5, 3) and out[b2].shape == (4, 5), "padded to the shared rank"


def test_lowrank_compress_drops_only_round_off() -> None:
    torch.manual_seed(4)
    b, a = torch.randn(8, 3), torch.randn(3, 9)
    stacked_b, stacked_a = torch.cat([b, b, -b], 1), torch.cat([a, a, a], 0)  # rank 3 in 9 columns

    new_b, new_a = compress(stacked_b, stacked_a)

    assert new_b.shape == (8, 3) and new_a.shape == (3, 9)
    assert torch.allclose(new_b @ new_a, b @ a, atol=1e-5)
    zero_b, zero_a = compress(torch.zeros(8, 2), torch.zeros(2, 9))
    assert zero_b.shape == (8, 0) and zero_a.shape == (0, 9)


def test_exact_rules_refuse_a_server_optimizer_before_the_run() -> None:
    import server.app

    for bad in ("server.optimizer=adam", "server.lr=0.5"):
        with pytest.raises(config.ConfigError, match="strategy flora is exact.*server.lr=1.0"):
            server.app.check(config.load(None, ["strategy.name=flora", bad]))
    server.app.check(config.load(None, ["strategy.name=flora"]))


# ---------------------------------------------------------------- contracts over the registry

HETERO = sorted(n for n in strategies.REGISTRY if n != "fedavg")


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_registry_builds_each_name_with_a_summable_flag(name: str) -> None:
    built = strategies.build(_cfg(name))
    assert built.name == name and isinstance(built.summable, bool)


def test_unknown_strategy_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match="valid: fedavg, fedex_lora, fedsa_lora, ffa_lora, flexlora, flora, hetlora, rank_",
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
        encodings = [strategy.encode(deltas[i], weights[i], views[i]) for i in order]
        return _merge_encodings(strategy, encodings, global_state, rnd)

    def product(delta: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
        """The merged model's update: B·A (at peft scale, plus the residual for exact rules)."""
        if strategy.residual:
            new = _apply(base, delta)
            return _effective(strategy, new, 4)
        return (base[B] + delta.get(B, 0)) @ (base[A] + delta.get(A, 0))

    reference = merged((0, 1, 2))
    for order in itertools.permutations(range(3)):
        out = merged(order)
        assert torch.allclose(
            product(out, global_state), product(reference, global_state), atol=1e-4
        )
        if name not in ("flexlora", "flora"):  # factor by factor where the rule is per factor
            assert all(torch.allclose(out[k], reference[k], atol=1e-5) for k in global_state)
    assert set(reference) - {k for k in reference if k.startswith(RESIDUAL)} == set(global_state)
    alone = merged((0,))  # one full-rank client in -> its update out
    if strategy.residual:  # the merged model is that client's model
        trained = {k: views[0][k] + deltas[0][k] for k in views[0]}
        client_model = _effective(strategy, global_state, 4, trained)
        assert torch.allclose(product(alone, global_state), client_model, atol=1e-4)
        return
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
        if strategies.build(cfg).residual:  # residual folded in: r = lora_alpha = its width
            loaded = model.peft_config["default"]
            assert loaded.r > rank and loaded.lora_alpha == loaded.r
            continue
        assert model.peft_config["default"].r == rank
        # lora_alpha scales with the rank so that alpha / r (peft's scale) is the same everywhere
        assert model.peft_config["default"].lora_alpha / rank == cfg.lora.lora_alpha / cfg.lora.r


@pytest.mark.parametrize("name", ["flora", "fedex_lora"])
def test_exact_rule_round_adapters_reproduce_the_global_model_for_peft(
    name: str, cache_dir: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedllama import model as model_lib

    out = tmp_path / "run"
    cfg = tiny_config(cache_dir, out, f"strategy.name={name}", "lora.client_ranks=[2,4]")
    rows = run(InProcessGrid(2), cfg)
    strategy = strategies.build(cfg)
    global_state = load_file(str(out / "round-002" / "server_state.safetensors"))
    assert any(k.startswith(RESIDUAL) for k in global_state), "the residual is saved"
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    base = model_lib.resolve_base_dir(cfg.model)

    for rank, sub in ((4, ""), (2, "rank-02")):
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base), out / "round-002" / sub
        )
        ours, _ = model_lib.get_lora_model(replace(cfg, lora=cfg.lora.at_rank(rank)))
        model_lib.set_residual(ours, residual_view(strategy, global_state, rank), cfg)
        adapters.set_adapter_state(ours, strategy.client_view(global_state, rank))

        with torch.no_grad():
            expected = ours(input_ids=tokens).logits
            got = peft_model(input_ids=tokens).logits
        assert torch.allclose(got, expected, atol=1e-4), f"rank {rank}"
        model_lib.set_residual(ours, {}, cfg)
        with torch.no_grad():
            assert not torch.allclose(ours(input_ids=tokens).logits, expected, atol=1e-4)


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
