"""fedllama: federated QLoRA fine-tuning of LLaMA-family models on Flower."""

from __future__ import annotations

import logging
import os

__version__ = "0.1.0"

# Nothing in fedllama may fetch weights or data from a hub at run time: every model is a local
# directory. Make that a guarantee for the Hugging Face libraries too (a user may override it).
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
