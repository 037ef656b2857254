"""Distributed DP under secure aggregation (the distributed discrete Gaussian): the rotation,
conditional rounding, modulus sizing, the noise in the sum, its accounting, and real rounds in
which the server adds no noise."""

from __future__ import annotations

import math
import random
import re
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp

from fedllama import config as config_lib
from fedllama.config import ConfigError, SecAggConfig
from fedllama.experiments import report
from fedllama.privacy.dp import Ledger, RoundEvent, calibrate_noise, mechanism
from fedllama.privacy.dp import distributed as ddg_lib
from fedllama.privacy.dp.distributed import (
    DdgParams,
    DistributedNoiseError,
    conditional_round,
    ddg_event,
    plan_round,
    rotate,
    rounded_norm_bound,
    unrotate,
)
from fedllama.privacy.secagg import aggregate_locally
from fedllama.server.metrics import read_rows
from tests.harness import TINY_YAML, InProcessGrid, logged, run, tiny_config

ON = SecAggConfig(enabled=True)


def _epsilon(event: dpa.DpEvent, delta: float = 1e-5) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _unit(rng: np.random.Generator, dim: int, norm: float) -> np.ndarray:
    v = rng.normal(size=dim)
    return v / np.linalg.norm(v) * norm


# --------------------------------------------------------------------------- the transforms


def test_rotation_is_orthonormal_invertible_and_flattens_a_spike() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000)

    y = rotate(x, seed=5)

    assert y.shape == (1024,)  # padded to a power of two
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.allclose(unrotate(y, seed=5)[:1000], x)
    assert not np.allclose(unrotate(y, seed=6)[:1000], x)  # the seed is the rotation
    spike = np.zeros(1000)
    spike[3] = 2.0
    assert np.allclose(np.abs(rotate(spike, seed=5)), 2.0 / 32)  # all mass spread evenly


def test_conditional_rounding_is_unbiased_and_never_exceeds_the_bound() -> None:
    rng = np.random.default_rng(1)
    dim, norm = 256, 20.0
    y = _unit(rng, dim, norm)
    bound = rounded_norm_bound(norm, dim)

    draws = np.stack([conditional_round(y, bound, rng) for _ in range(2000)])

    assert (np.sqrt((draws.astype(float) ** 2).sum(axis=1)) <= bound).all()
    assert np.abs(draws - y).max() < 1  # each coordinate is floor or ceil
    assert np.abs(draws.mean(axis=0) - y).max() < 0.06  # 2000 draws: std ≤ 0.5/√2000 = 0.011
    assert bound < norm + math.sqrt(dim)  # the tighter bound (β) is the one in force here


def test_conditional_rounding_refuses_an_input_over_its_bound() -> None:
    y = np.full(64, 10.5)  # norm 84 ≫ the bound of a norm-1 vector

    with pytest.raises(DistributedNoiseError, match="no rounding within the L2 bound"):
        conditional_round(y, rounded_norm_bound(1.0, 64), np.random.default_rng(0))


# --------------------------------------------------------------------------- encode and decode


def _params(**over: object) -> DdgParams:
    base = dict(
        noise_multiplier=1.0, clip_norm=1.0, dim=3000, sampled=5, survivors=5, bits=32, seed=7
    )
    return plan_round(**{**base, **over})  # type: ignore[arg-type]


def test_without_noise_the_decoded_sum_is_the_clipped_payloads_sum() -> None:
    rng = np.random.default_rng(2)
    params = replace(_params(), local_std=0.0)
    xs = [_unit(rng, 3000, 0.4 + 0.1 * i) for i in range(4)] + [_unit(rng, 3000, 5.0)]

    total = sum(ddg_lib.encode(x, params, rng) for x in xs)
    decoded, headroom = ddg_lib.decode(np.asarray(total, dtype=np.uint64), params)

    clipped = [*xs[:4], xs[4] / 5.0]  # the last one is clipped to C = 1
    step = 1 / params.scale
    assert np.abs(decoded - sum(clipped)).max() < 5 * step  # 5 clients, < 1 unit each
    assert 0 < headroom < 1


def test_the_decoded_sum_carries_noise_z_c_from_the_clients_alone() -> None:
    rng = np.random.default_rng(3)
    z, clip, n = 1.3, 0.5, 6
    params = _params(noise_multiplier=z, clip_norm=clip, dim=4000, sampled=n, survivors=n)
    xs = [_unit(rng, 4000, clip) for _ in range(n)]

    total = sum(ddg_lib.encode(x, params, rng) for x in xs)
    decoded, _ = ddg_lib.decode(np.asarray(total, dtype=np.uint64), params)

    noise = decoded - sum(xs)
    # 4000 coordinates: the sample std is within 3.5 % of σ with probability > 0.999
    assert noise.std() == pytest.approx(z * clip, rel=0.035)
    assert abs(noise.mean()) < 4 * z * clip / math.sqrt(4000)


