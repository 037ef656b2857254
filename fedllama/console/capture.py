"""A run's library output into ``run.log``, the terminal kept for fedllama's own view.

Flower's log lines, Ray's worker logs (forwarded to the driver's stdout), transformers' progress
bars and every library's warnings are written to file descriptors 1 and 2, by Python and C code
and by child processes alike. :class:`RunLog` points both descriptors at a pipe for the length of
a block; a thread stamps each line with the time and appends it to ``run.log`` (and, with
``echo``, copies it to the terminal as it came). The terminal itself stays reachable through
:attr:`RunLog.out` and :attr:`RunLog.err`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, TextIO

DRAIN_SECONDS = 2.0
"""How long leaving the block waits for lines still in the pipe (child processes that outlive
it, Ray's, may hold the pipe open longer; what they write later still lands in the file)."""


def _stamp() -> bytes:
    now = time.time()
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return f"{clock}.{int(now % 1 * 1000):03d} ".encode()


class RunLog:
    """Within the block, this process's stdout and stderr go to ``path``, each line stamped.

    Attributes:
        out, err: the terminal's stdout and stderr as they were before the block (text, line
            buffered), for what a person should see.
    """

    def __init__(self, path: Path, echo: bool = False) -> None:
        self.path = path
        self.echo = echo
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self._saved: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.path, "ab")
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8")
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1, encoding="utf-8")
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        echo_fd = os.dup(self._saved[1]) if self.echo else None
        self._thread = threading.Thread(
            target=_pump, args=(read_end, log_file, echo_fd), name="fedllama-run-log", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        assert self._saved is not None
        os.dup2(self._saved[0], 1)  # drops this process's hold on the pipe
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        if self._thread is not None:
            self._thread.join(DRAIN_SECONDS)
        for stream in (self.out, self.err):
            with contextlib.suppress(OSError):
                stream.flush()


def _pump(read_end: int, sink: BinaryIO, echo_fd: int | None) -> None:
    """Copy the pipe to the log, a time stamp before each line (``\\r`` ends a progress bar's
    line too), until every writer has closed it."""
    partial = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe, sink:
        while chunk := pipe.read(65536):
            if echo_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(echo_fd, chunk)
            lines = (partial + chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            partial = lines.pop()
            stamp = _stamp()
            sink.write(b"".join(stamp + line + b"\n" for line in lines if line.strip()))
            sink.flush()
        if partial.strip():
            sink.write(_stamp() + partial + b"\n")
    if echo_fd is not None:
        os.close(echo_fd)
