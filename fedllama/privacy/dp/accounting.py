"""The privacy ledger: ε at δ after every released round, from Google's dp-accounting.

Each released round adds one :class:`RoundEvent`. Its ``dp_event`` is what dp-accounting
composes; the noise multiplier it carries is relative to the L2 sensitivity of what is
released, which depends on the adjacency the sampling implies (docs/privacy.md):

=========================  =====================  ===========================================
``dp.sampling`` (central)  adjacency              event (σ = z·C on the sum)
=========================  =====================  ===========================================
``poisson`` (rate q)       add/remove one client  PoissonSampled(q, Gaussian(z))
``fixed`` (m of N)         replace one client     SampledWithoutReplacement(N, m, Gaussian(z/2))
                                                  (replacing a client moves the sum by 2C)
``all``                    replace one client     Gaussian(z/2) (every client takes part every
                                                  round, so membership is public: the neighbour
                                                  is a client whose data changed, 2C away)
=========================  =====================  ===========================================

A plain ``GaussianDpEvent`` is always composed under add/remove adjacency with the multiplier
already divided by the sensitivity in units of C (dp-accounting's PLD accountant would double
a Gaussian's sensitivity under replace-one where its RDP accountant does not); only sampling
without replacement, which RDP accounts under replace-one alone, uses that relation.

With ``dp.placement=local`` the server sees each client's own noisy update, so sampling
amplifies nothing and two inputs of one client differ by up to 2C: Gaussian(z/2) per round in
which the client takes part, counted for every round (the worst case of a client in all).

With ``dp.placement=distributed`` the guarantee holds against the server itself, which knows who
took part: no amplification, replace-one sensitivity 2Δ of the rounded integers, and the noise
of the clients actually in the sum: a ``ZCDpEvent`` per round from Kairouz et al.'s bound
(:mod:`fedllama.privacy.dp.distributed`), composed by the RDP accountant.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import dp_accounting as dpa
from dp_accounting import pld, rdp

from fedllama.config import DpConfig
from fedllama.privacy.dp.distributed import DdgParams, zcdp_event


@dataclass(frozen=True)
class RoundEvent:
    """What one released round costs (as recorded in its metrics row)."""

    noise_multiplier: float
    """z: the noise's standard deviation over the clip norm, σ / C."""
    sampling: str
    placement: str
    sampling_rate: float = 1.0
    population: int = 0
    sample_size: int = 0
    size: int = 0
    """``distributed``: D, integers per client."""
    survivors: int = 0
    """``distributed``: the clients whose noise is in the sum."""
    local_std: float = 0.0
    """``distributed``: σ_c, each client's discrete Gaussian (integer units)."""
    norm_bound: float = 0.0
    """``distributed``: Δ, each client's rounded L2 bound (integer units)."""

    @property
    def replace_one(self) -> bool:
        """Whether dp-accounting must compose the event under replace-one adjacency (sampling
        without replacement); every other event is stated under add/remove one."""
        return self.sampling == "fixed" and self.placement == "central"

    def dp_event(self) -> dpa.DpEvent:
        """The event dp-accounting composes."""
        z = self.noise_multiplier
        if self.placement == "distributed":
            return zcdp_event(self.size, self.local_std, 2 * self.norm_bound, self.survivors)
        if self.placement == "local":
            return dpa.GaussianDpEvent(z / 2)
        if self.sampling == "poisson":
            return dpa.PoissonSampledDpEvent(self.sampling_rate, dpa.GaussianDpEvent(z))
        if self.sampling == "fixed":
            return dpa.SampledWithoutReplacementDpEvent(
                self.population, self.sample_size, dpa.GaussianDpEvent(z / 2)
            )
        return dpa.GaussianDpEvent(z / 2)  # all: replace one, sensitivity 2C

    def to_json(self) -> dict[str, Any]:
        """For the metrics row."""
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RoundEvent:
        """From a metrics row."""
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})


