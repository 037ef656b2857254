"""Merge strategies: plain torch, one file each, one registry line each.

Add a strategy: write ``strategies/<name>.py`` with a class implementing
``fedllama.merge.MergeStrategy`` and add it to ``REGISTRY``.
"""

from __future__ import annotations

from fedllama.merge import MergeStrategy
from strategies.fedavg import FedAvg

REGISTRY: dict[str, type[MergeStrategy]] = {
    "fedavg": FedAvg,
}


def build(name: str) -> MergeStrategy:
    """The strategy registered as ``name``; an unknown name lists the valid ones."""
    if name not in REGISTRY:
        raise ValueError(
            f"strategy.name: unknown strategy {name!r}; valid: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]()
