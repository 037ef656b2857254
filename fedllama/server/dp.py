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
import secrets
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

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
from fedllama.privacy.dp.distributed import DdgParams, DistributedNoiseError, plan_round
from fedllama.privacy.dp.mechanism import ROTATION_STREAM, SERVER_STREAM
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
        if dp.target_epsilon > 0 and dp.placement == "distributed":
            z = 0.0  # calibrated in the first round, when the payload's size is known
        elif dp.target_epsilon > 0:
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
        """The config clients get: z in ``dp.noise_multiplier`` (local noise needs it; with
        distributed noise each round's parameters carry the clients' share instead)."""
        if self.noise_multiplier == 0:
            return self.cfg
        dp = replace(self.cfg.dp, noise_multiplier=self.noise_multiplier, target_epsilon=0.0)
        return replace(self.cfg, dp=dp)

    def event(self, population: int, release: Release | None = None) -> RoundEvent:
        """What a round with ``population`` nodes to sample from costs; with distributed
        noise, ``release``'s parameters with its survivors (before the round: as provisioned,
        the least noise the round can release)."""
        ddg = release.distributed if release is not None else None
        if ddg is None:
            return round_event(self.cfg.dp, self.noise_multiplier, population)
        survivors = release.survivors if release and release.survivors else ddg.survivors
        return round_event(self.cfg.dp, self.noise_multiplier, population, ddg, survivors)

    def check_budget(self, server_round: int, population: int, release: Release) -> None:
        """Raise :class:`PrivacyBudgetSpent` if the round would take ε past the target."""
        target = self.cfg.dp.target_epsilon
        if target <= 0:
            return
        after = self.ledger.epsilon(self.event(population, release))
        if after > target * (1 + 1e-6):
            raise PrivacyBudgetSpent(
                f"round {server_round} would take ε to {after:.4f} > dp.target_epsilon={target} "
                f"at δ={self.cfg.dp.delta}; the run stops after round {server_round - 1}"
            )

    def release(
        self,
        count_keys: frozenset[str],
        population: int,
        server_round: int,
        sampled: int = 0,
        payload: int = 0,
    ) -> Release:
        """The round's release: central noise (none when clients added it) and the fixed
        denominator, the expected number of clients out of ``population``. With distributed
        noise also the round's parameters for ``sampled`` clients with ``payload`` values each
        (z is calibrated to the target ε the first time)."""
        central = self.cfg.dp.placement == "central"
        std = self.update_noise * self.clip_norm if central else 0.0
        generator = noise_generator(self.cfg.dp.seed, SERVER_STREAM, server_round)
        expected = self.sampler.expected(population)
        checked = self.clip_norm if central else 0.0  # a client's own noise hides its norm
        release = Release(count_keys, std, generator, expected, self.count_noise, checked)
        if self.cfg.dp.placement == "distributed":
            if self.noise_multiplier == 0:
                self._calibrate_distributed(population, payload, count_keys)
            release.distributed = self.plan(server_round, sampled, payload, count_keys)
        return release

    def provisioned(self, sampled: int) -> int:
        """m: the survivors distributed noise is provisioned for, ⌈(1 − tolerance)·sampled⌉."""
        return max(1, math.ceil((1 - self.cfg.dp.dropout_tolerance) * sampled - 1e-9))

    def plan(
        self,
        server_round: int,
        sampled: int,
        payload: int,
        count_keys: frozenset[str],
        noise_multiplier: float | None = None,
    ) -> DdgParams:
        """Distributed noise's parameters for a round of ``sampled`` clients at z (the run's
        unless given): provisioned for :meth:`provisioned` survivors, a fresh public
        rotation."""
        dp = self.cfg.dp
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        try:
            return plan_round(
                noise_multiplier=z,
                clip_norm=self.clip_norm,
                dim=payload,
                sampled=max(sampled, 1),
                survivors=self.provisioned(sampled),
                bits=dp.modulus_bits,
                seed=rotation_seed(dp.seed, server_round),
                count_keys=sorted(count_keys),
            )
        except DistributedNoiseError as err:
            raise ConfigError(f"dp.modulus_bits: {err}") from None

    def _calibrate_distributed(
        self, population: int, payload: int, count_keys: frozenset[str]
    ) -> None:
        """z for ``dp.target_epsilon`` with distributed noise, at the expected sample size
        provisioned as :meth:`plan` does (its discretization included)."""
        dp = self.cfg.dp
        sampled = max(2, round(self.sampler.expected(population)))

        def event_of(z: float) -> RoundEvent:
            ddg = self.plan(0, sampled, payload, count_keys, noise_multiplier=z)
            return round_event(dp, z, population, ddg, ddg.survivors)

        self.noise_multiplier = calibrate_noise(dp, self.cfg.server.rounds, population, event_of)
        self.update_noise = self.noise_multiplier
        log.info(
            "dp: z = %.4f gives ε ≤ %g at δ = %g after %d rounds (distributed discrete Gaussian, "
            "%d of %d clients provisioned, %d bits)",
            self.noise_multiplier,
            dp.target_epsilon,
            dp.delta,
            self.cfg.server.rounds,
            self.provisioned(sampled),
            sampled,
            dp.modulus_bits,
        )

    def record(self, population: int, sampled: int, release: Release) -> dict[str, Any]:
        """Add the round ``release`` released to the ledger (and, under adaptive clipping,
        move C); its ``dp`` entry for the metrics row. A distributed-noise round in which no
        client's vector was summed released nothing and costs nothing."""
        ddg = release.distributed
        if ddg is not None and release.survivors == 0:
            entry = self.summary(self.ledger.epsilon(), sampled, release.expected_clients)
            entry["released"] = False
            return entry
        event = self.event(population, release)
        epsilon = self.ledger.add(event)
        entry = self.summary(epsilon, sampled, release.expected_clients)
        entry["event"] = event.to_json()
        if ddg is not None:
            entry["distributed"] = {
                "survivors": release.survivors,
                "provisioned": ddg.survivors,
                "bits": ddg.bits,
                "values": ddg.size,
                "scale": ddg.scale,
                "noise_multiplier": math.sqrt(release.survivors)
                * ddg.local_std
                / (ddg.scale * ddg.clip_norm),
                "norm_bound_inflation": ddg.norm_bound / (ddg.clip_norm * ddg.scale),
                "headroom": release.headroom,
            }
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
            "unit": _unit(dp.placement, dp.sampling),
        }


def _unit(placement: str, sampling: str) -> str:
    """The adjacency (and the observer) the ε is stated for."""
    if placement != "central":
        return "client (replace one; against the server, no amplification by sampling)"
    return "client (add/remove one)" if sampling == "poisson" else "client (replace one)"


def rotation_seed(seed: int | None, server_round: int) -> int:
    """The public seed of a round's rotation: reproducible from ``dp.seed``, else fresh."""
    if seed is None:
        return secrets.randbits(62)
    return int(np.random.SeedSequence([seed, ROTATION_STREAM, server_round]).generate_state(1)[0])
