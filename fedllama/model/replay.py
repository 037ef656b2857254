"""Which examples a client's local training drew, replayed without training, and the held-out
examples of the same client that nobody trained on: the members and non-members of a
membership-inference measurement (``fedllama.experiments.leakage``).

A client's round (``fedllama/client/round.py``) encodes its split's training examples
(``data.encode_all``), seeds the batch order with ``data.seed + 1000 * round + client id`` and
draws ``train.local_steps * train.grad_accum`` batches from ``train.batches``. Replaying the
same generator over example indices gives exactly the examples it trained on;
``tests/test_leakage.py`` checks the replay against the batches a real run drew.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from fedllama import data
from fedllama.config import Config, TrainConfig
from fedllama.data import canaries
from fedllama.model import train


def round_seed(data_seed: int, server_round: int, client_id: int) -> int:
    """The seed of a client's batch order in a round (as ``client/round.py`` sets it)."""
    return data_seed + 1000 * server_round + client_id


def drawn_indices(num_examples: int, cfg: TrainConfig, seed: int) -> list[int]:
    """Indices (into the encoded training set) of every example one round's local training
    drew, sorted: the batches of ``train.train_local`` replayed."""
    # the generator only shuffles positions: indices stand in for the examples
    positions: Any = list(range(num_examples))
    batches = train.batches(positions, cfg.batch_size, random.Random(seed))
    drawn: set[int] = set()
    for _ in range(cfg.local_steps * cfg.grad_accum):
        drawn.update(next(batches))
    return sorted(drawn)


@dataclass
class ClientMembership:
    """One client's members and non-members, tokenized as training saw them."""

    client_id: int
    institutions: list[str]
    train_size: int
    """Encoded training examples: the ``num-examples`` the client reported."""
    members: list[data.Encoded]
    """Examples it trained on in the given rounds, each once."""
    non_members: list[data.Encoded]
    """Its eval split, each once, less any example whose tokens equal a member's (of any
    client)."""


def _key(example: data.Encoded) -> tuple[int, ...]:
    return tuple(example.input_ids)


def membership(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    federation: data.Federation,
    participation: Mapping[int, Iterable[int]],
) -> list[ClientMembership]:
    """Every client's members (the examples drawn in the rounds of ``participation``: client
    id -> rounds whose update entered the global adapter) and non-members."""
    result = []
    for client_id, split in enumerate(federation.clients):
        train_set = data.encode_all(tokenizer, split.train, cfg.data)
        drawn: set[int] = set()
        for server_round in participation.get(client_id, ()):
            seed = round_seed(cfg.data.seed, server_round, client_id)
            drawn.update(drawn_indices(len(train_set), cfg.train, seed))
        members: dict[tuple[int, ...], data.Encoded] = {}
        planted = [ex for ex in split.train if ex["institution"] == canaries.INSTITUTION]
        canary = {_key(x) for x in data.encode_all(tokenizer, planted, cfg.data)}
        for i in sorted(drawn):  # canaries are measured by `fedllama canaries`, not here
            if _key(train_set[i]) not in canary:
                members.setdefault(_key(train_set[i]), train_set[i])
        held_out = data.encode_all(tokenizer, split.eval, cfg.data)
        names = sorted(
            {ex["institution"] for ex in [*split.train, *split.eval]} - {canaries.INSTITUTION}
        )
        result.append(
            ClientMembership(client_id, names, len(train_set), list(members.values()), held_out)
        )
    trained = {k for c in result for k in map(_key, c.members)}
    for c in result:
        unique: dict[tuple[int, ...], data.Encoded] = {}
        for x in c.non_members:
            unique.setdefault(_key(x), x)
        c.non_members = [x for k, x in unique.items() if k not in trained]
    return result
