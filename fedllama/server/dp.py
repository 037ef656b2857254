"""The server's side of client-level DP: z, who takes part, the release, the ledger.

Built once per run when ``dp.enabled`` (``docs/privacy.md``). ``z`` is ``dp.noise_multiplier``,
or calibrated before the first round so that ε after ``server.rounds`` rounds meets
``dp.target_epsilon``; clients receive the config with that z. Each round the strategy samples
its nodes with :attr:`ServerDp.sampler`, the aggregator releases the sum through
:meth:`ServerDp.release`, and the loop records the round in the ledger, whose events are written
in every metrics row and read back on resume.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from fedllama.config import Config, ConfigError
from fedllama.privacy.dp import (
    Ledger,
    Release,
    RoundEvent,
    Sampler,
    calibrate_noise,
    next_clip_norm,
    noise_generator,
    round_event,
    update_noise_multiplier,
)
from fedllama.privacy.dp.mechanism import SERVER_STREAM
from fedllama.server.metrics import MetricsRow

log = logging.getLogger(__name__)


class PrivacyBudgetSpent(RuntimeError):
    """The next round would take ε past ``dp.target_epsilon``; it is not run."""


@dataclass
class ServerDp:
    """The run's DP state on the server."""

    cfg: Config
    noise_multiplier: float
    ledger: Ledger
    sampler: Sampler
    clip_norm: float
    """C of the next round (adapted each round under ``dp.adaptive_clipping``)."""
    count_noise: float = 0.0
    """σ_b on the count of unclipped clients (adaptive clipping only)."""
    update_noise: float = 0.0
    """z_Δ, the update's noise multiplier (z without adaptive clipping)."""

    @classmethod
    def start(cls, cfg: Config) -> ServerDp:
        """z, given or calibrated; an empty ledger (:meth:`resume` fills it)."""
        dp = cfg.dp
        z = dp.noise_multiplier
        if dp.target_epsilon > 0:
            population = cfg.simulation.num_clients
            z = calibrate_noise(dp, cfg.server.rounds, population)
            log.info(
                "dp: z = %.4f gives ε ≤ %g at δ = %g after %d rounds (%s, %s sampling, %d clients)",
                z,
                dp.target_epsilon,
                dp.delta,
                cfg.server.rounds,
                dp.accountant,
                dp.sampling,
                population,
            )
        ledger, sampler = Ledger(dp.accountant, dp.delta), Sampler(dp)
        run = cls(cfg, z, ledger, sampler, dp.clip_norm, update_noise=z)
        if dp.adaptive_clipping:
            expected = sampler.expected(cfg.simulation.num_clients)
            run.count_noise = dp.count_noise or max(expected / 20, z)
            try:
                run.update_noise = update_noise_multiplier(z, run.count_noise)
            except ValueError as err:
                raise ConfigError(f"dp.count_noise: {err}") from None
            log.info(
                "dp: adaptive clipping from C = %g towards the %g quantile: σ_b = %.3f on the "
                "count, z_Δ = %.4f on the update",
                dp.clip_norm,
                dp.target_quantile,
                run.count_noise,
                run.update_noise,
            )
        return run

    def resume(self, rows: list[MetricsRow]) -> None:
        """The ledger of the rounds ``rows`` released (a resumed run continues it)."""
        events = [RoundEvent.from_json(r.dp["event"]) for r in rows if r.dp and "event" in r.dp]
        self.ledger = Ledger(self.cfg.dp.accountant, self.cfg.dp.delta, events)
        adapted = [r.dp["next_clip_norm"] for r in rows if r.dp and "next_clip_norm" in r.dp]
        if adapted:
            self.clip_norm = float(adapted[-1])
        if events:
            log.info(
                "dp: resumed the ledger of %d rounds: ε = %.4f", len(events), self.ledger.epsilon()
            )

    def resolved(self) -> Config:
        """The config clients get: z in ``dp.noise_multiplier`` (local noise needs it)."""
        dp = replace(self.cfg.dp, noise_multiplier=self.noise_multiplier, target_epsilon=0.0)
        return replace(self.cfg, dp=dp)

    def event(self, population: int) -> RoundEvent:
        """What a round with ``population`` nodes to sample from costs."""
        return round_event(self.cfg.dp, self.noise_multiplier, population)

    def check_budget(self, server_round: int, population: int) -> None:
        """Raise :class:`PrivacyBudgetSpent` if the round would take ε past the target."""
        target = self.cfg.dp.target_epsilon
        if target <= 0:
            return
        after = self.ledger.epsilon(self.event(population))
        if after > target * (1 + 1e-6):
            raise PrivacyBudgetSpent(
                f"round {server_round} would take ε to {after:.4f} > dp.target_epsilon={target} "
                f"at δ={self.cfg.dp.delta}; the run stops after round {server_round - 1}"
            )

    def release(self, count_keys: frozenset[str], population: int, server_round: int) -> Release:
        """The round's release: central noise (none when clients added it) and the fixed
        denominator, the expected number of clients out of ``population``."""
        central = self.cfg.dp.placement == "central"
        std = self.update_noise * self.clip_norm if central else 0.0
        generator = noise_generator(self.cfg.dp.seed, SERVER_STREAM, server_round)
        expected = self.sampler.expected(population)
        return Release(count_keys, std, generator, expected, self.count_noise)

    def record(self, population: int, sampled: int, release: Release) -> dict[str, Any]:
        """Add the round ``release`` released to the ledger (and, under adaptive clipping,
        move C); its ``dp`` entry for the metrics row."""
        event = self.event(population)
        epsilon = self.ledger.add(event)
        entry = self.summary(epsilon, sampled, release.expected_clients)
        entry["event"] = event.to_json()
        if self.cfg.dp.adaptive_clipping:
            entry |= self._adapt(release)
        return entry

    def _adapt(self, release: Release) -> dict[str, Any]:
        """The next round's C from the released share of unclipped clients."""
        dp = self.cfg.dp
        unclipped = dp.target_quantile if release.unclipped is None else release.unclipped
        self.clip_norm = next_clip_norm(self.clip_norm, unclipped, dp.target_quantile, dp.clip_lr)
        return {
            "unclipped_fraction": unclipped,
            "next_clip_norm": self.clip_norm,
            "count_noise": self.count_noise,
            "update_noise_multiplier": self.update_noise,
        }

    def summary(self, epsilon: float, sampled: int = 0, expected: float = 0.0) -> dict[str, Any]:
        """ε with every assumption it rests on, for the metrics row."""
        dp = self.cfg.dp
        return {
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "delta": dp.delta,
            "accountant": dp.accountant,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "placement": dp.placement,
            "sampling": dp.sampling,
            "sampling_rate": dp.sampling_rate if dp.sampling == "poisson" else None,
            "clients_sampled": sampled,
            "clients_expected": expected,
            "unit": "client (add/remove one)"
            if dp.sampling == "poisson"
            else "client (replace one)",
        }