def test_the_noise_share_drawn_while_the_client_trains_is_the_one_encoded() -> None:
    rng = np.random.default_rng(7)
    params = _params(dim=2000, sampled=2, survivors=2)
    x = _unit(rng, 2000, 0.8)
    silent: Future[np.ndarray] = Future()
    silent.set_result(np.zeros(params.size, dtype=np.int64))

    decoded, _ = ddg_lib.decode(ddg_lib.encode(x, params, rng, noise=silent), params)
    drawn = ddg_lib.draw_in_background(params).result()

    assert np.abs(decoded - x).max() < 3 / params.scale  # the given (silent) share was used
    assert drawn.shape == (params.size,) and drawn.dtype == np.int64
    assert drawn.std() == pytest.approx(params.local_std, rel=0.05)


def test_clients_provisioned_for_fewer_survivors_add_more_noise_each() -> None:
    full = _params(sampled=10, survivors=10)
    short = _params(sampled=10, survivors=8)

    # any 8 of them still carry σ = zC: each adds the noise of 1/8, not 1/10
    assert short.local_std / short.scale == pytest.approx(1.0 / math.sqrt(8))
    assert full.local_std / full.scale == pytest.approx(1.0 / math.sqrt(10))


def test_the_modulus_holds_aligned_updates_of_every_sampled_client() -> None:
    rng = np.random.default_rng(4)
    n = 8
    params = _params(sampled=n, survivors=n, bits=16, noise_multiplier=0.5)
    same = _unit(rng, 3000, 1.0)  # the worst case: every client sends the same full-norm update

    total = sum(ddg_lib.encode(same, params, rng) for _ in range(n))
    decoded, headroom = ddg_lib.decode(np.asarray(total, dtype=np.uint64), params)

    assert headroom < 1  # nothing wrapped around 2^16
    assert (decoded - n * same).std() == pytest.approx(0.5, rel=0.05)


def test_too_few_bits_are_refused() -> None:
    with pytest.raises(DistributedNoiseError, match="dp.modulus_bits=8 cannot hold"):
        _params(bits=8, sampled=2000)


def test_parameters_travel_as_config_fields_and_bad_fields_are_refused() -> None:
    params = _params()
    params = replace(params, count_keys=("fedllama.weight",))

    assert DdgParams.from_record(params.to_record()) == params
    assert DdgParams.from_record({"round": 1}) is None  # no distributed noise this round
    with pytest.raises(DistributedNoiseError, match="'ddg-scale' is 'x'"):
        DdgParams.from_record({**params.to_record(), "ddg-scale": "x"})
    with pytest.raises(DistributedNoiseError, match="out of range"):
        DdgParams.from_record({**params.to_record(), "ddg-bits": 99})


# --------------------------------------------------------------------------- accounting


def test_the_round_is_the_zcdp_of_kairouz_et_al_theorem_1() -> None:
    params = _params(bits=14, sampled=4, survivors=3)
    size, sigma, n = params.size, params.local_std, 4
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
    eps = 2 * params.norm_bound / (math.sqrt(n) * sigma) + tau * math.sqrt(size)

    assert ddg_event(params, n) == dpa.ZCDpEvent(rho=eps**2 / 2)


def test_with_many_bits_the_round_costs_what_a_gaussian_of_sensitivity_2c_does() -> None:
    params = _params(bits=40)
    coarse = _params(bits=10)

    gaussian = _epsilon(dpa.GaussianDpEvent(1.0 / 2))  # z = 1, sensitivity 2C
    assert _epsilon(ddg_event(params, 5)) == pytest.approx(gaussian, rel=1e-4)
    assert _epsilon(ddg_event(coarse, 5)) > 1.05 * gaussian  # rounding inflates Δ
    assert _epsilon(ddg_event(params, 6)) < _epsilon(ddg_event(params, 5))  # more noise shares


def test_the_ledger_composes_distributed_rounds_with_the_survivors_that_were_summed() -> None:
    params = _params()
    cfg = config_lib.load(TINY_YAML, ["dp.placement=distributed"]).dp
    rounds = [
        RoundEvent(
            1.0,
            "poisson",
            "distributed",
            size=params.size,
            survivors=s,
            local_std=params.local_std,
            norm_bound=params.norm_bound,
        )
        for s in (5, 7, 5)
    ]

    expected = dpa.ComposedDpEvent([ddg_event(params, s) for s in (5, 7, 5)])
    assert Ledger(cfg.accountant, 1e-5, rounds).epsilon() == pytest.approx(_epsilon(expected))


