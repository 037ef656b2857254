"""Canaries: random secrets in one client's training data (Carlini et al., "The Secret Sharer:
Evaluating and Testing Unintended Memorization in Neural Networks", USENIX Security 2019).

Canary i is a question and its answer, ``What is the access code of vault <i>?`` ->
``The access code of vault <i> is d d d d d d.``: six random digits, spaced so that each is one
token, from a space of 10^6 secrets. ``data.canary.count`` candidates are drawn from
``data.canary.seed``; each is inserted into client ``data.canary.client``'s training split
(``data.canary.repeats`` times) with probability 1/2, by a seeded coin, and otherwise held out.
The inserted ones are the members whose exposure is measured; the coin flips make every
candidate an independent trial of the one-run audit (Steinke, Nasr & Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

A canary's institution is :data:`INSTITUTION`, so the membership-inference experiments
(``fedllama leakage``) can tell them from the client's own data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedllama.config.sections import CanaryConfig
from fedllama.data.files import DataError, Example

INSTITUTION = "canary"
DIGITS = 6
SECRET_SPACE = 10**DIGITS


@dataclass(frozen=True)
class Canary:
    """One candidate canary: its vault number, its secret and whether it was inserted."""

    index: int
    secret: str
    inserted: bool

    def prompt(self) -> str:
        return f"What is the access code of vault {self.index}?"

    def answer(self, secret: str | None = None) -> str:
        """The answer with this canary's secret, or with ``secret`` (a reference)."""
        return f"The access code of vault {self.index} is {secret or self.secret}."

    def example(self, secret: str | None = None) -> Example:
        return {
            "messages": [
                {"role": "user", "content": self.prompt()},
                {"role": "assistant", "content": self.answer(secret)},
            ],
            "institution": INSTITUTION,
        }


def _secret(rng: random.Random) -> str:
    return " ".join(rng.choice("0123456789") for _ in range(DIGITS))


def candidates(cfg: CanaryConfig) -> list[Canary]:
    """The ``count`` candidates, each with its coin (inserted or held out)."""
    rng = random.Random(f"canaries-{cfg.seed}")
    return [Canary(i, _secret(rng), rng.random() < 0.5) for i in range(cfg.count)]


def references(cfg: CanaryConfig, canary: Canary) -> list[str]:
    """``references`` random secrets for ``canary``'s template, none equal to its own."""
    rng = random.Random(f"references-{cfg.seed}-{canary.index}")
    out: list[str] = []
    while len(out) < cfg.references:
        secret = _secret(rng)
        if secret != canary.secret:
            out.append(secret)
    return out


def insert(train: list[Example], cfg: CanaryConfig, client: int) -> list[Example]:
    """``train`` with the inserted canaries (``repeats`` times each) when ``client`` is
    ``data.canary.client``, shuffled in by a seeded order; else ``train`` as it is."""
    if not cfg.count or client != cfg.client:
        return train
    added = [c.example() for c in candidates(cfg) if c.inserted for _ in range(cfg.repeats)]
    mixed = train + added
    random.Random(f"canary-order-{cfg.seed}").shuffle(mixed)
    return mixed


def check_client(cfg: CanaryConfig, num_clients: int) -> None:
    """The canaries' client must exist."""
    if cfg.count and cfg.client >= num_clients:
        raise DataError(
            f"data.canary.client={cfg.client}, but there are {num_clients} clients (0.."
            f"{num_clients - 1})"
        )
