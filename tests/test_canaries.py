"""Canaries: insertion into one client's data, exposure, the one-run ε audit, the command."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from fedllama import cli, data
from fedllama import config as config_lib
from fedllama.data import canaries as canary_data
from fedllama.experiments import canaries
from tests.harness import InProcessGrid, tiny_config
from tests.harness import run as _run


def test_exposure_by_hand() -> None:
    references = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # n = 7: at most log2(8) = 3 bits

    assert canaries.exposure(2.5, references) == pytest.approx(math.log2(8) - math.log2(3))
    assert canaries.exposure(0.5, references) == 3.0, "more likely than every reference"
    assert canaries.exposure(9.0, references) == 0.0, "less likely than every reference"
    assert canaries.exposure(2.0, references) == pytest.approx(3 - math.log2(3)), "ties count"


def test_binomial_tail_is_exact() -> None:
    brute = sum(math.comb(10, i) * 0.3**i * 0.7 ** (10 - i) for i in range(4, 11))

    assert canaries.binomial_tail(4, 10, 0.3) == pytest.approx(brute, rel=1e-12)
    assert canaries.binomial_tail(0, 10, 0.3) == 1.0 and canaries.binomial_tail(11, 10, 0.3) == 0


def test_audit_of_a_perfect_separation_by_hand() -> None:
    inserted = [float(i) for i in range(20)]  # every inserted canary more likely
    held_out = [float(100 + i) for i in range(20)]
    # k = 20: 40 of 40 right; p^40 <= 0.05/20 -> p = 0.0025^(1/40), ε = log(p / (1 - p))
    p = (0.05 / 20) ** (1 / 40)

    found = canaries.audit(inserted, held_out)

    assert (found.correct, found.guesses) == (40, 40)
    assert found.epsilon == pytest.approx(math.log(p / (1 - p)), abs=1e-6)


def test_audit_finds_no_leakage_in_small_samples_or_identical_distributions() -> None:
    assert canaries.audit([0.0, 1.0], [2.0, 3.0]).epsilon == 0.0, "4 canaries prove nothing"
    rng = random.Random(0)
    same = [rng.gauss(0, 1) for _ in range(400)]

    assert canaries.audit(same[:200], same[200:]).epsilon < 0.3


def test_canaries_go_into_one_clients_training_data_only(cache_dir: Path) -> None:
    cfg = tiny_config(
        cache_dir, Path("unused"), "data.canary.count=12", "data.canary.repeats=3",
        "data.canary.client=1",
    )  # fmt: skip
    plain = tiny_config(cache_dir, Path("unused"))
    spec = cfg.data.canary

    federation = data.build_federation(cfg.data, 3, cache_dir)
    before = data.build_federation(plain.data, 3, cache_dir)

    candidates = canary_data.candidates(spec)
    inserted = [c for c in candidates if c.inserted]
    assert 0 < len(inserted) < len(candidates), "a fair coin each"
    answers = [
        ex["messages"][-1]["content"]
        for ex in federation.clients[1].train
        if ex["institution"] == canary_data.INSTITUTION
    ]
    assert sorted(answers) == sorted(c.answer() for c in inserted for _ in range(3))
    assert len(federation.clients[1].train) == len(before.clients[1].train) + 3 * len(inserted)
    for pid in (0, 2):
        assert federation.clients[pid].train == before.clients[pid].train
    assert federation.global_eval == before.global_eval
    refs = canary_data.references(spec, candidates[0])
    assert len(refs) == spec.references and candidates[0].secret not in refs
    assert len(candidates[0].secret.split()) == canary_data.DIGITS


def test_a_canary_client_that_does_not_exist_is_refused(cache_dir: Path) -> None:
    cfg = tiny_config(cache_dir, Path("unused"), "data.canary.count=4", "data.canary.client=3")

    with pytest.raises(data.DataError, match=r"data.canary.client=3, but there are 3 clients"):
        data.build_federation(cfg.data, 3, cache_dir)


CANARIES = [
    "server.rounds=1", "data.canary.count=8", "data.canary.repeats=4", "data.canary.client=0",
    "data.canary.references=10",
]  # fmt: skip


def test_canaries_command_measures_each_round(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _run(InProcessGrid(3), tiny_config(cache_dir, out, *CANARIES))
    coins = [
        c.inserted for c in canary_data.candidates(config_lib.load(None, CANARIES).data.canary)
    ]

    code = cli.main(["canaries", str(out), "--rounds", "all"])

    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split(":")[0] for line in printed] == ["round 0", "round 1"]
    assert "empirical ε >= " in printed[1] and "held out" in printed[1]
    for server_round in (0, 1):
        report = json.loads((out / f"canaries-round-{server_round:03d}.json").read_text())
        exposure = report["exposure"]
        assert exposure["max_bits"] == pytest.approx(math.log2(11))
        assert len(exposure["inserted"]) == sum(coins)
        assert len(exposure["held_out"]) == len(coins) - sum(coins)
        assert all(0 <= e <= exposure["max_bits"] for e in exposure["inserted"])
        assert "Steinke, Nasr & Jagielski" in report["audit"]["assumes"]
        assert report["accountant"] is None, "no DP in this run"


def test_canaries_command_on_a_run_without_them_says_what_to_do(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(config_lib.to_yaml(tiny_config(cache_dir, out)))

    code = cli.main(["canaries", str(out)])

    err = capsys.readouterr().err.splitlines()
    assert code == 2 and "without canaries" in err[-2]
    assert err[-1].startswith("fedllama: to fix: run it with data.canary.count=")
