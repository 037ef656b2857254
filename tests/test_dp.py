"""Client-level DP (DP-FedAvg): the ledger against dp-accounting's published values, clipping,
the noise of each placement, the sampling, refusals, and ε through real rounds and a resume."""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Message

import strategies
from fedllama import config as config_lib
from fedllama.config import ConfigError, DpConfig
from fedllama.merge import WEIGHT_KEY, MergeError
from fedllama.privacy.dp import (
    UNCLIPPED,
    Ledger,
    Release,
    RoundEvent,
    Sampler,
    calibrate_noise,
    clip_update,
    next_clip_norm,
    noise_generator,
    privatize,
    update_noise_multiplier,
)
from fedllama.privacy.dp.mechanism import update_norm
from fedllama.wire.records import ARRAYS, from_record, to_record
from server.app import check
from tests.harness import TINY_YAML, InProcessGrid, logged, run, tiny_config

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
SLOTS = "fedllama.slot_weight"


# --------------------------------------------------------------------------- the ledger


@pytest.mark.parametrize(
    ("accountant", "expected"),
    [("rdp", 7.3291), ("pld", 6.7688)],  # dp-accounting's (and Opacus') values
)
def test_ledger_gives_the_librarys_epsilon_for_poisson_sampling(
    accountant: str, expected: float
) -> None:
    event = RoundEvent(1.5, "poisson", "central", sampling_rate=0.04)

    ledger = Ledger(accountant, 1e-5, [event] * 2250)

    assert ledger.epsilon() == pytest.approx(expected, abs=1e-3)


def test_ledger_accounts_fixed_size_sampling_under_replace_one_with_sensitivity_2c() -> None:
    # 10 of 1,000 clients, 1,000 rounds, δ = 1e-5: dp-accounting gives 3.5761 for a Gaussian of
    # multiplier 1 over the replace-one sensitivity; replacing a client moves the sum by 2C, so
    # that is σ = 2C, i.e. z = 2 here
    ledger = Ledger("rdp", 1e-5, [RoundEvent(2.0, "fixed", "central", 1.0, 1000, 10)] * 1000)

    assert ledger.epsilon() == pytest.approx(3.5761, abs=1e-3)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_ledger_for_all_clients_is_a_replace_one_gaussian_without_amplification(
    accountant: str,
) -> None:
    # a Gaussian of multiplier 1, 20 rounds, δ = 1e-3: ε ≈ 25.09 (RDP); every client in every
    # round makes the neighbour a replaced client (sensitivity 2C), so that is z = 2 here
    ledger = Ledger(accountant, 1e-3, [RoundEvent(2.0, "all", "central")] * 20)
    plain = Ledger(accountant, 1e-3, [RoundEvent(1.0, "poisson", "central", 1.0)] * 20)

    assert ledger.epsilon() == pytest.approx(plain.epsilon())  # q = 1: no amplification
    if accountant == "rdp":
        assert ledger.epsilon() == pytest.approx(25.09, abs=0.01)


def test_local_noise_is_accounted_without_amplification_and_sensitivity_2c() -> None:
    poisson = RoundEvent(2.0, "poisson", "local", sampling_rate=0.01)
    plain = RoundEvent(1.0, "poisson", "central", sampling_rate=1.0)

    assert Ledger("rdp", 1e-5, [poisson] * 50).epsilon() == pytest.approx(
        Ledger("rdp", 1e-5, [plain] * 50).epsilon()
    )


def test_ledger_continued_round_by_round_equals_the_whole_run() -> None:
    event = RoundEvent(1.1, "poisson", "central", sampling_rate=0.1)
    ledger = Ledger("rdp", 1e-5, [event] * 10)

    for _ in range(10):
        ledger.add(event)

    assert ledger.epsilon() == pytest.approx(Ledger("rdp", 1e-5, [event] * 20).epsilon())
    assert ledger.epsilon() > Ledger("rdp", 1e-5, [event] * 10).epsilon()


