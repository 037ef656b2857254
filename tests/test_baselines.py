"""Baselines from a run's config (``fedllama baseline``): the centralized one on every client's
training data pooled, the local-only one per client, the share of the centralized gain a
federated run reached, and how the run report shows them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedllama import cli
from fedllama import config as config_lib
from fedllama.experiments import report
from fedllama.model import baseline, train
from fedllama.server import checkpoint
from fedllama.server.metrics import MetricsRow, append_row
from tests.harness import TINY_YAML, InProcessGrid, run, tiny_config

# --------------------------------------------------------------------------- the steps


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), 3),  # tiny.yaml: 3 clients, fraction_train 1
        (("simulation.num_clients=4", "server.fraction_train=0.5"), 2),  # int(4 x 0.5)
        (("simulation.num_clients=4", "server.fraction_train=0.3", "server.min_replies=3"), 3),
        (("simulation.num_clients=5", "server.fraction_train=0.5"), 2),  # int() rounds down
    ],
)
def test_clients_per_round_follows_the_servers_sampling(
    overrides: tuple[str, ...], expected: int
) -> None:
    cfg = config_lib.load(TINY_YAML, list(overrides))

    assert baseline.clients_per_round(cfg) == expected
    assert baseline.total_steps(cfg) == cfg.server.rounds * expected * cfg.train.local_steps


def test_the_centralized_baseline_trains_the_federations_steps_on_the_pooled_examples(
    tiny_cfg: config_lib.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = baseline.setup(tiny_cfg)
    pooled = sum(len(setup.encode(c.train)) for c in setup.federation.clients)
    calls: list[tuple[int, int]] = []
    real = train.train_local

    def spy(model: Any, examples: Any, cfg: Any, *args: Any) -> train.TrainResult:
        calls.append((len(examples), cfg.local_steps))
        return real(model, examples, cfg, *args)

    monkeypatch.setattr(train, "train_local", spy)

    result = baseline.centralized(setup)

    steps = 2 * 3 * 2  # rounds x clients per round x local steps (tiny.yaml)
    assert calls == [(pooled, steps)]
    assert (result["steps"], result["train_examples"]) == (steps, pooled)
    assert [r for r, _ in result["curve"]] == [0, 1, 2]
    assert result["curve"][0][1] == result["eval0"]
    assert result["eval_loss"] == result["curve"][-1][1] < result["eval0"]


def test_the_local_baseline_scores_every_client_alone_on_both_eval_sets(
    tiny_cfg: config_lib.Config,
) -> None:
    setup = baseline.setup(tiny_cfg)

    result = baseline.local_only(setup)

    clients = result["clients"]
    assert [c["client_id"] for c in clients] == [0, 1, 2]
    assert all(c["steps"] == 2 * 2 for c in clients)  # rounds x local steps
    assert all(c["own_eval_examples"] >= 1 for c in clients)
    assert all(c["global_eval_loss"] < result["eval0"] for c in clients)
    assert all(c["own_eval_loss"] > 0 and c["own_eval0"] > 0 for c in clients)
    weights = [c["train_examples"] for c in clients]
    expected = sum(c["own_eval_loss"] * w for c, w in zip(clients, weights, strict=True))
    assert result["mean"]["own_eval_loss"] == pytest.approx(expected / sum(weights))


def test_the_command_measures_beside_a_run_with_its_round_0_loss_as_eval0(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    overrides = [f"model.cache_dir={cache_dir}", f"output.dir={out}", "server.rounds=1"]
    rows = run(InProcessGrid(3), tiny_config(cache_dir, out, "server.rounds=1"))

    code = cli.main(["baseline", str(TINY_YAML), *overrides])

    assert code == 0
    central = json.loads((out / "baselines" / "centralized.json").read_text())
    local = json.loads((out / "baselines" / "local.json").read_text())
    assert central["eval0"] == pytest.approx(rows[0]["eval_loss"], abs=1e-6)
    assert local["eval0"] == pytest.approx(rows[0]["eval_loss"], abs=1e-6)
    assert central["steps"] == 1 * 3 * 2
    assert central["config"]["train.lr"] == 1e-3 and "model.cache_dir" not in central["config"]
    printed = capsys.readouterr().out
    assert "share of the centralized gain" in printed
    assert "share of the centralized gain" in (out / "report.md").read_text()

    refused = cli.main(["baseline", str(TINY_YAML), *overrides, "train.lr=0.01"])

    assert refused == 2
    assert (
        "holds a run of another config (train.lr: 0.01 in the baseline, 0.001 in the run)"
        in capsys.readouterr().err
    )


# --------------------------------------------------------------------------- the command


def test_the_command_refuses_an_unknown_kind(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["baseline", str(TINY_YAML), "--kind", "federated"])

    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err == [
        "fedllama: --kind 'federated': expected one of centralized, local, both",
        "fedllama: to fix: e.g. --kind centralized",
    ]


def test_the_command_refuses_a_missing_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["baseline", str(tmp_path / "nope.yaml")])

    err = capsys.readouterr().err
    assert code == 2
    assert f"fedllama: config file '{tmp_path / 'nope.yaml'}' does not exist" in err


# --------------------------------------------------------------------------- the share, the report


def test_the_share_of_the_centralized_gain() -> None:
    assert report.share_of_gain(3.0, 2.2, 2.0) == pytest.approx(0.8)
    assert report.share_of_gain(3.0, 1.9, 2.0) == pytest.approx(1.1)  # beyond centralized
    assert report.share_of_gain(3.0, 2.2, 3.0) is None  # no centralized gain to share
    assert report.share_of_gain(3.0, float("nan"), 2.0) is None


ROWS = [
    MetricsRow(round=0, eval_loss=3.0),
    MetricsRow(round=1, eval_loss=2.5, train_loss=2.8, clients_ok=3),
    MetricsRow(round=2, eval_loss=2.2, train_loss=2.4, clients_ok=3),
]
CENTRAL = {
    "kind": "centralized",
    "assumption": "2 rounds x 3 clients per round x 2 local steps = 12 optimizer steps",
    "steps": 12,
    "eval0": 3.0,
    "eval_loss": 2.0,
    "curve": [[0, 3.0], [1, 2.4], [2, 2.0]],
}
LOCAL = {
    "kind": "local",
    "steps_per_client": 4,
    "clients": [{"client_id": i} for i in range(3)],
    "mean": {"weights": "training examples", "global_eval_loss": 2.6, "own_eval_loss": 2.3},
}


def _run_dir(out: Path, *overrides: str) -> tuple[Path, config_lib.Config]:
    cfg = config_lib.load(TINY_YAML, [f"output.dir={out}", *overrides])
    checkpoint.write_config(out, cfg)
    for row in ROWS:
        append_row(out, row)
    return out, cfg


def test_the_report_shows_the_share_when_a_centralized_baseline_is_there(tmp_path: Path) -> None:
    out, cfg = _run_dir(tmp_path / "run")
    baseline.write(out, baseline.CENTRALIZED, CENTRAL, cfg)
    baseline.write(out, baseline.LOCAL, LOCAL, cfg)

    text = report.write_run_report(out).read_text()

    assert "## Baselines (`fedllama baseline`)" in text
    assert "- eval₀ (the initial adapter, round 0): 3.0000" in text
    assert "- federated (round 2): 2.2000" in text
    assert "- centralized (pooled data, 12 steps: 2 rounds x 3 clients" in text
    assert (
        "- share of the centralized gain (eval₀ − eval_fed) / (eval₀ − eval_central) = 80.0%"
        in text
    )
    assert "global eval 2.6000, own eval 2.3000" in text
    assert (out / "loss.png").stat().st_size > 1000


def test_the_report_has_no_baseline_section_without_baselines(tmp_path: Path) -> None:
    out, _ = _run_dir(tmp_path / "run")

    text = report.write_run_report(out, plots=False).read_text()

    assert "Baselines" not in text and "share of the centralized gain" not in text


def test_the_report_leaves_out_a_baseline_of_another_config(tmp_path: Path) -> None:
    out, _ = _run_dir(tmp_path / "run")
    other = config_lib.load(TINY_YAML, [f"output.dir={out}", "train.lr=0.01"])
    baseline.write(out, baseline.CENTRALIZED, CENTRAL, other)

    text = report.write_run_report(out, plots=False).read_text()

    assert "share of the centralized gain" not in text
    assert (
        "baselines/centralized.json left out: measured under another config "
        "(train.lr: 0.01 in the baseline, 0.001 in the run)" in text
    )


def test_the_report_names_a_baseline_file_it_cannot_read(tmp_path: Path) -> None:
    out, _ = _run_dir(tmp_path / "run")
    (out / "baselines").mkdir()
    (out / "baselines" / "centralized.json").write_text("{not json")

    text = report.write_run_report(out, plots=False).read_text()

    assert "baselines/centralized.json left out: not a baseline (no (JSONDecodeError))" in text
