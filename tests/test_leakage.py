"""Membership inference (``fedllama leakage``): the metrics on synthetic scores, each score on
a hand-worked example, members rebuilt exactly as a real run's training drew them, and the
command end to end on a tiny run."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedllama import cli, data, model
from fedllama.experiments import leakage
from fedllama.model import likelihood, replay, train
from fedllama.server.metrics import MetricsRow
from tests.harness import InProcessGrid, run, tiny_config

LN = math.log

# --------------------------------------------------------------------------- metrics


def test_auc_is_high_when_members_have_clearly_lower_loss() -> None:
    rng = np.random.default_rng(1)
    member_loss, non_member_loss = rng.normal(1.0, 0.3, 300), rng.normal(2.0, 0.3, 300)

    auc = leakage.roc_auc(-member_loss, -non_member_loss)

    assert auc > 0.9


def test_auc_is_about_half_on_identical_distributions() -> None:
    rng = np.random.default_rng(2)

    auc = leakage.roc_auc(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000))

    assert abs(auc - 0.5) < 0.03


def test_auc_counts_ties_half() -> None:
    # pairs (member, non-member): 2>1, 2>0, 1=1 (half), 1>0 -> 3.5 of 4
    assert leakage.roc_auc(np.array([2.0, 1.0]), np.array([1.0, 0.0])) == 0.875
    assert leakage.roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5


def test_tpr_at_low_fpr_on_a_hand_computed_case() -> None:
    members = np.array([5.0, 4.0, 3.0, 2.0])
    non_members = np.array([4.5, 1.0, 0.0, -1.0])
    # threshold 5: TPR 1/4 at FPR 0; 4.5: FPR 1/4; 2: TPR 4/4 at FPR 1/4; 1: FPR 2/4

    assert leakage.tpr_at_fpr(members, non_members, 0.0) == 0.25
    assert leakage.tpr_at_fpr(members, non_members, 0.1) == 0.25
    assert leakage.tpr_at_fpr(members, non_members, 0.25) == 1.0


def test_tpr_at_low_fpr_is_reported_only_with_enough_non_members() -> None:
    rng = np.random.default_rng(3)

    few = leakage.attack_metrics(rng.normal(1, 1, 99), rng.normal(0, 1, 99), 20, 0)
    enough = leakage.attack_metrics(rng.normal(1, 1, 100), rng.normal(0, 1, 100), 20, 0)

    assert few["tpr_at_1pct_fpr"] is None
    assert few["tpr_at_1pct_fpr_note"] == "n/a (needs ≥ 100 non-members)"
    assert 0.0 <= enough["tpr_at_1pct_fpr"] <= 1.0
    lo, hi = enough["tpr_at_1pct_fpr_ci95"]
    assert lo <= hi
    assert enough["tpr_at_0.1pct_fpr_note"] == "n/a (needs ≥ 1000 non-members)"


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(4)
    widths = []
    for n in (50, 800):
        members, non_members = rng.normal(0.5, 1, n), rng.normal(0, 1, n)
        auc = leakage.roc_auc(members, non_members)

        lo, hi = leakage.bootstrap_ci(leakage.roc_auc, members, non_members, 500, seed=0)

        assert lo <= auc <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # width ~ 1/sqrt(n): 4x for 16x the examples


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(5)
    members, non_members = rng.normal(0.5, 1, 60), rng.normal(0, 1, 60)

    first = leakage.bootstrap_ci(leakage.roc_auc, members, non_members, 100, seed=7)
    again = leakage.bootstrap_ci(leakage.roc_auc, members, non_members, 100, seed=7)

    assert first == again


# --------------------------------------------------------------------------- scores


def test_min_k_prob_averages_the_k_share_of_least_likely_tokens() -> None:
    probs = [0.5, 0.25, 0.1, 0.9, 0.8, 0.05, 0.6, 0.7, 0.3, 0.4]

    score = leakage.min_k_prob(np.log(probs), k=0.2)

    assert score == pytest.approx((LN(0.05) + LN(0.1)) / 2)  # the 2 lowest of 10


def test_min_k_prob_keeps_at_least_one_token() -> None:
    assert leakage.min_k_prob(np.log([0.5, 0.25, 0.9, 0.8]), k=0.2) == pytest.approx(LN(0.25))


def test_token_statistics_of_a_hand_worked_distribution() -> None:
    # p = (1/2, 1/4, 1/4): mu = (ln 1/2 + ln 1/4) / 2 = -1.5 ln 2,
    # var = E[(ln p)^2] - mu^2 = (ln 2)^2 (1/2 + 4/2 - 9/4) = (ln 2)^2 / 4: std = ln 2 / 2
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))

    chosen, mean, std = likelihood._token_stats(logits, torch.tensor([0, 1]))

    assert chosen.tolist() == pytest.approx([LN(0.5), LN(0.25)])
    assert mean.tolist() == pytest.approx([-1.5 * LN(2)] * 2)
    assert std.tolist() == pytest.approx([LN(2) / 2] * 2)


def test_min_k_plus_plus_standardises_each_token() -> None:
    # with the distribution above: ln 1/2 is +1 std above mu, ln 1/4 is -1 std below
    logprob = np.array([LN(0.5), LN(0.25)])
    mean = np.full(2, -1.5 * LN(2))
    std = np.full(2, LN(2) / 2)

    assert leakage.min_k_plus_plus(logprob, mean, std, k=0.5) == pytest.approx(-1.0)
    assert leakage.min_k_plus_plus(logprob, mean, std, k=1.0) == pytest.approx(0.0)


def test_zlib_ratio_divides_the_loss_by_the_compressed_length() -> None:
    logprob = np.array([LN(0.5), LN(0.25)])  # loss 1.5 ln 2

    ratio = leakage.zlib_ratio(logprob, "a" * 100)

    assert len(zlib.compress(b"a" * 100)) == 12
    assert ratio == pytest.approx(1.5 * LN(2) / 12)


def test_reference_loss_is_the_adapter_loss_minus_the_base_loss() -> None:
    assert leakage.reference_loss(np.array([-1.0, -1.0]), np.array([-3.0, -2.0])) == -1.5


def _example(logprob: float, base: float, text: str = "some answer text") -> Any:
    n = 10
    return likelihood.AnswerStats(
        np.full(n, logprob), np.full(n, -3.0), np.full(n, 1.0), np.full(n, base), text
    )


def test_every_attack_scores_a_better_fitted_answer_as_more_likely_a_member() -> None:
    fitted, unfitted = _example(-0.5, -2.0), _example(-2.0, -2.0)

    for name, attack in leakage.ATTACKS.items():
        assert attack.score(fitted) > attack.score(unfitted), name


def test_client_level_test_detects_a_shift_and_not_its_absence() -> None:
    rng = np.random.default_rng(6)
    members = [_example(-1.0 + rng.normal(0, 0.1), -2.0) for _ in range(30)]
    same = [_example(-1.0 + rng.normal(0, 0.1), -2.0) for _ in range(30)]
    worse = [_example(-1.3 + rng.normal(0, 0.1), -2.0) for _ in range(30)]

    shifted = leakage.client_level(members, worse, 500, seed=0)
    null = leakage.client_level(members, same, 500, seed=0)

    assert shifted["took_part"] and shifted["p_value"] < 0.01
    assert not null["took_part"]
    assert "never trained on" in shifted["assumption"]


# --------------------------------------------------------------------------- the run's rows


def test_contributions_leave_out_skipped_rejected_rounds_and_left_out_clients() -> None:
    def client(node: int, cid: int) -> dict[str, Any]:
        return {"node": node, "client-id": cid, "num-examples": 10, "steps": 2}

    rows = [
        MetricsRow(round=0, eval_loss=1.0),
        MetricsRow(round=1, eval_loss=1.0, clients=[client(100, 0), client(101, 1)]),
        MetricsRow(round=2, eval_loss=1.0, clients=[client(100, 0)], rejected="loss up"),
        MetricsRow(round=3, eval_loss=1.0, skipped="no replies"),
        MetricsRow(
            round=4,
            eval_loss=1.0,
            clients=[client(100, 0), client(101, 1)],
            robust={"left_out": [101]},
        ),
    ]

    found = leakage.contributions(rows, 4)

    assert [(c.server_round, c.client_id) for c in found] == [(1, 0), (1, 1), (4, 0)]
    with pytest.raises(leakage.LeakageError, match="no row for round 5"):
        leakage.contributions(rows, 5)


def test_balance_draws_as_many_non_members_as_members_reproducibly() -> None:
    members, non_members = list(range(10)), list(range(100, 130))

    first = leakage.balance(members, non_members, None, "0-1")
    capped = leakage.balance(members, non_members, 4, "0-1")

    assert first == leakage.balance(members, non_members, None, "0-1")
    assert len(first[0]) == len(first[1]) == 10
    assert len(capped[0]) == len(capped[1]) == 4
    assert set(first[1]) <= set(non_members)


# --------------------------------------------------------------------------- a real tiny run

ROUNDS = 2
OVERRIDES = (
    f"server.rounds={ROUNDS}",
    "server.fraction_train=0.67",  # 2 of the 3 clients a round: participation matters
    "data.eval_fraction=0.4",
    "train.local_steps=3",  # 12 of each client's ~29 training examples a round
    "server.evaluate=false",
)


@pytest.fixture(scope="module")
def tiny_run(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[int, set[tuple[int, ...]]]]]:
    """A 2-round tiny run and what its local training drew: batch order seed -> token ids of
    every example in its batches."""
    out = tmp_path_factory.mktemp("leakage") / "run"
    cfg = tiny_config(cache_dir, out, *OVERRIDES)
    drew: dict[int, set[tuple[int, ...]]] = {}
    seed: list[int] = []
    real_train, real_collate = train.train_local, train.collate

    def spy_train(*args: Any, **kwargs: Any) -> Any:
        seed.append(kwargs["seed"])
        try:
            return real_train(*args, **kwargs)
        finally:
            seed.pop()

    def spy_collate(batch: list[data.Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        if seed:  # training draws, not evaluation
            drew.setdefault(seed[-1], set()).update(tuple(e.input_ids) for e in batch)
        return real_collate(batch, pad_id)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_local", spy_train)
        mp.setattr(train, "collate", spy_collate)
        run(InProcessGrid(3), cfg)
    yield out, drew


def test_members_are_exactly_the_examples_training_drew(
    tiny_run: tuple[Path, dict[int, set[tuple[int, ...]]]],
) -> None:
    out, drew = tiny_run
    the_run = leakage.open_run(out)
    cfg = the_run.cfg
    _, tok = model.get_lora_model(cfg)
    federation = data.build_federation(
        cfg.data, cfg.simulation.num_clients, model.cache_root(cfg.model)
    )

    clients = replay.membership(cfg, tok, federation, the_run.participation())

    trained: dict[int, set[tuple[int, ...]]] = {}
    for seed, examples in drew.items():  # seed = data.seed + 1000 * round + client id
        trained.setdefault((seed - cfg.data.seed) % 1000, set()).update(examples)
    rebuilt = {c.client_id: {tuple(x.input_ids) for x in c.members} for c in clients}
    assert {k: v for k, v in rebuilt.items() if v} == trained
    assert len(drew) == 2 * ROUNDS, "2 of 3 clients trained in each round"
    leakage.check_rebuilt(the_run, {c.client_id: c.train_size for c in clients})
    every_member = set().union(*rebuilt.values())
    for c in clients:
        assert c.non_members, f"client {c.client_id} has non-members"
        assert not every_member & {tuple(x.input_ids) for x in c.non_members}
        assert len(c.members) < c.train_size, "only what was drawn, not the whole split"


def test_leakage_command_writes_the_report(
    tiny_run: tuple[Path, dict[int, set[tuple[int, ...]]]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = tiny_run

    code = cli.main(["leakage", str(out), "--resamples", "50", "--max-examples", "8"])

    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / f"leakage-round-{ROUNDS:03d}.json").read_text())
    assert report["round"] == ROUNDS
    assert set(report["overall"]["attacks"]) == set(leakage.ATTACKS)
    overall = report["overall"]
    assert overall["members"] == overall["non_members"] > 0
    scored = [c for c in report["clients"] if c["rounds"]]  # sampling may skip a client
    assert scored
    for c in scored:
        assert c["members"] == c["non_members"] <= 8
        assert 0.0 <= c["attacks"]["reference"]["auc"] <= 1.0
        assert "p_value" in c["client_level"]
    assert overall["attacks"]["loss"]["tpr_at_1pct_fpr_note"] == "n/a (needs ≥ 100 non-members)"
    assert "threat model:" in printed and "n/a (needs ≥ 100 non-members)" in printed


def test_leakage_command_refuses_a_round_that_was_not_trained(
    tiny_run: tuple[Path, dict[int, set[tuple[int, ...]]]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = tiny_run

    code = cli.main(["leakage", str(out), "--round", str(ROUNDS + 1)])

    assert code == 2
    assert f"expected a trained round in 1..{ROUNDS}" in capsys.readouterr().err
