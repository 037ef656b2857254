"""What a person sees: the run's events, the live view's state and drawing, run.log, TensorBoard."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedllama import progress
from fedllama.console import RunState
from fedllama.console.view import ClientLine, Snapshot, render, shown
from fedllama.server.metrics import MetricsRow
from tests.harness import REPO, InProcessGrid, logged, tiny_config
from tests.harness import run as _run

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")


def _text(snap: Snapshot, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(render(snap, "a run"))
    return console.export_text()


def test_run_state_follows_a_round_through_its_events(tmp_path: Path) -> None:
    state = RunState(rounds=3, live_dir=tmp_path)
    state.run_started(tmp_path, 3, 0)
    state.round_finished(MetricsRow(round=0, eval_loss=3.5))
    state.round_started(1, [11, 12, 13, 14])
    os.environ[progress.LIVE_DIR_ENV] = str(tmp_path)
    try:
        progress.mark_started(1, 12)  # the client side's marker
        progress.mark_started(1, 13)
        progress.mark_started(2, 14)  # another round's marker: not this one's
    finally:
        del os.environ[progress.LIVE_DIR_ENV]
    state.client_replied(
        1,
        13,
        {"client-id": 2, "train-loss": 1.25, "num-examples": 24, "seconds": 3.5, "bytes-up": 20480},
    )
    state.client_dropped(1, 14, 3, "non-finite values in A")
    state.client_replied(0, 11, {"client-id": 9})  # a stale reply of an earlier round

    snap = state.snapshot()

    by_node = {c.node: c for c in snap.clients}
    assert {n: c.state for n, c in by_node.items()} == {
        11: "waiting",
        12: "training",
        13: "done",
        14: "dropped",
    }
    assert (by_node[13].client, by_node[13].train_loss, by_node[13].bytes_up) == (2, 1.25, 20480)
    assert by_node[14].reason == "non-finite values in A" and by_node[14].client == 3
    text = _text(snap)
    assert "round 1: 1 training, 1 dropped, 1 done, 1 waiting" in text
    assert "1.2500" in text and "20.5 kB" in text and "3.5 s" in text
    assert "dropped: non-finite values in A" in text
    assert "0/3" in text and "eval loss by round  0: 3.5000" in text

    state.round_finished(MetricsRow(round=1, eval_loss=3.25))
    state.run_finished([MetricsRow(round=0, eval_loss=3.5), MetricsRow(round=1, eval_loss=3.25)])
    done = _text(state.snapshot())
    assert "1/3" in done and "0: 3.5000  1: 3.2500" in done
    assert "round 1:" not in done, "a finished run shows no round table"


def test_a_thousand_clients_show_the_busy_ones_and_count_the_rest() -> None:
    clients = [ClientLine(n, changed=float(n)) for n in range(1000)]
    for c in clients[:3]:
        c.state = "training"
    for c in clients[3:500]:
        c.state = "done"
    clients[600].state = "dropped"
    snap = Snapshot(5, 1, 2, clients, [], 10.0, 5.0, False)

    rows = shown(clients)
    text = _text(snap)

    assert [c.state for c in rows[:4]] == ["training"] * 3 + ["dropped"]
    assert rows[4].node == 499, "the latest done first"
    assert len(rows) == 12
    assert "... and 988 more (489 done, 499 waiting)" in text


def test_a_failing_observer_is_detached_and_the_others_still_hear() -> None:
    class Broken(progress.Observer):
        def round_started(self, server_round: int, nodes: object) -> None:
            raise RuntimeError("boom")

    heard: list[int] = []

    class Ear(progress.Observer):
        def round_started(self, server_round: int, nodes: object) -> None:
            heard.append(server_round)

    broken = Broken()
    with logged("fedllama") as warnings, progress.observing(broken), progress.observing(Ear()):
        progress.events.round_started(1, [1])
        progress.events.round_started(2, [1])
        assert broken not in progress.events.attached

    assert heard == [1, 2]
    assert any("Broken failed in round_started; detached" in w for w in warnings)


WRITERS = """
import os, subprocess, sys
from pathlib import Path
from fedllama.console import RunLog
with RunLog(Path(sys.argv[1]), echo=sys.argv[2] == "echo") as run_log:
    print("from python's print")
    sys.stderr.write("a warning\\n")
    os.write(1, b"from C code, no newline yet")
    os.write(2, b"\\rprogress 50%\\rprogress 100%\\n")
    subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
    run_log.out.write("for the person\\n")
print("after the block")
"""
WRITTEN = (
    "from python's print",
    "a warning",
    "from C code, no newline yet",
    "progress 100%",
    "from a child process",
)


def _writers(path: Path, echo: bool) -> subprocess.CompletedProcess[str]:
    """A process that writes every way a library does, inside a RunLog."""
    argv = [sys.executable, "-c", WRITERS, str(path), "echo" if echo else "quiet"]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=True)


def test_run_log_takes_every_writer_and_keeps_the_terminal(tmp_path: Path) -> None:
    path = tmp_path / "out" / "run.log"

    proc = _writers(path, echo=False)

    assert proc.stdout == "for the person\nafter the block\n" and proc.stderr == ""
    lines = path.read_text().splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    bodies = [STAMP.sub("", line) for line in lines]
    for expected in WRITTEN:
        assert expected in bodies, (expected, bodies)
    assert "after the block" not in bodies and "for the person" not in bodies


def test_run_log_echo_copies_everything_to_the_terminal(tmp_path: Path) -> None:
    proc = _writers(tmp_path / "run.log", echo=True)

    for expected in WRITTEN:
        assert expected in proc.stderr, (expected, proc.stderr)
    assert len((tmp_path / "run.log").read_text().splitlines()) == 6, (
        "each line once, progress 50% too"
    )


def test_tensorboard_scalars_read_back_per_round(cache_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rows = _run(InProcessGrid(3), tiny_config(cache_dir, out, "output.tensorboard=true"))
    _run(
        InProcessGrid(3), tiny_config(cache_dir, out, "output.tensorboard=true", "server.rounds=3")
    )

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    evals = {e.step: e.value for e in events.Scalars("loss/eval")}
    assert sorted(evals) == [0, 1, 2, 3], "the resumed run appends, with no duplicate step"
    for row in rows:
        assert evals[row["round"]] == pytest.approx(row["eval_loss"], rel=1e-6)
    ups = {e.step: e.value for e in events.Scalars("bytes/up_per_client")}
    assert ups[1] == pytest.approx(rows[1]["bytes_up"] / 3)
    assert {"loss/train", "clients/ok", "time/round_seconds"} <= set(events.Tags()["scalars"])
