"""Shared fixtures: a model cache for the session, the tiny config, processes and a loopback
deployment that are stopped after each test. The harnesses behind them live in ``harness.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedllama.runtime import stay_offline

stay_offline()  # before any test imports transformers

from fedllama import data  # noqa: E402
from fedllama.config import Config  # noqa: E402
from tests.harness import Deployment, Processes, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model/data cache shared by the session (FEDLLAMA_TEST_CACHE reuses one across runs)."""
    reuse = os.environ.get("FEDLLAMA_TEST_CACHE")
    return Path(reuse) if reuse else tmp_path_factory.mktemp("fedllama-cache")


@pytest.fixture
def tiny_cfg(cache_dir: Path, tmp_path: Path) -> Config:
    return tiny_config(cache_dir, tmp_path / "run")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Processes a test starts; each is stopped with its descendants afterwards."""
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = Processes(logs)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture
def deployment(tmp_path: Path, procs: Processes, cache_dir: Path) -> Deployment:
    """A coordinator and institutions on loopback (nothing started yet)."""
    # Build the shared tiny model and demo data once in the test cache (seconds, first use).
    from fedllama import model

    cfg = tiny_config(cache_dir, tmp_path / "unused")
    model.resolve_base_dir(cfg.model)
    data.load_pool(cfg.data, model.cache_root(cfg.model))
    return Deployment(tmp_path / "machines", procs, cache_dir)
