"""Harnesses the tests share: the tiny config, the in-process grid, processes on loopback, a
deployment of a coordinator and institutions, and ``flwr run``'s environment.

Fixtures built on these live in ``conftest.py``; no test module imports another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import clients.app
import server.app
from fedllama import config as config_lib
from fedllama import data
from fedllama.config import Config
from fedllama.deploy import credentials
from fedllama.server import inprocess
from fedllama.server.inprocess import Tamper

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "simulations" / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
SCRIPTS = REPO / "scripts"
NODE_ID = re.compile(r"SuperNode ID: (\d+)")


DP_ROW: dict[str, Any] = {
    "delta": 1e-5,
    "accountant": "rdp",
    "noise_multiplier": 1.1,
    "clip_norm": 0.5,
    "placement": "central",
    "sampling": "poisson",
    "sampling_rate": 0.25,
    "unit": "client (add/remove one)",
}
"""A metrics row's ``dp`` entry (central DP, RDP ledger) without its ε: tests add their own."""


def tiny_config(cache_dir: Path, out: Path, *overrides: str) -> Config:
    """The tiny.yaml config pointed at a test cache and output directory."""
    return config_lib.load(
        TINY_YAML, [f"model.cache_dir={cache_dir}", f"output.dir={out}", *overrides]
    )


@contextlib.contextmanager
def logged(name: str = "fedllama", level: int = logging.WARNING) -> Iterator[list[str]]:
    """The messages logged under ``name`` at ``level`` or above while the block runs (a
    handler of its own: pytest's caplog depends on which handlers other tests left behind)."""
    lines: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    before = logger.level
    if logger.getEffectiveLevel() > level:  # INFO lines are filtered by the root's WARNING
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


# --------------------------------------------------------------------------- in-process grid


class InProcessGrid(inprocess.InProcessGrid):
    """The library's in-process grid running this repository's ClientApp."""

    def __init__(
        self,
        num_nodes: int,
        tamper: Tamper | None = None,
        node_config: dict[int, dict[str, int | str]] | None = None,
    ) -> None:
        super().__init__(clients.app.app, num_nodes, tamper, node_config)


def run(grid: InProcessGrid, cfg: Config) -> list[dict[str, Any]]:
    """The real ServerApp's rounds over an in-process grid; the metrics rows as written."""
    rows = server.app.serve(grid, cfg)  # type: ignore[arg-type]
    return [row.to_json() for row in rows]


def loads_in_peft(round_dir: Path, base: Path) -> None:
    """``PeftModel.from_pretrained`` reads every saved tensor of a round back unchanged, and the
    adapter changes the base's logits (prompt tuning's virtual tokens cut off)."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedllama.model.train import token_logits

    saved = load_file(str(round_dir / "adapter_model.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 20, 300, 4000, 17]])
    with torch.no_grad():
        before = plain(ids).logits
    adapted = PeftModel.from_pretrained(plain, str(round_dir)).eval()
    loaded = get_peft_model_state_dict(adapted)
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), rtol=0, atol=0)
    with torch.no_grad():
        after = token_logits(adapted, ids, torch.ones_like(ids))
    assert after.shape == before.shape, "logits not aligned with the input"
    assert not torch.allclose(after, before), f"{round_dir} changes nothing"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process (from /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in process_table().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    table = process_table()
    return [p for p in pids if p in table and table[p][1] != "Z"]


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Proc:
    """A process started by a test, its output in ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text())
            if match:
                return match
            if self.popen.poll() is not None:
                pytest.fail(
                    f"{self.name} exited ({self.popen.returncode}) before {pattern!r}:\n"
                    f"{self.text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {pattern!r} in {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout} s:\n{self.text()[-3000:]}")


