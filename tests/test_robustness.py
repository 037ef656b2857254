"""Robustness: a poisoned round never becomes the global adapter, and the run goes on."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Message

from fedllama import config as config_lib
from fedllama.config import ConfigError
from fedllama.merge import WEIGHT_KEY
from fedllama.model import adapters
from fedllama.server.loop import rejection
from fedllama.wire.records import ARRAYS, from_record, to_record
from tests.harness import TINY_YAML, InProcessGrid, run, tiny_config


def test_a_poisoned_round_is_rejected_the_previous_adapter_kept_and_the_run_goes_on(
    cache_dir: Path, tmp_path: Path
) -> None:
    poisoned: list[int] = []

    def poison_once(pid: int, reply: Message) -> Message:
        if pid == 0 and not poisoned and ARRAYS in reply.content.array_records:
            sent = from_record(reply.content.array_records[ARRAYS])
            scaled = {k: v if k == WEIGHT_KEY else v * 1e30 for k, v in sent.items()}  # finite
            reply.content.array_records[ARRAYS] = to_record(scaled)
            poisoned.append(pid)
        return reply

    out = tmp_path / "run"
    cfg = tiny_config(cache_dir, out, "server.rounds=2", "output.plot=false")
    rows = run(InProcessGrid(3, poison_once), cfg)

    assert poisoned == [0]
    assert "rejected" in rows[1] and "global adapter" in rows[1]["rejected"]
    assert rows[1]["eval_loss"] == rows[0]["eval_loss"]  # the kept adapter's loss
    kept, _ = adapters.load_adapter(out / "round-001")
    initial, _ = adapters.load_adapter(out / "round-000")
    for key in initial:
        torch.testing.assert_close(kept[key], initial[key], rtol=0, atol=0)
    assert "rejected" not in rows[2] and math.isfinite(rows[2]["eval_loss"])
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]  # round 2 trained from the kept adapter


def _run(factor: float, last: float, evaluate: bool = True) -> SimpleNamespace:
    server = SimpleNamespace(reject_loss_factor=factor, evaluate=evaluate)
    return SimpleNamespace(cfg=SimpleNamespace(server=server), last_eval=last)


def test_the_guard_rejects_non_finite_adapters_and_losses_and_a_jump_over_the_factor() -> None:
    good = {"a": torch.ones(2)}

    assert rejection(_run(0, 2.0), good, 50.0) is None  # no factor: any finite loss
    assert rejection(_run(3, 2.0), good, 5.9) is None
    assert "over server.reject_loss_factor=3 times the last one (2.0000)" in str(
        rejection(_run(3, 2.0), good, 6.1)
    )
    assert "eval loss is nan" in str(rejection(_run(0, 2.0), good, math.nan))
    assert "NaN or Inf values in a" in str(
        rejection(_run(0, 2.0, evaluate=False), {"a": torch.tensor([1.0, math.inf])}, math.nan)
    )
    assert rejection(_run(3, 2.0, evaluate=False), good, math.nan) is None


def test_a_factor_of_one_or_less_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"server.reject_loss_factor: must be 0 \(off\) or > 1"):
        config_lib.load(TINY_YAML, ["server.reject_loss_factor=0.5"])