def test_calibration_to_a_target_epsilon_accounts_the_discretization() -> None:
    cfg = config_lib.load(
        TINY_YAML, ["dp.placement=distributed", "dp.target_epsilon=6", "dp.delta=1e-5"]
    ).dp

    def event_of(z: float) -> RoundEvent:
        ddg = _params(noise_multiplier=z, bits=14)
        return RoundEvent(
            z,
            "all",
            "distributed",
            size=ddg.size,
            survivors=5,
            local_std=ddg.local_std,
            norm_bound=ddg.norm_bound,
        )

    z = calibrate_noise(cfg, rounds=3, population=5, event_of=event_of)

    assert Ledger("rdp", 1e-5, [event_of(z)] * 3).epsilon() <= 6 + 1e-6
    assert Ledger("rdp", 1e-5, [event_of(z * 0.97)] * 3).epsilon() > 6


# --------------------------------------------------------------------------- with SecAgg+


def test_secure_aggregation_of_noisy_integers_unmasks_the_noisy_sum() -> None:
    rng = np.random.default_rng(5)
    params = _params(dim=2000, sampled=6, survivors=5, noise_multiplier=0.8)
    vectors = {n: _unit(rng, 2000, 0.9).astype(np.float32) for n in range(1, 7)}

    out = aggregate_locally(vectors, ON, ddg=params, rng=random.Random(0), drop={6: "unmask"})

    noise = out.total - sum(v.astype(np.float64) for v in vectors.values())
    expected = math.sqrt(6 * params.local_std**2) / params.scale  # six noise shares summed
    assert noise.std() == pytest.approx(expected, rel=0.05)
    assert all(m.shape == (2048,) for m in out.masked.values())


def test_noisy_integers_travel_in_32_bits_under_a_32_bit_secagg_modulus(monkeypatch) -> None:
    rng = np.random.default_rng(7)
    params = _params(dim=2000, sampled=4, survivors=4)  # dp.modulus_bits = 32
    vectors = {n: _unit(rng, 2000, 0.7).astype(np.float32) for n in range(1, 5)}
    monkeypatch.setattr(ddg_lib, "discrete_gaussian", lambda std, size: np.zeros(size, np.int64))
    narrow = replace(ON, modulus_bits=32, quantization_bits=24)

    out = aggregate_locally(vectors, narrow, ddg=params, rng=random.Random(1))

    exact = sum(v.astype(np.float64) for v in vectors.values())
    assert np.abs(out.total - exact).max() < 4 / params.scale  # rounding only
    assert all(m.dtype == np.uint32 for m in out.masked.values())


