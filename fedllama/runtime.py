"""Process set-up the entry points do once: stay offline, and fedllama's log lines.

Called by the ``fedllama`` command, the ServerApp and the ClientApp (not on import, so that a
library user's environment and logging are theirs to set).
"""

from __future__ import annotations

import logging
import os


def stay_offline() -> None:
    """Nothing in fedllama may fetch weights or data from a hub at run time: every model is a
    local directory. Make that a guarantee for the Hugging Face libraries too (a user may
    override it). Call before they are imported: they read the variable on import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def setup_logging(level: int = logging.INFO) -> None:
    """Send fedllama's log lines to stderr once per process (Ray actors included)."""
    logger = logging.getLogger("fedllama")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedllama %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(os.environ.get("FEDLLAMA_LOG_LEVEL", level))
