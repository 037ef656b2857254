"""Client-level differential privacy: DP-FedAvg (McMahan et al., "Learning Differentially
Private Recurrent Language Models", ICLR 2018) with Google's dp-accounting for ε.

``mechanism``: clipping a client's update, Gaussian noise, and the fixed-denominator release of
the sum; ``accounting``: the ledger (RDP, PLD) and the calibration of z to a target ε;
``sampling``: who takes part in a round, exactly as the ledger assumes. The assumptions behind
every ε are in docs/privacy.md.
"""

from fedllama.privacy.dp.accounting import Ledger, RoundEvent, calibrate_noise, round_event
from fedllama.privacy.dp.mechanism import (
    UNCLIPPED,
    Release,
    clip_update,
    next_clip_norm,
    noise_generator,
    privatize,
    update_noise_multiplier,
)
from fedllama.privacy.dp.sampling import Sampler

__all__ = [
    "UNCLIPPED",
    "Ledger",
    "Release",
    "RoundEvent",
    "Sampler",
    "calibrate_noise",
    "clip_update",
    "next_clip_norm",
    "noise_generator",
    "privatize",
    "round_event",
    "update_noise_multiplier",
]
