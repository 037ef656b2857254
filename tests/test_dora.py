"""DoRA's magnitude vectors through the merge strategies, rsLoRA's scale across client ranks,
and the target-module presets (docs/adapters.md).

DoRA: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024. rsLoRA:
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

import server.app
import strategies
from fedllama import config as config_lib
from fedllama.config import Config
from fedllama.merge import AdapterState, SumAccumulator, frozen_key
from fedllama.merge.lora import is_magnitude

R = 4
IN, OUT = 6, 5
MODULES = (
    "base_model.model.model.layers.0.self_attn.q_proj",
    "base_model.model.model.layers.1.mlp.up_proj",
)
CLIENTS = ((2, 1.0), (4, 3.0), (3, 6.0))
"""(rank, weight) of each client: mixed ranks, unequal weights, more than two clients."""


def _cfg(*overrides: str) -> Config:
    return config_lib.load(None, [f"lora.r={R}", "lora.use_dora=true", *overrides])


def _global(seed: int = 0) -> AdapterState:
    """A non-zero global DoRA adapter at rank R: A (R, in), B (out, R), m (out,)."""
    g = torch.Generator().manual_seed(seed)
    state: AdapterState = {}
    for module in MODULES:
        state[f"{module}.lora_A.weight"] = torch.randn(R, IN, generator=g)
        state[f"{module}.lora_B.weight"] = torch.randn(OUT, R, generator=g)
        state[f"{module}.lora_magnitude_vector"] = torch.rand(OUT, generator=g) + 0.5
    return state


def _deltas(views: list[AdapterState]) -> list[AdapterState]:
    g = torch.Generator().manual_seed(1)
    return [{k: torch.randn(v.shape, generator=g) for k, v in view.items()} for view in views]


def _merge(name: str, global_state: AdapterState) -> tuple[AdapterState, list[AdapterState]]:
    """Round 1 of ``name`` over CLIENTS from ``global_state``: (aggregated delta, each client's
    delta). A client sends only what it trains and shares (FedSA-LoRA keeps B)."""
    strategy = strategies.build(_cfg(f"strategy.name={name}"))
    views = [strategy.client_view(global_state, rank) for rank, _ in CLIENTS]
    unsent = strategy.frozen(1) | strategy.local
    deltas = [{k: v for k, v in d.items() if not frozen_key(k, unsent)} for d in _deltas(views)]
    total = SumAccumulator()
    for view, delta, (_, weight) in zip(views, deltas, CLIENTS, strict=True):
        total.add(strategy.encode(delta, weight, view))
    return strategy.decode(total.total, global_state), deltas


@pytest.mark.parametrize("name", ["rank_aware", "zero_pad", "fedsa_lora"])
def test_magnitudes_are_the_example_weighted_mean_across_mixed_ranks(name: str) -> None:
    global_state = _global()

    merged, deltas = _merge(name, global_state)

    for module in MODULES:  # weights 1, 3, 6 (total 10), whatever each client's rank
        key = f"{module}.lora_magnitude_vector"
        expected = (1 * deltas[0][key] + 3 * deltas[1][key] + 6 * deltas[2][key]) / 10
        torch.testing.assert_close(merged[key], expected)
        new = global_state[key] + merged[key]  # = Σ w_k (G + Δ_k) / Σ w_k: every client owns m
        trained = [global_state[key] + d[key] for d in deltas]
        torch.testing.assert_close(new, (trained[0] + 3 * trained[1] + 6 * trained[2]) / 10)


def test_rank_aware_still_averages_each_slot_over_its_owners_with_magnitudes_present() -> None:
    merged, deltas = _merge("rank_aware", _global())

    a_key = f"{MODULES[0]}.lora_A.weight"
    # slot 3 (row 3 of A) is owned by the rank-4 client only; slot 2 by ranks 4 and 3
    torch.testing.assert_close(merged[a_key][3], deltas[1][a_key][3])
    torch.testing.assert_close(
        merged[a_key][2], (3 * deltas[1][a_key][2] + 6 * deltas[2][a_key][2]) / 9
    )


def test_hetlora_weighs_each_magnitude_by_its_modules_trained_norm() -> None:
    global_state = _global()
    strategy = strategies.build(_cfg("strategy.name=hetlora"))
    views = [strategy.client_view(global_state, rank) for rank, _ in CLIENTS]

    merged, deltas = _merge("hetlora", global_state)

    for module in MODULES:
        a, b, m = (
            f"{module}.{s}" for s in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
        )
        norms = [
            torch.linalg.matrix_norm((v[b] + d[b]) @ (v[a] + d[a]))
            for v, d in zip(views, deltas, strict=True)
        ]
        expected = sum(n * d[m] for n, d in zip(norms, deltas, strict=True)) / sum(norms)
        torch.testing.assert_close(merged[m], expected)


def test_fedavg_averages_magnitudes_by_examples_from_a_non_zero_global() -> None:
    global_state = _global()
    strategy = strategies.build(_cfg("strategy.name=fedavg"))
    view = strategy.client_view(global_state, R)
    deltas = _deltas([view, view])
    total = SumAccumulator()
    for delta, weight in zip(deltas, (2.0, 8.0), strict=True):
        total.add(strategy.encode(delta, weight, view))

    merged = strategy.decode(total.total, global_state)

    key = f"{MODULES[1]}.lora_magnitude_vector"
    torch.testing.assert_close(merged[key], 0.2 * deltas[0][key] + 0.8 * deltas[1][key])
    new = global_state[key] + merged[key]
    assert not torch.allclose(new, 0.2 * deltas[0][key] + 0.8 * deltas[1][key])  # G counts


def test_every_strategy_declares_whether_it_merges_dora() -> None:
    cfg = _cfg()
    for name, build in strategies.REGISTRY.items():
        refusal = build(cfg).dora_refusal
        assert isinstance(refusal, str), name


REFUSING = ["ffa_lora", "rolora", "flexlora", "flora", "fedex_lora"]
ACCEPTING = ["fedavg", "fedsa_lora", "hetlora", "rank_aware", "zero_pad"]


def test_dora_is_refused_before_the_run_with_the_strategys_reason() -> None:
    cfg = _cfg("strategy.name=ffa_lora")

    with pytest.raises(config_lib.ConfigError) as err:
        server.app.check(cfg)

    assert str(err.value) == (
        "lora.use_dora: strategy ffa_lora cannot merge DoRA's magnitude vectors: averaging B "
        "alone is exact only while the model is linear in B, and DoRA (Liu et al., ICML 2024) "
        "divides W0 + s·B A by its norm; use one of fedavg, fedsa_lora, hetlora, rank_aware, "
        "zero_pad"
    )


@pytest.mark.parametrize("name", REFUSING)
def test_strategies_that_cannot_merge_magnitudes_refuse_dora(name: str) -> None:
    overrides = ["server.optimizer=sgd", "server.lr=1.0"]
    with pytest.raises(config_lib.ConfigError, match=f"lora.use_dora: strategy {name} cannot"):
        server.app.check(_cfg(f"strategy.name={name}", *overrides))
    server.app.check(config_lib.load(None, [f"strategy.name={name}", *overrides]))  # no DoRA


@pytest.mark.parametrize("name", ACCEPTING)
def test_strategies_that_merge_magnitudes_accept_dora(name: str) -> None:
    server.app.check(_cfg(f"strategy.name={name}"))


def test_rslora_with_a_residual_strategy_is_accepted() -> None:
    """Its round directories fold the residual in at peft scale 1 with rsLoRA off (the merged
    export test runs an rsLoRA FLoRA round: tests/test_export.py)."""
    server.app.check(config_lib.load(None, ["strategy.name=flora", "lora.use_rslora=true"]))


# ------------------------------------------------------------------------------------ rsLoRA


@pytest.mark.parametrize(("rslora", "scale"), [(False, 16 / 16), (True, 16 / 16**0.5)])
def test_at_rank_keeps_peft_scale_equal_across_ranks(rslora: bool, scale: float) -> None:
    lora = config_lib.load(
        None, ["lora.r=16", "lora.lora_alpha=16", f"lora.use_rslora={str(rslora).lower()}"]
    ).lora

    for rank in (1, 4, 16):
        at = lora.at_rank(rank)
        layer = torch.nn.Sequential()
        layer.add_module("q_proj", torch.nn.Linear(8, 8))
        wrapped = get_peft_model(
            layer, PeftLoraConfig(**at.peft_kwargs() | {"target_modules": ["q_proj"]})
        )
        peft_scale = next(m for m in wrapped.modules() if isinstance(m, LoraLayer)).scaling[
            "default"
        ]
        assert peft_scale == pytest.approx(scale)
        assert at.scale() == pytest.approx(scale)


def test_rslora_at_rank_scales_alpha_by_the_square_root_of_the_rank_ratio() -> None:
    lora = config_lib.load(None, ["lora.r=16", "lora.lora_alpha=32", "lora.use_rslora=true"]).lora

    assert lora.at_rank(4).lora_alpha == pytest.approx(16.0)  # 32·√(4/16); linear would be 8
    assert lora.at_rank(4).peft_kwargs()["use_rslora"] is True


def test_residual_strategies_use_the_rslora_scale() -> None:
    cfg = config_lib.load(
        None, ["strategy.name=fedex_lora", "lora.r=4", "lora.lora_alpha=8", "lora.use_rslora=true"]
    )
    assert strategies.build(cfg).scale == pytest.approx(4.0)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("preset", "resolved"),
    [
        ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        ("all-linear", "all-linear"),
        ("[q_proj,down_proj]", ["q_proj", "down_proj"]),
    ],
)
def test_target_module_presets_resolve_for_peft(preset: str, resolved: object) -> None:
    cfg = config_lib.load(None, [f"lora.target_modules={preset}"])

    assert cfg.lora.peft_kwargs()["target_modules"] == resolved
    again = config_lib.from_yaml(config_lib.to_yaml(cfg))
    assert again.lora.peft_kwargs()["target_modules"] == resolved


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("attn", "lora.target_modules: got 'attn', expected one of attention, mlp, all-linear"),
        (
            "[attention,q_proj]",
            "lora.target_modules: 'attention' is a preset: write "
            "lora.target_modules=attention, not a list",
        ),
        ("[]", "lora.target_modules: must not be empty; give module names or one of attention"),
    ],
)
def test_bad_target_modules_are_named(value: str, message: str) -> None:
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.load(None, [f"lora.target_modules={value}"])
    assert str(err.value).startswith(message)


def test_magnitude_keys_are_recognised() -> None:
    assert is_magnitude(f"{MODULES[0]}.lora_magnitude_vector")
    assert not is_magnitude(f"{MODULES[0]}.lora_A.weight")
