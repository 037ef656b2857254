"""The Gaussian mechanism of DP-FedAvg on encodings: clip on the client, noise and a fixed
denominator at release.

An encoding holds *payload* keys (the client's update, ``w·Δ`` with w = 1 under DP) and
*count* keys (the client's weight, e.g. ``fedllama.weight`` or a slot mask of ones), which a
strategy names in ``count_keys``. Clipping bounds the payload of every client to L2 norm C, so
one client changes the payload of the sum by at most C (add/remove one client; 2C when one
client is replaced by another). The count keys of the sum are the number of clients that took
part, which itself reveals participation: :class:`Release` replaces them with the expected
number (McMahan et al.'s fixed-denominator estimator), so only the noisy payload is released.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fedllama.config import DpConfig
from fedllama.merge import AdapterState, MergeError
from fedllama.privacy.dp.distributed import DdgParams


def payload_keys(encoded: AdapterState, count_keys: Iterable[str]) -> list[str]:
    """The keys of ``encoded`` that carry the client's update (all but the count keys)."""
    counts = set(count_keys)
    return sorted(k for k in encoded if k not in counts)


def _norm(encoded: AdapterState, keys: Iterable[str]) -> float:
    return math.sqrt(sum(float(encoded[k].double().pow(2).sum()) for k in keys))


def update_norm(encoded: AdapterState, count_keys: Iterable[str]) -> float:
    """L2 norm of the payload as one vector."""
    return _norm(encoded, payload_keys(encoded, count_keys))


def clip_update(
    encoded: AdapterState, count_keys: Iterable[str], clip_norm: float
) -> tuple[AdapterState, float]:
    """The encoding with its payload scaled to L2 norm at most ``clip_norm``, and the norm it
    had (which stays on the client: sending it would leak)."""
    keys = set(payload_keys(encoded, count_keys))
    norm = _norm(encoded, keys)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale if k in keys else v for k, v in encoded.items()}, norm


CLIP_SLACK = 1e-4
"""Relative excess over C that :meth:`Release.admit` puts down to the client's float32
clipping (and removes by re-clipping); anything larger means the client did not clip."""

UNCLIPPED = "fedllama.dp.unclipped"
"""Encoding key of b − 1/2 under adaptive clipping (b = 1 when the update fit under C)."""

SERVER_STREAM, CLIENT_STREAM, ROTATION_STREAM = 1, 2, 3
"""First stream word of the server's noise, of a client's, and of distributed noise's rotation
(they never coincide)."""


def noise_generator(seed: int | None, *stream: int) -> torch.Generator:
    """A generator seeded from ``seed`` and ``stream`` (non-negative integers; reproducible
    runs), or from the OS's CSPRNG when ``seed`` is None. The Gaussian itself is torch's
    floating-point sampler (not hardened against floating-point attacks; docs/privacy.md)."""
    generator = torch.Generator()
    if seed is None:
        generator.manual_seed(secrets.randbits(63))
    else:
        state = np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0]
        generator.manual_seed(int(state) >> 1)
    return generator


def add_noise(
    state: AdapterState, keys: Iterable[str], std: float, generator: torch.Generator
) -> AdapterState:
    """``state`` with N(0, std²) added to every coordinate of ``keys``."""
    out = dict(state)
    for key in keys:
        value = state[key].to(torch.float32)
        out[key] = value + std * torch.randn(value.shape, generator=generator)
    return out


