"""Splits: first a global eval set (drawn evenly from every institution) is held out for the server;
the rest is partitioned over clients with Flower Datasets' partitioners (natural id =
institution, IID, or Dirichlet over institutions); each client then holds out
``data.eval_fraction`` of its share for its own evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllama.config import DataConfig
from fedllama.data import canaries
from fedllama.data.demo import demo_federation
from fedllama.data.files import DataError, Example, read_local


@dataclass
class Split:
    """One client's examples: what it trains on and what it evaluates on."""

    train: list[Example]
    eval: list[Example]


def _by_institution(examples: Iterable[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex["institution"], []).append(ex)
    return groups


def load_pool(cfg: DataConfig, cache_dir: Path) -> dict[str, list[Example]]:
    """All examples of ``data.source``, grouped by institution."""
    if cfg.source == "demo":
        return demo_federation(cache_dir, cfg.max_examples_per_institution, cfg.seed)
    return _by_institution(read_local(cfg.source, cfg.columns))


def hold_out_global(
    pool: dict[str, list[Example]], size: int, seed: int
) -> tuple[list[Example], dict[str, list[Example]]]:
    """Take ``size`` examples spread evenly over institutions; return (global eval, rest)."""
    rng = random.Random(f"global-{seed}")
    shuffled = {k: rng.sample(v, len(v)) for k, v in sorted(pool.items())}
    held: list[Example] = []
    taken = dict.fromkeys(shuffled, 0)
    while len(held) < size and any(taken[k] < len(v) - 2 for k, v in shuffled.items()):
        for k, v in shuffled.items():
            # leave every institution at least two examples of its own (one train, one eval)
            if len(held) < size and taken[k] < len(v) - 2:
                held.append(v[taken[k]])
                taken[k] += 1
    rest = {k: v[taken[k] :] for k, v in shuffled.items()}
    return held, rest


def _partitioner(cfg: DataConfig, num_clients: int, num_institutions: int) -> Any:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if cfg.partition == "institution":
        if num_clients != num_institutions:
            raise DataError(
                f"data.partition=institution gives one client per institution: the data has "
                f"{num_institutions} institutions but simulation.num_clients={num_clients}"
            )
        return NaturalIdPartitioner(partition_by="institution")
    if cfg.partition == "iid":
        return IidPartitioner(num_partitions=num_clients)
    return DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="institution",
        alpha=cfg.dirichlet_alpha,
        min_partition_size=2,
        self_balancing=True,
        seed=cfg.seed,
    )


def partition_indices(
    institutions: Sequence[str], cfg: DataConfig, num_clients: int
) -> list[list[int]]:
    """Row indices of each client's share, by Flower Datasets' partitioners."""
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {"row": list(range(len(institutions))), "institution": list(institutions)}
    )
    partitioner = _partitioner(cfg, num_clients, len(set(institutions)))
    partitioner.dataset = dataset
    try:
        return [list(partitioner.load_partition(i)["row"]) for i in range(num_clients)]
    except ValueError as err:
        raise DataError(
            f"cannot split {len(institutions)} examples over {num_clients} clients with "
            f"data.partition={cfg.partition}: {err}"
        ) from err


def split_train_eval(examples: list[Example], fraction: float, seed: str) -> Split:
    """Hold out ``fraction`` (at least one example) for evaluation."""
    if len(examples) < 2:
        raise DataError(f"a client needs at least 2 examples (train + eval), got {len(examples)}")
    shuffled = random.Random(seed).sample(examples, len(examples))
    n_eval = min(len(shuffled) - 1, max(1, round(fraction * len(shuffled))))
    return Split(train=shuffled[n_eval:], eval=shuffled[:n_eval])


@dataclass
class Federation:
    """Every client's split plus the server's global eval set."""

    clients: list[Split]
    global_eval: list[Example]


def build_federation(cfg: DataConfig, num_clients: int, cache_dir: Path) -> Federation:
    """Deterministic (for a given config) split of ``data.source`` into clients and global eval."""
    pool = load_pool(cfg, cache_dir)
    global_eval, rest = hold_out_global(pool, cfg.global_eval_size, cfg.seed)
    rows = [ex for name in sorted(rest) for ex in rest[name]]
    # Flower's IidPartitioner takes contiguous shards (FederatedDataset shuffles first): shuffle.
    random.Random(f"rows-{cfg.seed}").shuffle(rows)
    parts = partition_indices([ex["institution"] for ex in rows], cfg, num_clients)
    clients = [
        split_train_eval([rows[i] for i in idx], cfg.eval_fraction, f"client-{cfg.seed}-{pid}")
        for pid, idx in enumerate(parts)
    ]
    canaries.check_client(cfg.canary, num_clients)
    for pid, split in enumerate(clients):  # after the split: canaries are trained on only
        split.train = canaries.insert(split.train, cfg.canary, pid)
    return Federation(clients=clients, global_eval=global_eval)
