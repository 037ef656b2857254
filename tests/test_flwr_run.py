"""Stock Flower: `flwr run .` runs the same apps that pyproject.toml declares."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO, local_flwr_env, stop_processes_mentioning


@pytest.mark.slow
def test_flwr_run_runs_the_declared_apps(cache_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "run"
    env = local_flwr_env(home)
    overrides = f"model.cache_dir={cache_dir} output.dir={out} server.rounds=1"
    cmd = [
        "flwr", "run", ".",
        "--run-config", f'config="simulations/configs/tiny.yaml" overrides="{overrides}"',
        "--federation-config", "num-supernodes=3",
        "--stream",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_processes_mentioning(str(home))

    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == 3
    assert (out / "round-001" / "adapter_model.safetensors").is_file()
    assert not (REPO / "pyproject.toml").read_text().count("MIGRATION"), "pyproject untouched"