def test_calibration_finds_the_z_of_a_target_epsilon() -> None:
    cfg = DpConfig(enabled=True, target_epsilon=7.3291, sampling_rate=0.04)

    z = calibrate_noise(cfg, rounds=2250, population=100)

    assert z == pytest.approx(1.5, abs=1e-3)
    assert Ledger("rdp", 1e-5, [RoundEvent(z, "poisson", "central", 0.04)] * 2250).epsilon() <= (
        7.3291 + 1e-6
    )


# --------------------------------------------------------------------------- mechanism


def _encoding(scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        A: scale * torch.randn(4, 16, generator=g),
        B: scale * torch.randn(16, 4, generator=g),
        WEIGHT_KEY: torch.tensor([1.0]),
    }


def test_clipping_bounds_the_whole_update_and_leaves_the_weight() -> None:
    big, small = _encoding(10.0), _encoding(0.001)

    clipped, norm = clip_update(big, frozenset({WEIGHT_KEY}), clip_norm=0.5)
    kept, _ = clip_update(small, frozenset({WEIGHT_KEY}), clip_norm=0.5)

    assert norm > 0.5
    assert update_norm(clipped, {WEIGHT_KEY}) == pytest.approx(0.5, rel=1e-5)
    assert torch.allclose(clipped[A] / big[A], torch.full_like(big[A], 0.5 / norm))
    assert torch.equal(clipped[WEIGHT_KEY], big[WEIGHT_KEY])
    assert all(torch.equal(kept[k], small[k]) for k in small)


def test_central_release_adds_z_c_noise_and_the_fixed_denominator() -> None:
    summed = {"payload": torch.full((400_000,), 3.0), SLOTS: torch.full((8,), 7.0)}
    release = Release(
        frozenset({SLOTS}), noise_std=0.8 * 0.5, generator=noise_generator(1), expected_clients=12.5
    )

    out = release(summed)

    noise = out["payload"] - 3.0
    assert float(noise.std()) == pytest.approx(0.4, rel=0.01)  # σ = zC = 0.8·0.5
    assert abs(float(noise.mean())) < 0.4 * 5 / math.sqrt(400_000)
    assert torch.equal(out[SLOTS], torch.full((8,), 12.5))  # 7 took part; 12.5 expected


def test_local_placement_adds_the_whole_noise_on_each_client() -> None:
    cfg = DpConfig(enabled=True, noise_multiplier=2.0, clip_norm=0.25, placement="local", seed=3)
    update = {"payload": torch.zeros(200_000), WEIGHT_KEY: torch.tensor([1.0])}

    sent = [privatize(update, frozenset({WEIGHT_KEY}), cfg, 1, client) for client in range(4)]

    for one in sent:
        assert float(one["payload"].std()) == pytest.approx(0.5, rel=0.01)  # zC per client
        assert torch.equal(one[WEIGHT_KEY], torch.tensor([1.0]))
    total = sum(one["payload"] for one in sent)
    assert float(total.std()) == pytest.approx(1.0, rel=0.02)  # √4 · zC in the sum
    central = DpConfig(enabled=True, noise_multiplier=2.0, clip_norm=0.25)
    assert torch.equal(
        privatize(update, frozenset({WEIGHT_KEY}), central, 1, 0)["payload"], update["payload"]
    )  # central: the client only clips


# --------------------------------------------------------------------------- sampling


def test_poisson_sampling_draws_each_node_with_rate_q() -> None:
    sampler = Sampler(DpConfig(sampling="poisson", sampling_rate=0.2, seed=5))
    nodes = list(range(100, 150))

    sizes = [len(sampler.sample(nodes, r)) for r in range(400)]

    assert sum(sizes) / (400 * 50) == pytest.approx(0.2, abs=0.01)
    assert len(set(sizes)) > 5  # the size varies, as Poisson sampling's does
    assert sampler.expected(50) == pytest.approx(10.0)


