"""A new user's five likeliest mistakes: each ends with one line that says what to do, exit code
2, and no traceback unless -v."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedllama import cli
from fedllama.config import load
from fedllama.server import checkpoint
from tests.harness import REPO, TINY_YAML


def _no_config(cache: Path, tmp: Path) -> list[str]:
    return ["check", str(REPO / "simulations" / "configs" / "demoo.yaml")]


def _not_a_model(cache: Path, tmp: Path) -> list[str]:
    (tmp / "weights").mkdir()
    (tmp / "weights" / "model.safetensors").write_bytes(b"")
    return ["prepare", str(TINY_YAML), f"model.cache_dir={cache}", f"model.path={tmp}/weights"]


def _no_usable_rows(cache: Path, tmp: Path) -> list[str]:
    (tmp / "clinic.jsonl").write_text("\n\n")
    return [
        "prepare",
        str(TINY_YAML),
        f"model.cache_dir={cache}",
        f"data.source={tmp}/clinic.jsonl",
    ]


def _another_runs_dir(cache: Path, tmp: Path) -> list[str]:
    out = tmp / "run"
    checkpoint.write_config(out, load(TINY_YAML, [f"output.dir={out}", "lora.r=8"]))
    return ["simulate", str(TINY_YAML), f"model.cache_dir={cache}", f"output.dir={out}"]


def _full_disk(cache: Path, tmp: Path) -> list[str]:
    (tmp / "clinic.jsonl").write_text(
        '{"instruction": "Code for asthma?", "response": "J45"}\n' * 4
    )
    fresh_cache = tmp / "cache"  # nothing built yet: the base must be written
    return ["prepare", str(TINY_YAML), f"model.cache_dir={fresh_cache}",
            f"data.source={tmp}/clinic.jsonl"]  # fmt: skip


MISTAKES: dict[str, tuple[Callable[[Path, Path], list[str]], str, str]] = {
    # name: (argv builder, what the error says, what the fix line says)
    "no such config file": (_no_config, "'.*demoo.yaml' does not exist", "pass one of .*demo.yaml"),
    "a model path that is not a model": (
        _not_a_model,
        "is not a Hugging Face model directory .*has no config.json",
        "save_pretrained",
    ),
    "a data file with no usable rows": (
        _no_usable_rows,
        "clinic.jsonl holds no examples",
        '"instruction": ..., "response": ...',
    ),
    "an output directory of a different run": (
        _another_runs_dir,
        "holds a different run: its lora settings differ \\(r: 8 there, 4 now",
        "pass a new output.dir \\(e.g. output.dir=.*run-2\\)",
    ),
    "no free disk for the cache": (
        _full_disk,
        "no room for tiny-llama-seed0 in the model cache .*: 1 MB free",
        "model.cache_dir to a disk with room",
    ),
}


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage

    def one_megabyte_free(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 10**6, 10**6)

    monkeypatch.setattr(shutil, "disk_usage", one_megabyte_free)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
@pytest.mark.parametrize("verbose", [False, True])
def test_each_mistake_ends_with_what_to_do(
    mistake: str,
    verbose: bool,
    cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    build, says, fix = MISTAKES[mistake]
    argv = build(cache_dir, tmp_path)
    if mistake == "no free disk for the cache":
        request.getfixturevalue("full_disk")

    code = cli.main([*argv, "-v"] if verbose else argv)

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[-1].startswith("fedllama: to fix: "), err
    assert re.search(fix, lines[-1]), (fix, lines[-1])
    assert re.search(says, lines[-2]), (says, lines[-2])
    assert ("Traceback" in err) is verbose, err


def _more_gpus_than_here() -> tuple[str, str, str]:
    import torch

    gpus = torch.cuda.device_count()
    fix = "client_gpus=0" if not gpus else f"client_gpus={gpus} or a fraction"
    return f"simulation.client_gpus={gpus + 1}", f"this machine has {gpus} CUDA devices", fix


@pytest.mark.parametrize("resource", ["cpus", "gpus"])
def test_client_resources_this_machine_lacks_are_refused_before_the_run(
    resource: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flower's actor pool would be empty and its runtime crash mid-run."""
    override, says, fix = (
        ("simulation.client_cpus=4096", r"client_cpus=4096.0: this machine has \d+ CPUs", "less")
        if resource == "cpus"
        else _more_gpus_than_here()
    )
    code = cli.main(["simulate", str(TINY_YAML), f"output.dir={tmp_path}/run", override])

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert re.search(says, lines[-2]) and re.search(fix, lines[-1]), lines
    assert not (tmp_path / "run").exists(), "refused before anything is written"


CRASH = """
import sys, threading
import flwr.simulation
from fedllama import cli, config

def crash(**kwargs):
    threading.Thread(target=threading.Event().wait).start()  # the ServerApp thread, left waiting
    try:
        raise ValueError("ActorPool is empty")
    except ValueError as err:
        raise RuntimeError("Simulation Runtime crashed.") from err

flwr.simulation.run_simulation = crash
sys.exit(cli.simulate(config.load(sys.argv[1], sys.argv[2:])))
"""


def test_a_crashed_simulation_runtime_ends_the_command_instead_of_hanging(
    cache_dir: Path, tmp_path: Path
) -> None:
    """Flower's runtime crashing (Ray could not start the clients) left its ServerApp thread
    waiting for replies: the command hung until server.timeout_s. It must end, exit 1, and say
    why and where the traceback is."""
    import subprocess
    import sys

    out = tmp_path / "run"
    argv = [str(TINY_YAML), f"model.cache_dir={cache_dir}", f"output.dir={out}"]

    proc = subprocess.run(
        [sys.executable, "-c", CRASH, *argv], capture_output=True, text=True, timeout=120, cwd=REPO
    )

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "fedllama: the simulation runtime crashed: ActorPool is empty" in proc.stderr
    assert f"its traceback is in {out / 'run.log'}" in proc.stderr
