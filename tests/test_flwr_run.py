"""Stock Flower: `flwr run .` runs the same apps that pyproject.toml declares."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_processes_mentioning(marker: str) -> None:
    """Stop the detached local SuperLink `flwr run` leaves behind (found by its FLWR_HOME)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            os.kill(int(proc.name), signal.SIGTERM)


def local_flwr_env(home: Path) -> dict[str, str]:
    """Environment for ``flwr run`` with a local simulation: its own FLWR_HOME and free ports
    (the detached local SuperLink is otherwise shared), no dependency installs, no update
    check."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


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
        _stop_processes_mentioning(str(home))

    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == 3
    assert (out / "round-001" / "adapter_model.safetensors").is_file()
    assert not (REPO / "pyproject.toml").read_text().count("MIGRATION"), "pyproject untouched"