def test_fixed_and_all_sampling() -> None:
    nodes = list(range(10))
    fixed = Sampler(DpConfig(sampling="fixed", clients_per_round=3, seed=1))
    drawn = [tuple(fixed.sample(nodes, r)) for r in range(50)]

    assert all(len(set(d)) == 3 and set(d) <= set(nodes) for d in drawn)
    assert len(set(drawn)) > 10
    assert Sampler(DpConfig(sampling="all")).sample(nodes, 1) == nodes
    assert fixed.sample(nodes, 7) == fixed.sample(nodes, 7)  # seeded: reproducible


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dp.enabled=true"], "dp.noise_multiplier: give z"),
        (["dp.enabled=true", "dp.noise_multiplier=1", "dp.target_epsilon=3"], "exactly one"),
        (
            ["dp.enabled=true", "dp.noise_multiplier=1", "dp.placement=distributed"],
            "dp.placement: is distributed, which needs secagg.enabled=true",
        ),
        (
            ["dp.enabled=true", "dp.noise_multiplier=1", "dp.sampling=fixed", "dp.accountant=pld"],
            "pld does not account sampling without replacement",
        ),
        (
            ["dp.enabled=true", "dp.noise_multiplier=1", "server.fraction_train=0.5"],
            "dp.sampling decides who takes part",
        ),
        (
            [
                "dp.enabled=true",
                "dp.noise_multiplier=1",
                "dp.sampling=fixed",
                "dp.clients_per_round=9",
            ],
            "dp.clients_per_round: is 9, more than",
        ),
        (
            [
                "dp.enabled=true",
                "dp.noise_multiplier=1",
                "strategy.name=rank_aware",
                "lora.client_ranks=[2,4]",
            ],
            "every client must train at lora.r",
        ),
        (["dp.delta=1.5"], "dp.delta: must be in (0, 1)"),
    ],
)
def test_bad_dp_settings_are_refused_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.load(TINY_YAML, overrides)


@pytest.mark.parametrize(
    ("strategy", "reason"),
    [
        ("hetlora", "norms of its trained factors"),
        ("flora", "trusted-server rule"),
        ("fedex_lora", "trusted-server rule"),
    ],
)
def test_strategies_dp_cannot_protect_are_refused_with_the_reason(
    strategy: str, reason: str
) -> None:
    cfg = config_lib.load(
        TINY_YAML, ["dp.enabled=true", "dp.noise_multiplier=1", f"strategy.name={strategy}"]
    )

    with pytest.raises(ConfigError, match=f"dp.enabled: strategy {strategy} .*{reason}"):
        check(cfg)


def test_every_summable_strategy_but_hetlora_names_its_count_keys() -> None:
    cfg = config_lib.load(TINY_YAML)
    for name, build in strategies.REGISTRY.items():
        rule = build(cfg)
        if not rule.dp_refusal:
            assert rule.summable and rule.count_keys, name


# --------------------------------------------------------------------------- through rounds


def _dp_run(cache_dir: Path, out: Path, *extra: str) -> tuple[list[dict], list[float]]:
    """A DP run of 4 tiny clients; its rows and the payload norm of every reply sent."""
    cfg = tiny_config(
        cache_dir,
        out,
        "simulation.num_clients=4",
        "data.partition=iid",
        "dp.enabled=true",
        "dp.clip_norm=0.05",
        "dp.seed=7",
        "output.plot=false",
        *extra,
    )
    norms: list[float] = []
    count_keys = strategies.build(cfg).count_keys | {UNCLIPPED}  # b − 1/2 is not payload

    def inspect(pid: int, reply: Message) -> Message:
        if not reply.has_error() and ARRAYS in reply.content.array_records:
            sent = from_record(reply.content.array_records[ARRAYS])
            norms.append(update_norm(sent, count_keys))
        return reply

    return run(InProcessGrid(4, inspect), cfg), norms


