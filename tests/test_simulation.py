"""End to end on Flower's simulation engine (Ray): `fedllama simulate` on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, TINY_YAML


@pytest.mark.slow
def test_simulate_runs_rounds_and_writes_peft_adapters(cache_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fedllama.cli", "simulate", str(TINY_YAML),
        f"model.cache_dir={cache_dir}", f"output.dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "2/2 rounds" in log
    assert "round 1: client 2" in log, "progress per client"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["clients_ok"] == 3
    assert (out / "loss.png").stat().st_size > 1000
    round_dir = out / "round-002"
    base = json.loads((round_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), round_dir)
    assert model.peft_config["default"].r == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        "zero_pad",
        "rank_aware",
        "hetlora",
        "ffa_lora",
        "rolora",
        "fedsa_lora",
        "flexlora",
        "flora",
        "fedex_lora",
    ],
)
def test_simulate_with_mixed_ranks_per_strategy(
    strategy: str, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fedllama.cli", "simulate", str(TINY_YAML),
        f"model.cache_dir={cache_dir}", f"output.dir={out}", f"strategy.name={strategy}",
        "lora.client_ranks=[2,3,4]",
    ]  # fmt: skip

    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)

    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3]
    assert sorted(c["lora-rank"] for c in rows[-1]["clients"]) == [2, 3, 4]
    for sub in ("rank-02", "rank-03"):
        assert (out / "round-002" / sub / "adapter_model.safetensors").is_file()
