"""`fedllama simulate` as a person sees it on a terminal: driven through a pseudo-terminal
(pexpect), drawn by a terminal emulator (pyte), screen by screen."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect  # the dev extra brings both
import pyte
import pytest

from tests.harness import REPO, TINY_YAML

COLUMNS, LINES = 130, 45
NOISE = ("ClientAppActor", "repeated", "Warning", "WARNING", "DEPRECATED", "Loading weights")


@pytest.mark.slow
def test_simulate_on_a_terminal_shows_one_live_view(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "-m", "fedllama.cli", "simulate", str(TINY_YAML), f"model.cache_dir={cache_dir}",
        f"output.dir={out}", "server.rounds=2",
    ]  # fmt: skip
    child = pexpect.spawn(
        sys.executable,
        argv,
        cwd=str(REPO),
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS)},
        dimensions=(LINES, COLUMNS),
        timeout=600,
    )
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.ByteStream(screen)
    seen_states: set[str] = set()
    raw = b""
    while True:
        try:
            chunk = child.read_nonblocking(65536, timeout=600)
        except pexpect.EOF:
            break
        raw += chunk
        stream.feed(chunk)
        shown = "\n".join(screen.display)
        for state in ("waiting", "training", "done"):  # a client's row in the round's table
            if re.search(rf"│ {state} +│", shown):
                seen_states.add(state)
    child.close()
    final = "\n".join(line.rstrip() for line in screen.display)

    assert child.exitstatus == 0, final
    assert seen_states == {"waiting", "training", "done"}, (seen_states, final)
    assert re.search(r"rounds ━+ 2/2", final), final
    assert re.search(r"eval loss by round  0: \d+\.\d{4}  1: \d+\.\d{4}  2: \d+\.\d{4}", final)
    assert "round  eval_loss  train_loss" in final, "the summary at the end"
    assert re.search(r"^2/2 rounds in \d+ s", final, re.M), final
    text = raw.decode("utf-8", "replace")
    for noise in NOISE:
        assert noise not in text, f"{noise!r} reached the terminal"
    run_log = (out / "run.log").read_text()
    assert "ClientAppActor" in run_log and "run_simulation` function is deprecated" in run_log
    assert "fedllama round 1/2 done" in run_log, "fedllama's own lines are kept there too"
