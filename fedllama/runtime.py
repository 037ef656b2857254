"""Process set-up the entry points do once: stay offline, and fedllama's log lines.

Called by the ``fedllama`` command, the ServerApp and the ClientApp (not on import, so that a
library user's environment and logging are theirs to set).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any


def stay_offline() -> None:
    """Nothing in fedllama may fetch weights or data from a hub at run time: every model is a
    local directory. Make that a guarantee for the Hugging Face libraries too (a user may
    override it). Call before they are imported: they read the variable on import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (a test's capture, a run's
    redirection), not to the stream that was there when the handler was made."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send fedllama's log lines to stderr once per process (Ray actors included)."""
    logger = logging.getLogger("fedllama")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedllama %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(os.environ.get("FEDLLAMA_LOG_LEVEL", level))


def quiet_libraries() -> None:
    """Keep library chatter off a command's output (``-v`` keeps it): transformers' weight
    loading bars and advisories, bitsandbytes' note on optional CPU kernels (and the ``kernels``
    package's note that it skips a hub check offline), and deprecation and future warnings of
    the libraries we call (ours are not theirs to fix by a user). Call before the libraries are
    imported."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("transformers", "bitsandbytes", "kernels", "peft", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def pin_worker_threads() -> int | None:
    """In a simulation's Ray worker, run torch on the CPUs Ray assigned the worker
    (``simulation.client_cpus``), so that the workers on a machine never oversubscribe its
    cores, whatever ``OMP_NUM_THREADS`` the user exported or a cluster's workers inherited.
    Returns the thread count set; None outside a Ray worker (a SuperNode's ClientApp, a test)."""
    if "ray" not in sys.modules:
        return None
    import ray
    import torch

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    cpus = context.get_assigned_resources().get("CPU")  # type: ignore[no-untyped-call]
    if not cpus:
        return None
    threads = max(1, int(cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def setup_client() -> None:
    """What a ClientApp sets up for each training message: fedllama's log lines and, in a
    simulation's Ray worker, its torch threads."""
    setup_logging()
    pin_worker_threads()