def test_the_server_adds_nothing_the_clients_noise_is_all_there_is(monkeypatch) -> None:
    rng = np.random.default_rng(6)
    params = _params(dim=2000, sampled=4, survivors=4)
    vectors = {n: _unit(rng, 2000, 0.7).astype(np.float32) for n in range(1, 5)}
    monkeypatch.setattr(ddg_lib, "discrete_gaussian", lambda std, size: np.zeros(size, np.int64))

    out = aggregate_locally(vectors, ON, ddg=params, rng=random.Random(1))

    exact = sum(v.astype(np.float64) for v in vectors.values())
    assert np.abs(out.total - exact).max() < 4 / params.scale  # rounding only


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dp.placement=distributed"], "dp.placement: is distributed, which needs secagg"),
        (
            ["secagg.enabled=true", "dp.placement=distributed", "dp.accountant=pld"],
            "dp.accountant: pld does not account the distributed discrete Gaussian",
        ),
        (
            ["secagg.enabled=true", "dp.placement=distributed", "dp.adaptive_clipping=true"],
            "dp.adaptive_clipping: needs dp.placement=central, got distributed",
        ),
        (["dp.modulus_bits=4"], "dp.modulus_bits: must be in 8..62"),
        (["dp.dropout_tolerance=1"], "dp.dropout_tolerance: must be in [0, 1)"),
        (
            [
                "secagg.enabled=true",
                "dp.placement=distributed",
                "dp.modulus_bits=40",
                "secagg.modulus_bits=32",
                "secagg.quantization_bits=24",
            ],
            "dp.modulus_bits: is 40, more than secagg.modulus_bits=32",
        ),
    ],
)
def test_bad_distributed_settings_are_refused_naming_the_key(
    overrides: list[str], message: str
) -> None:
    base = ["dp.enabled=true", "dp.noise_multiplier=1", "simulation.num_clients=4"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_lib.load(TINY_YAML, base + overrides)


# --------------------------------------------------------------------------- through rounds


def _distributed_run(cache_dir: Path, out: Path, *extra: str) -> list[dict]:
    cfg = tiny_config(
        cache_dir,
        out,
        "simulation.num_clients=4",
        "data.partition=iid",
        "secagg.enabled=true",
        "server.min_replies=2",
        "dp.enabled=true",
        "dp.placement=distributed",
        "dp.clip_norm=0.05",
        "dp.seed=3",
        "output.plot=false",
        *extra,
    )
    return run(InProcessGrid(4), cfg)


def test_distributed_rounds_add_no_server_noise_and_account_the_summed_clients(
    cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    server_noise: list[float] = []
    add_noise = mechanism.add_noise

    def spy(state, keys, std, generator):  # type: ignore[no-untyped-def]
        server_noise.append(std)
        return add_noise(state, keys, std, generator)

    monkeypatch.setattr(mechanism, "add_noise", spy)
    out = tmp_path / "run"

    dp = ["dp.noise_multiplier=1.0", "dp.sampling=all"]
    _distributed_run(cache_dir, out, "server.rounds=1", *dp)
    rows = _distributed_run(cache_dir, out, "server.rounds=2", *dp)  # resumes after round 1

    assert server_noise and set(server_noise) == {0.0}  # the server never adds noise
    events = []
    for row in rows[1:]:
        dist = row["dp"]["distributed"]
        assert row["secagg"]["clients"] == 4 and dist["survivors"] == 4
        assert dist["provisioned"] == 4  # ⌈0.8·4⌉ = 4 (dp.dropout_tolerance = 0.2)
        assert dist["noise_multiplier"] == pytest.approx(1.0)
        assert 0 < dist["headroom"] < 1
        events.append(RoundEvent.from_json(row["dp"]["event"]))
        assert row["dp"]["epsilon"] == pytest.approx(Ledger("rdp", 1e-5, events).epsilon())
        assert "against the server" in row["dp"]["unit"]
    assert math.isfinite(rows[-1]["eval_loss"])
    summary = report.summary(read_rows(out))
    assert "distributed discrete Gaussian noise modulo 2^32 from the 4 clients" in summary
    assert "against the server, no amplification" in summary


def test_a_round_whose_noise_would_fall_short_is_not_unmasked_but_retried_without_the_gap(
    cache_dir: Path, tmp_path: Path
) -> None:
    from fedllama.server.aggregate import RoundFailed

    def vanish(pid: int, reply):  # type: ignore[no-untyped-def]
        # node 1's masked vector never arrives: 3 of 4 in the sum, 4 provisioned
        return None if pid == 1 and reply.metadata.message_type == "train.secagg_mask" else reply

    cfg = tiny_config(
        cache_dir,
        tmp_path / "run",
        "simulation.num_clients=4",
        "data.partition=iid",
        "secagg.enabled=true",
        "secagg.timeout_s=5",
        "server.timeout_s=3",
        "server.min_replies=2",
        "dp.enabled=true",
        "dp.placement=distributed",
        "dp.noise_multiplier=1.0",
        "dp.sampling=all",
        "dp.dropout_tolerance=0.0",
        "server.rounds=1",
        "output.plot=false",
    )
    with pytest.raises(RoundFailed, match="fewer than the 4 the clients' distributed noise"):
        run(InProcessGrid(4, vanish), replace(cfg, server=replace(cfg.server, failed_round="stop")))

    # retried (the default) without the node that vanished: 3 provisioned, 3 summed, released
    with logged() as lines:
        rows = run(
            InProcessGrid(4, vanish),
            replace(cfg, output=replace(cfg.output, dir=str(tmp_path / "retry"))),
        )
    assert rows[-1]["clients_ok"] == 3 and "skipped" not in rows[-1]
    assert rows[-1]["dp"]["distributed"]["survivors"] == 3
    assert any("retrying without nodes" in line for line in lines)


def test_a_target_epsilon_calibrates_distributed_noise_in_the_first_round(
    cache_dir: Path, tmp_path: Path
) -> None:
    rows = _distributed_run(
        cache_dir, tmp_path / "run", "server.rounds=2", "dp.target_epsilon=8", "dp.sampling=all"
    )

    assert [r["round"] for r in rows] == [0, 1, 2]
    assert 7.5 < rows[-1]["dp"]["epsilon"] <= 8 + 1e-6  # calibrated: the budget nearly spent
    assert rows[1]["dp"]["noise_multiplier"] == rows[2]["dp"]["noise_multiplier"] > 0