def round_event(
    cfg: DpConfig,
    noise_multiplier: float,
    population: int,
    ddg: DdgParams | None = None,
    survivors: int = 0,
) -> RoundEvent:
    """The event of a round under ``cfg`` with ``population`` nodes to sample from; with
    distributed noise, of parameters ``ddg`` with ``survivors`` clients in the sum."""
    event = RoundEvent(
        noise_multiplier=noise_multiplier,
        sampling=cfg.sampling,
        placement=cfg.placement,
        sampling_rate=cfg.sampling_rate if cfg.sampling == "poisson" else 1.0,
        population=population,
        sample_size=min(cfg.clients_per_round, population) if cfg.sampling == "fixed" else 0,
    )
    if ddg is None:
        return event
    return replace(
        event,
        size=ddg.size,
        survivors=survivors,
        local_std=ddg.local_std,
        norm_bound=ddg.norm_bound,
    )


def _accountant(kind: str, replace_one: bool) -> dpa.PrivacyAccountant:
    relation = (
        dpa.NeighboringRelation.REPLACE_ONE
        if replace_one
        else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    if kind == "pld":
        return pld.PLDAccountant(neighboring_relation=relation)
    return rdp.RdpAccountant(neighboring_relation=relation)


def composed(events: Iterable[RoundEvent]) -> dpa.DpEvent:
    """All rounds as one event; runs of equal rounds are self-composed (cheap for PLD)."""
    parts = [
        dpa.SelfComposedDpEvent(event.dp_event(), len(list(run)))
        for event, run in itertools.groupby(events)
    ]
    return dpa.ComposedDpEvent(parts)


@contextlib.contextmanager
def _absl_without_basic_config() -> Iterator[None]:
    """dp-accounting warns through absl when it drops an RDP order that did not converge (a
    numerical note: ε stays an upper bound), and absl calls ``logging.basicConfig()`` when the
    root logger has no handler, which would then print every library's DEBUG records. A
    NullHandler on the root for the duration keeps the process's logging as it was."""
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


class Ledger:
    """ε at δ over the released rounds, from a fresh ``rdp`` or ``pld`` accountant."""

    def __init__(self, accountant: str, delta: float, events: Iterable[RoundEvent] = ()) -> None:
        self.accountant = accountant
        self.delta = delta
        self.events: list[RoundEvent] = list(events)
        self._last: tuple[tuple[RoundEvent, ...], float] = ((), 0.0)
        """The last rounds accounted and their ε: a look-ahead before a round (the budget
        check) and the record after it ask for the same ε; a PLD composition is seconds."""

    def epsilon(self, *extra: RoundEvent) -> float:
        """ε after the recorded rounds (and ``extra`` ones, to look ahead); 0 before any."""
        events = (*self.events, *extra)
        if events == self._last[0]:
            return self._last[1]
        acc = _accountant(self.accountant, events[0].replace_one)
        with _absl_without_basic_config():
            acc.compose(composed(events))
            epsilon = float(acc.get_epsilon(self.delta))
        self._last = (events, epsilon)
        return epsilon

    def add(self, event: RoundEvent) -> float:
        """Record a released round; ε after it."""
        self.events.append(event)
        return self.epsilon()


def calibrate_noise(
    cfg: DpConfig,
    rounds: int,
    population: int,
    event_of: Callable[[float], RoundEvent] | None = None,
) -> float:
    """The smallest z (within dp-accounting's tolerance) whose ε after ``rounds`` released
    rounds is at most ``cfg.target_epsilon`` at ``cfg.delta``; ``event_of(z)`` is one round's
    event (the default: :func:`round_event` of ``cfg`` over ``population``)."""
    one = event_of or (lambda z: round_event(cfg, z, population))
    probe = one(1.0)

    def event(z: float) -> dpa.DpEvent:
        return composed([one(z)] * rounds)

    with _absl_without_basic_config():
        return float(
            dpa.calibrate_dp_mechanism(
                lambda: _accountant(cfg.accountant, probe.replace_one),
                event,
                cfg.target_epsilon,
                cfg.delta,
            )
        )
