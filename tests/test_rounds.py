"""The server loop over the real ClientApp: rounds on disk, metrics, resume, bad replies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Message

from fedllama import config as config_lib
from fedllama.config import ConfigError
from fedllama.merge import WEIGHT_KEY
from fedllama.model import adapters
from fedllama.server import checkpoint
from fedllama.server.loop import RoundFailed
from fedllama.wire.records import ARRAYS, PHASES, from_record
from tests.harness import InProcessGrid, tiny_config
from tests.harness import run as _run

REQUIRED = {"round", "eval_loss", "train_loss", "bytes_up", "bytes_down", "seconds"}


def test_two_rounds_write_peft_rounds_and_metrics(cache_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(cache_dir, tmp_path / "run")
    grid = InProcessGrid(3)

    rows = _run(grid, cfg)

    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row.keys() >= REQUIRED
    assert rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] > 0
    assert rows[1]["clients_ok"] == 3
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2]
    assert (tmp_path / "run" / "loss.png").is_file()
    r1, _ = adapters.load_adapter(tmp_path / "run" / "round-001")
    r2, _ = adapters.load_adapter(tmp_path / "run" / "round-002")
    assert any(not torch.equal(r1[k], r2[k]) for k in r1), "round 2 changed the adapter"
    for client in rows[1]["clients"]:  # where each client's time went (bench/scale.py)
        phases = {p: client[f"time-{p}"] for p in PHASES}
        assert all(s >= 0 for s in phases.values()) and phases["train"] >= client["seconds"]
        assert sum(phases.values()) < rows[1]["seconds"]


def test_rerun_resumes_after_last_completed_round(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(InProcessGrid(3), tiny_config(cache_dir, out, "server.rounds=1"))
    saved, _ = adapters.load_adapter(out / "round-001")
    grid = InProcessGrid(3)

    rows = _run(grid, tiny_config(cache_dir, out, "server.rounds=2"))

    assert {r for r, _ in grid.trained} == {2}, "only round 2 is trained again"
    assert [r["round"] for r in rows] == [0, 1, 2]
    again, _ = adapters.load_adapter(out / "round-001")
    assert all(torch.equal(saved[k], again[k]) for k in saved), "round 1 left untouched"


def test_crash_mid_round_then_rerun_redoes_only_that_round(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"

    def crash_in_round_2(pid: int, reply: Message) -> Message:
        if checkpoint.last_round(out) == 1:
            raise KeyboardInterrupt("server killed")
        return reply

    with pytest.raises(KeyboardInterrupt):
        _run(InProcessGrid(2, crash_in_round_2), tiny_config(cache_dir, out))
    assert checkpoint.last_round(out) == 1
    grid = InProcessGrid(3)

    rows = _run(grid, tiny_config(cache_dir, out))

    assert {r for r, _ in grid.trained} == {2}
    assert [r["round"] for r in rows] == [0, 1, 2]


def test_resume_refuses_different_model_settings(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(InProcessGrid(3), tiny_config(cache_dir, out, "server.rounds=1"))
    with pytest.raises(ConfigError, match="its lora settings differ"):
        _run(InProcessGrid(3), tiny_config(cache_dir, out, "lora.r=8"))


def _poison(pid: int, reply: Message) -> Message:
    if pid == 1:
        arrays = reply.content.array_records[ARRAYS]
        key = next(k for k in arrays if k.endswith("lora_A.weight"))
        bad = arrays[key].numpy().copy()
        bad[0, 0] = np.nan
        arrays[key] = Array(bad)
    return reply


def test_bad_reply_is_dropped_and_round_goes_on(cache_dir: Path, tmp_path: Path, caplog) -> None:
    cfg = tiny_config(cache_dir, tmp_path / "run", "server.rounds=1", "server.min_replies=2")

    with caplog.at_level("WARNING", logger="fedllama"):
        rows = _run(InProcessGrid(3, _poison), cfg)

    assert rows[-1]["clients_ok"] == 2 and rows[-1]["clients_dropped"] == 1
    assert "dropped node 101 (client 1)" in caplog.text and "NaN" in caplog.text
    (dropped,) = rows[-1]["dropped"]  # named by the client id its reply carried
    assert dropped["node"] == 101 and dropped["client-id"] == 1 and "NaN" in dropped["reason"]


def test_too_few_good_replies_retry_then_skip_the_round_keeping_the_adapter(
    cache_dir: Path, tmp_path: Path
) -> None:
    from tests.harness import logged

    out = tmp_path / "run"
    cfg = tiny_config(cache_dir, out, "server.rounds=2", "server.min_replies=3")

    with logged() as lines:
        rows = _run(InProcessGrid(3, _poison), cfg)

    assert [r["round"] for r in rows] == [0, 1, 2]  # the run went on
    assert all("2 good replies" in r["skipped"] for r in rows[1:])
    retried = [line for line in lines if "retrying without nodes [101]" in line]
    assert len(retried) == 2  # once per round, without the node that sent NaN
    kept = checkpoint.recover(out)
    assert kept is not None and kept.server_round == 2
    initial = checkpoint.load_global(out, 0)[0]
    assert all(torch.equal(kept.global_state[k], v) for k, v in initial.items())

    stop = tiny_config(
        cache_dir,
        tmp_path / "stop",
        "server.rounds=1",
        "server.min_replies=3",
        "server.failed_round=stop",
    )
    with pytest.raises(RoundFailed, match="2 good replies .*server.min_replies=3"):
        _run(InProcessGrid(3, _poison), stop)
    assert checkpoint.last_round(tmp_path / "stop") == 0


def test_round_directory_loads_with_peft(cache_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    _run(InProcessGrid(3), tiny_config(cache_dir, out, "server.rounds=1"))
    round_dir = out / "round-001"
    base_dir = json.loads((round_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), round_dir)

    saved, _ = adapters.load_adapter(round_dir)
    loaded = adapters.get_adapter_state(model)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_client_at_another_rank_is_dropped_with_the_reason(
    cache_dir: Path, tmp_path: Path, caplog
) -> None:
    cfg = tiny_config(cache_dir, tmp_path / "run", "server.rounds=1", "server.min_replies=2")
    grid = InProcessGrid(3, node_config={2: {"lora-rank": 8}})

    with caplog.at_level("WARNING", logger="fedllama"):
        rows = _run(grid, cfg)

    assert rows[-1]["clients_ok"] == 2 and rows[-1]["clients_dropped"] == 1
    assert "dropped node 102: error reply" in caplog.text
    assert "global rank 4, got a client of rank 8" in caplog.text


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_uniform_weighting_merges_the_plain_mean_of_clients_with_unequal_examples(
    cache_dir: Path, tmp_path: Path, secure: bool
) -> None:
    sent: dict[int, dict[str, torch.Tensor]] = {}

    def keep(pid: int, reply: Message) -> Message:
        if ARRAYS in reply.content.array_records:
            sent[pid] = from_record(reply.content.array_records[ARRAYS])
        return reply

    out = tmp_path / "run"
    common = ["server.rounds=1", "data.partition=dirichlet", "output.plot=false"]
    extra = ["secagg.enabled=true"] if secure else []
    cfg = tiny_config(cache_dir, out, *common, "strategy.weighting=uniform", *extra)
    rows = _run(InProcessGrid(3, keep), cfg)

    counts = [c["num-examples"] for c in rows[-1]["clients"]]
    assert rows[-1]["clients_ok"] == 3 and len(set(counts)) > 1  # examples would weigh unequally
    before, _ = adapters.load_adapter(out / "round-000")
    after, _ = adapters.load_adapter(out / "round-001")
    if not secure:  # in the clear each reply carries weight 1
        assert all(float(s[WEIGHT_KEY]) == 1.0 for s in sent.values())
        for key in before:
            mean = torch.stack([s[key] for s in sent.values()]).mean(0)
            torch.testing.assert_close(after[key] - before[key], mean, rtol=1e-4, atol=1e-6)
    plain = tmp_path / "plain"
    _run(InProcessGrid(3), tiny_config(cache_dir, plain, *common, *extra))
    by_examples, _ = adapters.load_adapter(plain / "round-001")
    assert any(not torch.allclose(after[k], by_examples[k]) for k in after)


def test_an_unknown_weighting_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="strategy.weighting"):
        config_lib.load(None, ["strategy.weighting=tokens"])
