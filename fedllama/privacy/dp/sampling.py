"""Who takes part in a round, drawn exactly as the privacy ledger assumes.

* ``poisson``: every connected node independently with probability q (the round's size
  varies, and may be 0); the ledger applies amplification by Poisson subsampling.
* ``fixed``: m nodes drawn uniformly without replacement; the ledger applies amplification by
  sampling without replacement (Wang et al., AISTATS 2019), under replace-one adjacency.
* ``all``: every node, every round; no amplification.

The draw uses the OS's CSPRNG unless ``dp.seed`` is set (then it is reproducible and, for a
real deployment, predictable: research runs only).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fedllama.config import DpConfig


@dataclass
class Sampler:
    """Draws a round's nodes from the connected ones."""

    cfg: DpConfig

    def rng(self, server_round: int) -> random.Random:
        """The round's random source."""
        if self.cfg.seed is None:
            return secrets.SystemRandom()
        return random.Random(f"dp-sampling-{self.cfg.seed}-{server_round}")

    def sample(self, nodes: Sequence[int], server_round: int) -> list[int]:
        """The nodes that take part in ``server_round``."""
        rng = self.rng(server_round)
        ordered = sorted(nodes)
        if self.cfg.sampling == "all":
            return ordered
        if self.cfg.sampling == "fixed":
            return sorted(rng.sample(ordered, min(self.cfg.clients_per_round, len(ordered))))
        return [n for n in ordered if rng.random() < self.cfg.sampling_rate]

    def expected(self, population: int) -> float:
        """The expected number of nodes in a round (the fixed denominator)."""
        if self.cfg.sampling == "all":
            return float(population)
        if self.cfg.sampling == "fixed":
            return float(min(self.cfg.clients_per_round, population))
        return self.cfg.sampling_rate * population