@dataclass
class Processes:
    """Starts processes in their own session; kills them with all their descendants."""

    logs: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        log = self.logs / f"{len(self.started):02d}-{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def kill(self, proc: Proc, sig: int = signal.SIGKILL, grace: float = 10.0) -> None:
        """Signal ``proc``, its process group and every descendant; SIGKILL what survives."""
        pids = [proc.popen.pid, *descendants(proc.popen.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, sig)
        deadline = time.monotonic() + grace
        while alive(pids) and time.monotonic() < deadline:
            proc.popen.poll()  # reap our own child
            time.sleep(0.1)
        for pid in alive(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(10)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.kill(proc, signal.SIGTERM)


def write_jsonl(path: Path, topic: str, rows: int) -> Path:
    """Instruction/response pairs in the format fedllama.data reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(rows):
            row = {
                "instruction": f"{topic}: what is item {i}?",
                "response": f"Item {i} of {topic}.",
            }
            fh.write(json.dumps(row) + "\n")
    return path


def train_size(path: Path) -> int:
    """Examples a node trains on (the ClientApp's own split of its file)."""
    return len(data.split_train_eval(data.read_local(path), 0.1, "node-0").train)


@dataclass
class Deployment:
    """A coordinator and institutions on loopback, each in its own home directory."""

    root: Path
    procs: Processes
    cache: Path
    creds: credentials.CredentialPaths = field(init=False)
    fleet_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    superlink: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.creds = credentials.create(
            self.root / "coordinator" / "credentials",
            ["localhost"],
            ["hospital-a", "hospital-b", "intruder"],
        )

    def home(self, who: str) -> Path:
        home = self.root / who
        (home / ".flwr").mkdir(parents=True, exist_ok=True)
        return home

    def env(self, who: str) -> dict[str, str]:
        home = self.home(who)
        return {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(home),
            "FLWR_HOME": str(home / ".flwr"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            "MPLCONFIGDIR": str(self.cache / "matplotlib"),
            "PYTHONUNBUFFERED": "1",
        }

    def start_superlink(self) -> Proc:
        cmd = [str(SCRIPTS / "start-superlink.sh"), "--credentials", str(self.creds.ca_cert.parent)]
        cmd += ["--fleet-address", f"127.0.0.1:{self.fleet_port}"]
        cmd += ["--control-port", str(self.control_port)]
        self.superlink = self.procs.start("superlink", cmd, self.env("coordinator"))
        self.superlink.wait_for(r"Fleet API \(gRPC-rere\) on", 120)
        self.superlink.wait_for(r"Uvicorn running on https://127\.0\.0\.1", 120)
        return self.superlink

    def register(self, *names: str) -> dict[str, int]:
        keys = [str(self.creds.nodes[n].public_key) for n in names]
        proc = subprocess.run(
            [str(BIN / "fedllama"), "deploy", "register", *keys],
            env=self.env("coordinator"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ids = dict(re.findall(r"registered .*/(\S+)\.pub as node (\d+)", proc.stdout))
        return {name: int(ids[name]) for name in names}

    def supernode_cmd(
        self, name: str, data_path: Path, rank: int, *extra: str, key: str | None = None
    ) -> list[str]:
        cmd = [str(SCRIPTS / "start-supernode.sh"), "--superlink", f"127.0.0.1:{self.fleet_port}"]
        cmd += ["--ca", str(self.creds.ca_cert)]
        cmd += ["--key", str(self.creds.nodes[key or name].private_key)]
        cmd += ["--data-path", str(data_path), "--lora-rank", str(rank)]
        cmd += ["--port", str(free_port()), *extra]
        return cmd

    def start_supernode(self, name: str, data_path: Path, rank: int, *extra: str) -> int:
        """Start institution ``name``'s SuperNode; return its node id once connected."""
        proc = self.procs.start(
            name, self.supernode_cmd(name, data_path, rank, *extra), self.env(name)
        )
        self.nodes[name] = proc
        return int(proc.wait_for(NODE_ID, 120).group(1))

    def run_cmd(self, *overrides: str) -> list[str]:
        run_config = f'config="simulations/configs/tiny.yaml" overrides="{" ".join(overrides)}"'
        return [str(BIN / "flwr"), "run", ".", "fedllama", "--run-config", run_config, "--stream"]

    def flwr_run(self, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.run_cmd(*overrides),
            cwd=REPO,
            env=self.env("coordinator"),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def metrics_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def seed_home_cache(dep: Deployment, who: str) -> None:
    """Give a machine its own model cache, with the tiny base but no quantized copy yet."""
    target = dep.home(who) / ".cache" / "fedllama"
    shutil.copytree(
        dep.cache,
        target,
        ignore=shutil.ignore_patterns(
            "quantized", "client-state", "smollm2-135m-instruct", ".*", "matplotlib"
        ),
    )


# --------------------------------------------------------------------------- flwr run


def stop_processes_mentioning(marker: str) -> None:
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
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def assert_answer_loss_is_the_full_loss(peft_model: Any, pad_id: int) -> None:
    """``train.answer_loss`` (the LM head at answer positions only) gives the loss and gradients
    of transformers' causal-LM loss over every position, and ``answer_logits`` the full
    forward's logits at the answer positions. A trained (non-zero) adapter, rows with answers of
    different lengths and padding make a wrong mask or shift show."""
    import pytest
    import torch

    from fedllama import data
    from fedllama.model import train

    params = [p for p in peft_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rows = [
        data.Encoded([5, 6, 7, 8, 9, 10], [-100, -100, -100, 8, 9, 10]),
        data.Encoded([11, 12, 13], [-100, -100, 13]),
    ]
    batch = data.collate(rows, pad_id)
    peft_model.train()

    def loss_and_grads(loss_of: Any) -> tuple[float, list[torch.Tensor]]:
        loss = loss_of()
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), list(grads)

    ours, ours_grads = loss_and_grads(lambda: train.answer_loss(peft_model, batch))
    full, full_grads = loss_and_grads(lambda: peft_model(**batch).loss)

    assert ours == pytest.approx(full, rel=1e-5)
    for a, b in zip(ours_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    logits, targets = train.answer_logits(peft_model, batch)
    assert targets.tolist() == [8, 9, 10, 13]
    full_logits = train.token_logits(peft_model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(logits, full_logits[[0, 0, 0, 1], [2, 3, 4, 1]])
