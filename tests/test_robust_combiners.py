"""Bounded influence on the plain path: norm bounds and robust combiners (issue #12, item 1).

Every case starts where a wrong formula would show: unequal weights, a non-zero global state,
mixed ranks, an attacker whose update is many orders of magnitude off.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedllama import config as config_lib
from fedllama.config import ConfigError
from fedllama.merge import WEIGHT_KEY
from fedllama.merge import robust as rules
from fedllama.server import checkpoint
from fedllama.wire.records import ARRAYS, METRICS, from_record, to_record
from tests.harness import TINY_YAML, InProcessGrid, logged, run, tiny_config

A, B = "m.lora_A.weight", "m.lora_B.weight"
SHAPES = {A: (2, 3), B: (3, 2)}


def _updates(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=generator) for k, s in SHAPES.items()} for _ in range(n)]


# --------------------------------------------------------------------------- the rules


def test_the_coordinate_wise_median_and_trimmed_mean_match_numpy() -> None:
    updates = _updates(6)
    updates[2] = {k: v * 1e6 for k, v in updates[2].items()}  # an attacker
    counts = [{WEIGHT_KEY: torch.ones(1)} for _ in updates]

    median, _ = rules.combine(updates, counts, "median")
    trimmed, _ = rules.combine(updates, counts, "trimmed_mean", trim=0.2)

    for key in SHAPES:
        stacked = np.stack([u[key].numpy() for u in updates])
        np.testing.assert_allclose(median[key].numpy(), np.median(stacked, 0), rtol=1e-6)
        cut = int(6 * 0.2)  # one value at each end
        expected = np.sort(stacked, 0)[cut : 6 - cut].mean(0)
        np.testing.assert_allclose(trimmed[key].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert float(trimmed[key].abs().max()) < 10  # the attacker's 1e6 is cut
    assert float(median[WEIGHT_KEY][0]) == 1.0  # one virtual client of weight 1


def test_with_mixed_ranks_each_slot_is_judged_by_its_owners_only() -> None:
    from strategies._rank import SLOT_WEIGHT

    # 4 clients at global rank 2: two own both slots, two own slot 0 only (zeros in slot 1)
    updates = _updates(4, seed=1)
    counts = []
    for i, update in enumerate(updates):
        rank = 2 if i < 2 else 1
        update[A][rank:] = 0.0
        update[B][:, rank:] = 0.0
        counts.append({SLOT_WEIGHT: torch.tensor([1.0, 1.0 if rank == 2 else 0.0])})

    median, _ = rules.combine(updates, counts, "median")

    owners = torch.stack([updates[0][A][1], updates[1][A][1]])
    torch.testing.assert_close(median[A][1], owners.mean(0))  # the median of two: their mean
    everyone = torch.stack([u[A][0] for u in updates])
    torch.testing.assert_close(median[A][0], _median4(everyone))  # all four own slot 0
    torch.testing.assert_close(median[SLOT_WEIGHT], torch.tensor([1.0, 1.0]))


def _median4(stacked: torch.Tensor) -> torch.Tensor:
    ordered = stacked.sort(0).values
    return (ordered[1] + ordered[2]) / 2


def test_krum_picks_an_honest_update_and_multi_krum_averages_the_honest_ones() -> None:
    honest = [{k: v * 0.1 + 1.0 for k, v in u.items()} for u in _updates(7, seed=2)]
    attackers = [{k: torch.full(s, -50.0 - i) for k, s in SHAPES.items()} for i in range(2)]
    updates = [attackers[0], *honest[:4], attackers[1], *honest[4:]]
    counts = [{WEIGHT_KEY: torch.ones(1)} for _ in updates]

    krum, krum_out = rules.combine(updates, counts, "krum", byzantine=2)
    multi, multi_out = rules.combine(updates, counts, "multi_krum", byzantine=2)

    assert any(all(torch.equal(krum[k], h[k]) for k in SHAPES) for h in honest)
    assert len(krum_out) == 8 and 0 in krum_out and 5 in krum_out
    assert sorted(multi_out) == [0, 5]  # m = n - f = 7: exactly the honest ones
    for key in SHAPES:
        torch.testing.assert_close(multi[key], torch.stack([h[key] for h in honest]).mean(0))


def test_krum_refuses_fewer_than_2f_plus_3_updates() -> None:
    from fedllama.merge import MergeError

    updates = _updates(4)
    with pytest.raises(MergeError, match="at least 2f \\+ 3 = 5 updates, got 4"):
        rules.combine(updates, [{WEIGHT_KEY: torch.ones(1)}] * 4, "krum", byzantine=1)


def test_the_bound_is_fixed_a_multiple_of_the_median_or_the_smaller_of_both() -> None:
    norms = [1.0, 2.0, 3.0, 400.0]
    assert rules.bound_of(norms, 5.0, 0.0) == 5.0
    assert rules.bound_of(norms, 0.0, 2.0) == pytest.approx(2.0 * 2.0)  # torch's lower median
    assert rules.bound_of(norms, 3.0, 2.0) == 3.0
    assert rules.bound_of(norms, 0.0, 0.0) == math.inf
    encoded = {A: torch.full((2, 3), 6.0), WEIGHT_KEY: torch.tensor([3.0])}
    assert rules.update_norm(encoded, {WEIGHT_KEY}, 3.0) == pytest.approx(math.sqrt(6) * 2)
    scaled = rules.scale_update(encoded, {WEIGHT_KEY}, 0.5)
    assert float(scaled[WEIGHT_KEY][0]) == 3.0 and float(scaled[A][0, 0]) == 3.0


# --------------------------------------------------------------------------- the server's tally


def _message(node: int, update: dict[str, np.ndarray], examples: int) -> Message:
    arrays = {k: Array((v * examples).astype(np.float32)) for k, v in update.items()}
    arrays[WEIGHT_KEY] = Array(np.array([float(examples)], np.float32))
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(arrays),
            METRICS: MetricRecord({"num-examples": examples, "train-loss": 1.0}),
        }
    )
    msg = Message(content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _round(robust: str, updates: list[dict[str, np.ndarray]], examples: list[int]):  # type: ignore[no-untyped-def]
    from fedllama.server.aggregate import RoundPlan, RoundRecord, collect
    from fedllama.wire.validate import ReplySpec
    from strategies.fedavg import FedAvg

    InProcessGrid(1)  # Flower's task identity, which a Message needs
    cfg = config_lib.load(TINY_YAML, robust.split())
    global_state = {k: torch.full(s, 0.5) for k, s in SHAPES.items()}  # non-zero
    spec = ReplySpec(shapes={**SHAPES, WEIGHT_KEY: (1,)})
    plan = RoundPlan(1, [], FedAvg(), global_state, spec, robust=cfg.robust)
    messages = [
        _message(100 + i, u, n) for i, (u, n) in enumerate(zip(updates, examples, strict=True))
    ]
    return collect(plan, messages, RoundRecord(server_round=1))


def _np_updates(n: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in u.items()} for u in _updates(n, seed)]


def test_a_fixed_bound_clips_the_attacker_into_the_weighted_mean() -> None:
    updates = _np_updates(3)
    updates[1] = {k: v * 1e30 for k, v in updates[1].items()}
    examples = [5, 7, 11]
    with logged(level=20) as lines:
        record = _round("robust.norm_bound=5.0", updates, examples)  # honest norms ~3

    def clipped(u: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in u.values()))
        return {k: v * min(1.0, 5.0 / norm) for k, v in u.items()}

    assert record.delta is not None and record.ok == 3
    for key in SHAPES:
        expected = sum(n * clipped(u)[key] for u, n in zip(updates, examples, strict=True)) / sum(
            examples
        )
        np.testing.assert_allclose(record.delta[key].numpy(), expected, rtol=1e-5)
    assert record.robust is not None and list(record.robust["clipped"]) == ["101"]
    assert any("clipped node 101's update" in line for line in lines)

    dropping = _round("robust.norm_bound=5.0 robust.over_bound=drop", updates, examples)
    assert dropping.ok == 2 and dropping.robust is not None
    assert dropping.robust["dropped"] == [101] and dropping.robust["clipped"] == {}


def test_drop_leaves_the_attacker_out_of_the_mean_and_the_tally() -> None:
    updates = _np_updates(3)
    updates[2] = {k: v * 1e4 for k, v in updates[2].items()}
    examples = [5, 7, 11]
    with logged() as lines:
        record = _round("robust.norm_bound_median=3 robust.over_bound=drop", updates, examples)

    assert record.ok == 2 and record.dropped == 1 and record.examples == 12
    assert record.delta is not None
    for key in SHAPES:
        expected = (5 * updates[0][key] + 7 * updates[1][key]) / 12
        np.testing.assert_allclose(record.delta[key].numpy(), expected, rtol=1e-5)
    assert record.robust is not None and record.robust["dropped"] == [102]
    assert any("dropped node 102: update norm" in line and "x median" in line for line in lines)


def test_the_median_combiner_ignores_weights_and_outliers() -> None:
    updates = _np_updates(5)
    updates[0] = {k: v * 1e30 for k, v in updates[0].items()}
    record = _round("robust.combiner=median", updates, [1, 2, 3, 4, 1000])

    assert record.delta is not None and record.ok == 5
    for key in SHAPES:
        expected = np.median(np.stack([u[key] for u in updates]), 0)
        np.testing.assert_allclose(record.delta[key].numpy(), expected, rtol=1e-5)


def test_every_update_over_the_bound_leaves_the_round_without_a_delta_naming_why() -> None:
    from fedllama.server.aggregate import RoundFailed

    updates = [{k: v * 100 for k, v in u.items()} for u in _np_updates(3)]
    with logged() as lines:  # the mean streams: each reply is dropped as it arrives
        record = _round("robust.norm_bound=0.1 robust.over_bound=drop", updates, [1, 2, 3])
    assert record.delta is None and record.ok == 0 and record.dropped == 3
    assert record.robust is None  # no delta: the round has no bound summary
    assert sum("over the bound 0.1 (robust.norm_bound=0.1)" in line for line in lines) == 3

    held = "robust.norm_bound=0.1 robust.over_bound=drop robust.combiner=median"
    with pytest.raises(RoundFailed, match="round 1: no update is left within the bound"):
        _round(held, updates, [1, 2, 3])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["robust.combiner=median", "secagg.enabled=true"], "only their sum"),
        (
            ["robust.norm_bound=1", "dp.enabled=true", "dp.noise_multiplier=1"],
            "\\(dp.clip_norm\\) already bounds",
        ),
        (["robust.combiner=krum", "robust.byzantine=1"], "2f \\+ 3 = 5 clients"),
        (["robust.combiner=mode"], "expected one of mean, median"),
        (["robust.trim=0.5"], "must be in \\[0, 0.5\\)"),
        (["robust.norm_bound_median=0.5"], "must be 0 \\(off\\) or >= 1"),
    ],
)
def test_bad_robust_settings_are_refused_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_lib.load(TINY_YAML, overrides)


@pytest.mark.parametrize(
    ("strategy", "overrides", "message"),
    [
        ("zero_pad", ["robust.combiner=median"], "vote for zero"),
        ("hetlora", ["robust.combiner=trimmed_mean"], "norm of the client's trained factors"),
        ("flora", ["robust.combiner=median"], "trusted-server rule"),
        ("hetlora", ["robust.norm_bound=1"], "not its weight times the client's update"),
        ("fedex_lora", ["robust.norm_bound_median=2"], "cannot bound the update's norm"),
    ],
)
def test_rules_a_robust_statistic_would_break_are_refused_with_the_reason(
    strategy: str, overrides: list[str], message: str
) -> None:
    import server.app

    cfg = config_lib.load(TINY_YAML, [f"strategy.name={strategy}", *overrides])
    with pytest.raises(ConfigError, match=message):
        server.app.check(cfg)


@pytest.mark.parametrize("strategy", ["fedavg", "rank_aware", "ffa_lora", "fedsa_lora", "rolora"])
def test_rules_that_average_per_coordinate_accept_robust_combiners(strategy: str) -> None:
    import server.app

    overrides = [f"strategy.name={strategy}", "robust.combiner=median", "robust.norm_bound=5"]
    server.app.check(config_lib.load(TINY_YAML, overrides))


# --------------------------------------------------------------------------- a federation


def _amplify(pid_to_change: int, factor: float):  # type: ignore[no-untyped-def]
    """A tamper hook: one client multiplies its whole update (not its weight)."""

    def tamper(pid: int, reply: Message) -> Message:
        if pid == pid_to_change and ARRAYS in reply.content.array_records:
            sent = from_record(reply.content.array_records[ARRAYS])
            sent = {k: v if k == WEIGHT_KEY else v * factor for k, v in sent.items()}
            reply.content.array_records[ARRAYS] = to_record(sent)
        return reply

    return tamper


def test_a_poisoning_client_moves_the_mean_but_not_a_median_federation(
    cache_dir: Path, tmp_path: Path
) -> None:
    common = ["server.rounds=1", "output.plot=false", "simulation.num_clients=3"]
    median = [*common, "robust.combiner=median", "robust.norm_bound=50"]
    runs = {
        name: run(InProcessGrid(3, tamper), tiny_config(cache_dir, tmp_path / name, *overrides))[-1]
        for name, tamper, overrides in [
            ("mean", None, common),
            ("mean-poisoned", _amplify(1, 1e6), common),
            ("median", None, median),
            ("median-poisoned", _amplify(1, 1e6), median),
        ]
    }
    loss = {name: row["eval_loss"] for name, row in runs.items()}

    moved_mean = abs(loss["mean-poisoned"] - loss["mean"])
    moved_median = abs(loss["median-poisoned"] - loss["median"])
    assert moved_mean > 1e-3 and moved_median < 0.05 * moved_mean, loss
    poisoned = runs["median-poisoned"]
    assert poisoned["clients_ok"] == 3 and "rejected" not in poisoned
    assert poisoned["robust"]["combiner"] == "median" and len(poisoned["robust"]["clipped"]) == 1


def test_under_secure_aggregation_clients_clip_and_a_sum_nobody_clipped_is_not_released(
    cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from fedllama.client import round as client_round

    real = client_round.bound_own_update
    calls: list[float] = []

    def cheat_once(encoded, count_keys, weight, bound):  # type: ignore[no-untyped-def]
        calls.append(rules.update_norm(encoded, count_keys, weight))
        if len(calls) == 1:  # the first client skips its clip and amplifies its update
            return rules.scale_update(encoded, count_keys, 1e3)
        return real(encoded, count_keys, weight, bound)

    monkeypatch.setattr(client_round, "bound_own_update", cheat_once)
    bound = 1e-3
    cfg = tiny_config(
        cache_dir,
        tmp_path / "run",
        "server.rounds=1",
        "output.plot=false",
        "secagg.enabled=true",
        f"robust.norm_bound={bound}",
    )
    with logged() as lines:
        rows = run(InProcessGrid(3), cfg)

    assert min(calls) > bound  # every honest client had something to clip
    failed = [line for line in lines if "a client sent an update it did not clip" in line]
    assert len(failed) == 1 and "retrying" in failed[0]  # the sum was not released
    assert len(calls) == 6 and rows[-1]["clients_ok"] == 3 and "skipped" not in rows[-1]
    round0, _ = checkpoint.load_global(tmp_path / "run", 0)
    round1, _ = checkpoint.load_global(tmp_path / "run", 1)
    moved = math.sqrt(sum(float((round1[k] - round0[k]).square().sum()) for k in round0))
    assert moved <= bound * 1.01  # the released mean of clipped updates is within the bound


def test_secure_aggregation_takes_a_fixed_bound_but_not_one_from_the_median() -> None:
    config_lib.load(TINY_YAML, ["secagg.enabled=true", "robust.norm_bound=1"])
    with pytest.raises(ConfigError, match="robust.norm_bound_median: .* needs each client's"):
        config_lib.load(TINY_YAML, ["secagg.enabled=true", "robust.norm_bound_median=2"])
