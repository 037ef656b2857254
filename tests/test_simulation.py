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
    assert "\x1b" not in log, "no control characters without a terminal"
    for noise in ("ClientAppActor", "DEPRECATED", "Loading weights", "FutureWarning"):
        assert noise not in log, f"{noise!r} is library output: run.log's, not the terminal's"
    assert "ClientAppActor" in (out / "run.log").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["clients_ok"] == 3
    assert {c["threads"] for c in rows[-1]["clients"]} == {1}, "1 torch thread per 1-CPU worker"
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


@pytest.mark.slow
def test_simulate_runs_on_an_existing_ray_cluster(cache_dir: Path, tmp_path: Path) -> None:
    """A Ray head started on loopback (`ray start --head`), the simulation's clients run on it
    (its session directory holds their worker logs), then the head is stopped."""
    import shutil
    import tempfile

    from tests.harness import free_port

    port = free_port()
    # the cluster's own session dir, not the default /tmp/ray (short: Ray's socket paths are
    # limited to 107 characters)
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}"]
    start += ["--num-cpus=2", "--include-dashboard=false", f"--temp-dir={ray_dir}"]
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        out = tmp_path / "run"
        cmd = [
            sys.executable, "-m", "fedllama.cli", "simulate", str(TINY_YAML),
            f"model.cache_dir={cache_dir}", f"output.dir={out}", "server.rounds=1",
            "simulation.num_clients=2", f"simulation.ray_address=127.0.0.1:{port}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "1/1 rounds" in log and f"connecting to the Ray cluster at 127.0.0.1:{port}" in log
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["clients_ok"] == 2
        workers = list(ray_dir.glob("session_*/logs/worker-*.out"))
        assert workers, sorted(p.name for p in ray_dir.glob("session_*/logs/*"))[:20]
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)