def test_rounds_record_the_librarys_epsilon_and_a_resume_continues_the_ledger(
    cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    dp = ["dp.noise_multiplier=1.2", "dp.sampling=poisson", "dp.sampling_rate=0.75"]

    _, norms = _dp_run(cache_dir, out, "server.rounds=1", *dp)
    rows, more = _dp_run(cache_dir, out, "server.rounds=3", *dp)  # resumes after round 1

    event = RoundEvent(1.2, "poisson", "central", sampling_rate=0.75, population=4)
    for row in rows[1:]:
        assert row["dp"]["epsilon"] == pytest.approx(
            Ledger("rdp", 1e-5, [event] * row["round"]).epsilon()
        )
        assert row["dp"]["event"] == event.to_json()
    assert rows[0]["dp"]["epsilon"] == 0.0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2, 3]
    assert norms + more and max(norms + more) <= 0.05 * (1 + 1e-5)  # every sent vector ≤ C


def test_a_target_epsilon_stops_the_run_before_a_round_would_exceed_it(
    cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    dp = ["dp.target_epsilon=4.0", "dp.sampling=all", "strategy.name=rank_aware"]

    first, norms = _dp_run(cache_dir, out, "server.rounds=2", *dp)
    again, _ = _dp_run(cache_dir, out, "server.rounds=3", *dp)  # z was calibrated for 2 rounds

    assert first[-1]["dp"]["epsilon"] <= 4.0 + 1e-6
    assert first[-1]["dp"]["epsilon"] > 3.5  # calibrated: the budget is nearly spent
    assert [r["round"] for r in again] == [0, 1, 2]  # round 3 would exceed it: not run
    assert len(norms) == 8 and max(norms) <= 0.05 * (1 + 1e-5)  # all 4 clients, 2 rounds


def test_dp_composes_with_secure_aggregation(cache_dir: Path, tmp_path: Path) -> None:
    rows, norms = _dp_run(
        cache_dir,
        tmp_path / "run",
        "server.rounds=1",
        "secagg.enabled=true",
        "dp.noise_multiplier=1.0",
        "dp.sampling=all",
        "server.min_replies=2",
    )

    row = rows[-1]
    assert row["clients_ok"] == 4 and row["secagg"]["clients"] == 4  # the server saw the sum
    assert row["dp"]["epsilon"] == pytest.approx(
        Ledger("rdp", 1e-5, [RoundEvent(1.0, "all", "central", population=4)]).epsilon()
    )
    assert norms == []  # under SecAgg the tamper hook sees masked vectors, not encodings


def test_fewer_than_two_sampled_under_secagg_release_noise_only(
    cache_dir: Path, tmp_path: Path
) -> None:
    from fedllama.model import adapters

    out = tmp_path / "run"
    rows, _ = _dp_run(
        cache_dir,
        out,
        "server.rounds=1",
        "secagg.enabled=true",
        "dp.noise_multiplier=1.0",
        "dp.sampling=fixed",
        "dp.clients_per_round=1",
    )

    assert rows[-1]["clients_ok"] == 0 and "secagg" not in rows[-1]
    assert rows[-1]["dp"]["clients_sampled"] == 1 and rows[-1]["dp"]["epsilon"] > 0
    before, _ = adapters.load_adapter(out / "round-000")
    after, _ = adapters.load_adapter(out / "round-001")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the noise was released


# --------------------------------------------------------------------------- adaptive clipping


@pytest.mark.parametrize(("target", "quantile"), [(0.5, 1.0), (0.9, math.exp(1.2816))])
def test_adaptive_clipping_settles_near_the_target_quantile_of_the_norms(
    target: float, quantile: float
) -> None:
    # update norms are log-normal(0, 1): the γ quantile is exp(Φ⁻¹(γ))
    n, clip = 50, 0.05
    cfg = DpConfig(
        enabled=True,
        noise_multiplier=1.0,
        adaptive_clipping=True,
        seed=0,
        target_quantile=target,
        clip_lr=0.2,
    )
    g = torch.Generator().manual_seed(1)
    history = []
    for t in range(200):
        norms = torch.exp(torch.randn(n, generator=g))
        total: dict[str, torch.Tensor] = {}
        for k, norm in enumerate(norms):
            update = {"payload": torch.zeros(8), WEIGHT_KEY: torch.tensor([1.0])}
            update["payload"][0] = norm
            sent = privatize(update, frozenset({WEIGHT_KEY}), replace(cfg, clip_norm=clip), t, k)
            total = {key: total.get(key, 0) + value for key, value in sent.items()}
        release = Release(frozenset({WEIGHT_KEY}), 0.0, noise_generator(0, t), n, n / 20)
        release(total)
        assert release.unclipped is not None
        clip = next_clip_norm(clip, release.unclipped, target, 0.2)
        history.append(clip)

    settled = sum(history[-50:]) / 50
    assert settled == pytest.approx(quantile, rel=0.15)
    assert history[0] < 0.1  # it started far below


def test_update_noise_grows_so_that_the_round_keeps_multiplier_z() -> None:
    assert update_noise_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    assert update_noise_multiplier(1.0, 1e6) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must exceed z/2"):
        update_noise_multiplier(2.0, 1.0)


def test_adaptive_clipping_needs_central_noise() -> None:
    with pytest.raises(ConfigError, match="dp.adaptive_clipping: needs dp.placement=central"):
        config_lib.load(
            TINY_YAML,
            [
                "dp.enabled=true",
                "dp.noise_multiplier=1",
                "dp.adaptive_clipping=true",
                "dp.placement=local",
            ],
        )


def test_adaptive_clipping_through_rounds_sends_each_rounds_c(
    cache_dir: Path, tmp_path: Path
) -> None:
    rows, norms = _dp_run(
        cache_dir,
        tmp_path / "run",
        "server.rounds=3",
        "dp.noise_multiplier=0.5",
        "dp.sampling=all",
        "dp.adaptive_clipping=true",
        "dp.target_quantile=0.9",
        "dp.clip_lr=1.0",
    )

    clips = [row["dp"]["clip_norm"] for row in rows[1:]]
    assert clips[0] == 0.05
    for row, following in itertools.pairwise(rows[1:]):
        assert following["dp"]["clip_norm"] == row["dp"]["next_clip_norm"]
    assert len(set(clips)) == 3  # C moved every round
    for r, clip in enumerate(clips):  # every client of round r was clipped to that round's C
        assert max(norms[4 * r : 4 * r + 4]) <= clip * (1 + 1e-5)
    assert rows[1]["dp"]["count_noise"] == 0.5  # max(E/20, z) with E = 4
    assert rows[1]["dp"]["update_noise_multiplier"] == pytest.approx(
        update_noise_multiplier(0.5, 0.5)
    )


def test_the_ledger_leaves_the_process_logging_as_it_was() -> None:
    # q = 0.5, z = 1 makes dp-accounting warn through absl, which configures the root logger
    # (and so echoes every library's DEBUG records) when the root has no handler
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        Ledger("rdp", 1e-5, [RoundEvent(1.0, "poisson", "central", 0.5)] * 2).epsilon()
        assert root.handlers == []
    finally:
        root.handlers[:] = saved


def test_a_look_ahead_and_the_record_that_follows_compose_once(monkeypatch) -> None:
    from fedllama.privacy.dp import accounting

    built = []
    real = accounting._accountant
    monkeypatch.setattr(accounting, "_accountant", lambda *a: built.append(a) or real(*a))
    event = RoundEvent(1.0, "poisson", "central", sampling_rate=0.1)
    ledger = Ledger("rdp", 1e-5, [event] * 3)

    ahead = ledger.epsilon(event)  # the budget check before round 4
    after = ledger.add(event)  # the record after it

    assert after == ahead and len(built) == 1


def test_server_release_under_adaptive_clipping_carries_z_delta_c_and_the_count_noise() -> None:
    from fedllama.server.dp import ServerDp

    cfg = config_lib.load(
        TINY_YAML,
        [
            "dp.enabled=true",
            "dp.noise_multiplier=1.0",
            "dp.clip_norm=0.2",
            "dp.sampling=all",
            "dp.adaptive_clipping=true",
            "dp.count_noise=2.0",
            "simulation.num_clients=4",
        ],
    )
    dp = ServerDp.start(cfg)

    release = dp.release(frozenset({WEIGHT_KEY}), population=4, server_round=1)
    release(
        {
            "payload": torch.zeros(10),
            WEIGHT_KEY: torch.tensor([4.0]),
            UNCLIPPED: torch.tensor([2.0]),
        }
    )
    entry = dp.record(population=4, sampled=4, release=release)

    assert release.noise_std == pytest.approx(update_noise_multiplier(1.0, 2.0) * 0.2)
    assert release.count_noise == 2.0 and release.expected_clients == 4
    assert release.unclipped is not None and entry["unclipped_fraction"] == release.unclipped
    assert dp.clip_norm == pytest.approx(next_clip_norm(0.2, release.unclipped, 0.5, 0.2))
    assert entry["next_clip_norm"] == dp.clip_norm


def test_adaptive_clipping_resumes_from_the_last_rounds_c(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    dp = [
        "dp.noise_multiplier=0.5",
        "dp.sampling=all",
        "dp.adaptive_clipping=true",
        "dp.clip_lr=1.0",
    ]

    first, _ = _dp_run(cache_dir, out, "server.rounds=1", *dp)
    resumed, norms = _dp_run(cache_dir, out, "server.rounds=2", *dp)

    carried = first[1]["dp"]["next_clip_norm"]
    assert carried != 0.05 and resumed[2]["dp"]["clip_norm"] == carried
    assert len(norms) == 4 and max(norms) <= carried * (1 + 1e-5)  # round 2 clipped to it


def test_the_server_holds_every_plain_reply_to_c_whatever_the_client_sent(
    cache_dir: Path, tmp_path: Path
) -> None:
    def unclipped(pid: int, reply: Message) -> Message:
        if pid == 2 and not reply.has_error() and ARRAYS in reply.content.array_records:
            record = reply.content.array_records[ARRAYS]
            sent = from_record(record)
            for key in sent:
                if key != WEIGHT_KEY:
                    sent[key] = sent[key] * 100  # a client that does not clip
            reply.content.array_records[ARRAYS] = to_record(sent)
        return reply

    cfg = tiny_config(
        cache_dir,
        tmp_path / "run",
        "simulation.num_clients=4",
        "data.partition=iid",
        "dp.enabled=true",
        "dp.clip_norm=0.05",
        "dp.noise_multiplier=0.5",
        "dp.sampling=all",
        "dp.seed=1",
        "server.min_replies=2",
        "server.rounds=1",
        "output.plot=false",
    )
    with logged() as lines:
        rows = run(InProcessGrid(4, unclipped), cfg)

    assert rows[-1]["clients_ok"] == 3 and rows[-1]["clients_dropped"] == 1
    expected = (
        "dropped node 102 (client 2): the update's norm 5 exceeds the round's DP clip norm C = 0.05"
    )
    assert any(expected in line for line in lines)


def test_admit_reclips_float_rounding_and_refuses_a_forged_indicator() -> None:
    release = Release(frozenset({WEIGHT_KEY}), 0.0, noise_generator(0), 4.0, clip_norm=1.0)
    hair = {A: torch.full((4,), 0.5 * (1 + 5e-5)), WEIGHT_KEY: torch.ones(1)}  # norm 1.00005

    admitted = release.admit(hair)

    assert update_norm(admitted, {WEIGHT_KEY}) <= 1.0 + 1e-7
    with pytest.raises(MergeError, match=r"must be ±0.5"):
        release.admit({**hair, UNCLIPPED: torch.tensor([3.0])})
