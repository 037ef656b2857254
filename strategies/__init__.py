"""Merge strategies: plain torch, one file each, one registry line each.

Add a strategy: write ``strategies/<name>.py`` with a class implementing
``fedllama.merge.MergeStrategy`` (constructed from the run's ``Config``) and add it to
``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable

from fedllama.config import Config
from fedllama.merge import MergeStrategy
from strategies import flexlora
from strategies.fedavg import FedAvg
from strategies.fedex_lora import FedExLoRA
from strategies.fedsa_lora import FedSALoRA
from strategies.ffa_lora import FFALoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.rank_aware import RankAware
from strategies.rolora import RoLoRA
from strategies.zero_pad import ZeroPad

REGISTRY: dict[str, Callable[[Config], MergeStrategy]] = {
    "fedavg": FedAvg,
    "zero_pad": ZeroPad,
    "rank_aware": RankAware,
    "hetlora": HetLoRA,
    "flexlora": flexlora.build,
    "ffa_lora": FFALoRA,
    "fedsa_lora": FedSALoRA,
    "rolora": RoLoRA,
    "flora": FLoRA,
    "fedex_lora": FedExLoRA,
}


def build(cfg: Config) -> MergeStrategy:
    """The strategy named by ``strategy.name``; an unknown name lists the valid ones."""
    name = cfg.strategy.name
    if name not in REGISTRY:
        raise ValueError(
            f"strategy.name: unknown strategy {name!r}; valid: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name](cfg)
