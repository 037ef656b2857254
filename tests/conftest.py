"""Shared fixtures: a tiny offline LLaMA config and a cache that lives for the test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedllama import config as config_lib
from fedllama.config import Config

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "simulations" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model/data cache shared by the session (FEDLLAMA_TEST_CACHE reuses one across runs)."""
    reuse = os.environ.get("FEDLLAMA_TEST_CACHE")
    return Path(reuse) if reuse else tmp_path_factory.mktemp("fedllama-cache")


def tiny_config(cache_dir: Path, out: Path, *overrides: str) -> Config:
    """The tiny.yaml config pointed at a test cache and output directory."""
    return config_lib.load(
        TINY_YAML, [f"model.cache_dir={cache_dir}", f"output.dir={out}", *overrides]
    )


@pytest.fixture
def tiny_cfg(cache_dir: Path, tmp_path: Path) -> Config:
    return tiny_config(cache_dir, tmp_path / "run")