@dataclass
class Release:
    """What the server does to the sum of clipped encodings before ``merge.decode``.

    Args:
        count_keys: the strategy's count keys.
        noise_std: σ added to every payload coordinate of the sum: z·C with central noise
            (z_Δ·C with adaptive clipping), 0 when the clients added their noise (``local``).
        generator: the noise's generator.
        expected_clients: the round's expected number of clients (the fixed denominator).
        count_noise: σ_b, the noise on the sum of b − 1/2 under adaptive clipping (else 0).
    """

    count_keys: frozenset[str]
    noise_std: float
    generator: torch.Generator
    expected_clients: float
    count_noise: float = 0.0
    clip_norm: float = 0.0
    """C of the round: :meth:`admit` holds every summed payload to it (0: not checked)."""
    unclipped: float | None = None
    """After the call, under adaptive clipping: b̃, the noisy share of clients whose update
    fit under C (it steers the next round's C)."""
    distributed: DdgParams | None = None
    """With ``distributed`` noise: the round's parameters, which secure aggregation sends to the
    clients and decodes the sum with (``noise_std`` is then 0: the server adds nothing)."""
    survivors: int = 0
    """With ``distributed`` noise, set by secure aggregation: the clients whose noise shares
    are in the unmasked sum (what the ledger accounts)."""
    headroom: float | None = None
    """With ``distributed`` noise: the largest |value| of the sum over half the modulus."""

    def admit(self, encoded: AdapterState) -> AdapterState:
        """One client's encoding as the server may sum it: its payload within C (re-clipped
        exactly to C when the client's float32 clipping left it a hair above), its b − 1/2
        exactly ±1/2. The bound of the mechanism then holds whatever a client sends.

        Raises:
            MergeError: the payload's norm exceeds C by more than float rounding, or b − 1/2
                is not ±1/2: the client did not clip (it is left out of the sum).
        """
        if self.clip_norm <= 0:
            return encoded
        indicator = encoded.get(UNCLIPPED)
        if indicator is not None and not (indicator.numel() == 1 and abs(float(indicator)) == 0.5):
            raise MergeError(f"{UNCLIPPED} must be ±0.5 (b − 1/2), got {indicator.tolist()}")
        keys = set(payload_keys(encoded, self.count_keys | {UNCLIPPED}))
        norm = _norm(encoded, keys)
        if norm > self.clip_norm * (1 + CLIP_SLACK):
            raise MergeError(
                f"the update's norm {norm:.6g} exceeds the round's DP clip norm C = "
                f"{self.clip_norm:.6g}: the client did not clip it"
            )
        if norm <= self.clip_norm:
            return encoded
        scale = self.clip_norm / norm  # float32 rounding left it a hair above C
        return {k: v * scale if k in keys else v for k, v in encoded.items()}

    def __call__(self, summed: AdapterState) -> AdapterState:
        """The noisy payload, and the expected number of clients in every count key."""
        summed = dict(summed)
        indicator = summed.pop(UNCLIPPED, None)
        if indicator is not None:
            noisy = float(indicator.sum()) + self.count_noise * float(
                torch.randn(1, generator=self.generator)
            )
            self.unclipped = noisy / self.expected_clients + 0.5 if self.expected_clients else 0.5
        keys = payload_keys(summed, self.count_keys)
        out = add_noise(summed, keys, self.noise_std, self.generator)
        for key in self.count_keys & set(summed):
            out[key] = torch.full_like(summed[key], float(self.expected_clients))
        return out


def next_clip_norm(clip_norm: float, unclipped: float, target: float, lr: float) -> float:
    """Andrew et al.'s geometric update: C·exp(−η(b̃ − γ)). Fewer unclipped clients than the
    target quantile γ raise C, more lower it."""
    return clip_norm * math.exp(-lr * (unclipped - target))


def update_noise_multiplier(z: float, count_noise: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2): the update's noise multiplier when the count of
    unclipped clients (sensitivity 1/2) carries σ_b, so that both queries together are one
    Gaussian mechanism of multiplier z (Andrew et al., Theorem 1).

    Raises:
        ValueError: σ_b ≤ z/2 (the count would take the whole budget).
    """
    if 2 * count_noise <= z:
        raise ValueError(f"dp.count_noise σ_b={count_noise:g} must exceed z/2={z / 2:g} (z={z:g})")
    return float((z**-2 - (2 * count_noise) ** -2) ** -0.5)


def privatize(
    encoded: AdapterState,
    count_keys: frozenset[str],
    cfg: DpConfig,
    server_round: int,
    client_id: int,
) -> AdapterState:
    """A client's encoding as DP-FedAvg sends it: the payload clipped to ``dp.clip_norm``, and
    with ``dp.placement=local`` the whole noise N(0, (zC)²) added by the client itself.

    With ``dp.placement=distributed`` the clipped encoding goes to secure aggregation, whose
    mask stage turns it into noisy integers (:func:`fedllama.privacy.dp.distributed.encode`).

    The encoding must have been made with weight 1; the norm before clipping stays here. With
    ``dp.adaptive_clipping`` the encoding also carries b − 1/2 (b = 1 when the update fit
    under C) at :data:`UNCLIPPED`, which the server only ever sees summed and noised.
    """
    clipped, norm = clip_update(encoded, count_keys, cfg.clip_norm)
    if cfg.adaptive_clipping:  # b − 1/2 with b = 1[‖Δ‖ ≤ C]: summed, noised and released
        clipped[UNCLIPPED] = torch.tensor([0.5 if norm <= cfg.clip_norm else -0.5])
    if cfg.placement != "local":
        return clipped
    generator = noise_generator(cfg.seed, CLIENT_STREAM, server_round, client_id)
    std = cfg.noise_multiplier * cfg.clip_norm
    return add_noise(clipped, payload_keys(clipped, count_keys), std, generator)
