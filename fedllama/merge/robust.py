"""Bounded influence over individual updates: norm bounds and robust combiners (plain torch).

These act on a summable strategy's encodings when the server sees each of them (the plain
path). They need an encoding to be its client's weight w times its update, plus count keys
worth w on the coordinates (rank slots) the client owns (``MergeStrategy.robust_refusal`` is
empty); ``fedllama.wire.validate.check_weight`` has already checked the count keys against the
declared weight. A client's *update* is then ``payload / w``, where the payload is every key
that is not a count key, taken as one vector.

* Norm bound (Sun et al., "Can You Really Backdoor Federated Learning?", arXiv:1911.07963,
  2019): an update over the bound is scaled down to it (:func:`scale_update`) or dropped. With
  the strategy's weighted mean this is the norm-bounded mean.
* Coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018).
* Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017): the update(s) with the smallest sum of squared distances to
  their n − f − 2 nearest neighbours; Multi-Krum averages the m best.

The robust combiners weigh every client equally (as in the papers: a declared weight is itself
something a client can lie about). With mixed ranks each coordinate's statistic is taken over
the clients that own its rank slot, as the strategy's own mean is. The result is returned as the
encoding of one virtual client of weight 1, which the strategy's ``decode`` turns into the
aggregated delta.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedllama.merge.interface import AdapterState, MergeError
from fedllama.merge.lora import is_a, is_b


def split_counts(
    encoded: AdapterState, count_keys: Iterable[str]
) -> tuple[AdapterState, AdapterState]:
    """(payload, counts): the update's keys and the weight-carrying keys of an encoding."""
    keys = frozenset(count_keys)
    payload = {k: v for k, v in encoded.items() if k not in keys}
    counts = {k: v for k, v in encoded.items() if k in keys}
    return payload, counts


def update_norm(encoded: AdapterState, count_keys: Iterable[str], weight: float) -> float:
    """‖payload / w‖₂ over all of the payload's tensors as one vector (float64)."""
    payload, _ = split_counts(encoded, count_keys)
    squares = sum(float(v.double().square().sum()) for v in payload.values())
    return float(squares**0.5) / weight


def scale_update(encoded: AdapterState, count_keys: Iterable[str], factor: float) -> AdapterState:
    """The encoding with its update scaled by ``factor`` and its weight unchanged."""
    payload, counts = split_counts(encoded, count_keys)
    return {**{k: v * factor for k, v in payload.items()}, **counts}


def bound_of(norms: Sequence[float], fixed: float, median_factor: float) -> float:
    """The round's norm bound: ``fixed`` (> 0), ``median_factor`` × the median norm (> 0), the
    smaller of the two when both are set; ``inf`` when neither is."""
    bounds = [fixed] if fixed > 0 else []
    if median_factor > 0 and norms:
        bounds.append(median_factor * float(torch.tensor(list(norms)).median()))
    return min(bounds) if bounds else float("inf")


def _slot_owners(counts: AdapterState) -> torch.Tensor | None:
    """(R,) bool: the rank slots a client owns, read off a per-slot count key; None when its
    count keys are scalars (it owns every coordinate)."""
    for value in counts.values():
        if value.numel() > 1:
            return value.reshape(-1) > 0
    return None


def _owned(key: str, value: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """Bool mask of the coordinates of ``value`` (a payload tensor) its client owns."""
    if slots is None:
        return torch.ones_like(value, dtype=torch.bool)
    if is_a(key) and value.dim() == 2 and value.shape[0] == slots.numel():
        return slots[:, None].expand_as(value)  # A: (R, in); slot i is row i
    if is_b(key) and value.dim() == 2 and value.shape[1] == slots.numel():
        return slots[None, :].expand_as(value)  # B: (out, R); slot i is column i
    return torch.ones_like(value, dtype=torch.bool)


def _stack(
    updates: Sequence[AdapterState], slots: Sequence[torch.Tensor | None], key: str
) -> torch.Tensor:
    """(n, *shape) float32 of one key, NaN where a client does not own a coordinate."""
    rows = []
    for update, owned in zip(updates, slots, strict=True):
        value = update[key].to(torch.float32)
        rows.append(torch.where(_owned(key, value, owned), value, torch.nan))
    return torch.stack(rows)


def _trimmed(stacked: torch.Tensor, trim: float, median: bool) -> torch.Tensor:
    """Per coordinate over its m owners (non-NaN): the median, or the mean after cutting
    ⌊trim·m⌋ values at each end; 0 where no client owns it."""
    values, _ = torch.sort(stacked, dim=0)  # NaN sorts last
    owners = (~stacked.isnan()).sum(0)  # m per coordinate
    filled = values.nan_to_num(0.0)
    if median:
        low = ((owners - 1).clamp_min(0) // 2).unsqueeze(0)
        high = (owners // 2).clamp_max(stacked.shape[0] - 1).unsqueeze(0)
        mid = (filled.gather(0, low) + filled.gather(0, high)).squeeze(0) / 2
        return torch.where(owners > 0, mid, 0.0)
    cut = torch.floor(owners.to(torch.float64) * trim).to(torch.long)
    kept = (owners - 2 * cut).clamp_min(1)
    total = torch.cat([torch.zeros_like(filled[:1]), filled.double().cumsum(0)])  # (n+1, ...)
    upper = total.gather(0, (cut + kept).unsqueeze(0)).squeeze(0)
    lower = total.gather(0, cut.unsqueeze(0)).squeeze(0)
    mean = ((upper - lower) / kept).to(torch.float32)
    return torch.where(owners > 0, mean, 0.0)


def krum_scores(updates: Sequence[AdapterState], byzantine: int) -> torch.Tensor:
    """Krum's score of each update: the sum of its squared distances to its n − f − 2 nearest
    neighbours (Blanchard et al. 2017, §4); coordinates a client does not own count as 0."""
    n = len(updates)
    keys = sorted(updates[0])
    flat = torch.stack([torch.cat([u[k].reshape(-1).double() for k in keys]) for u in updates])
    distances = torch.cdist(flat, flat).square()  # (n, n)
    closest = n - byzantine - 2
    nearest, _ = torch.sort(distances, dim=1)
    return nearest[:, 1 : closest + 1].sum(1)  # column 0 is the distance to itself


def combine(
    updates: Sequence[AdapterState],
    counts: Sequence[AdapterState],
    combiner: str,
    *,
    trim: float = 0.1,
    byzantine: int = 1,
    krum_select: int = 0,
) -> tuple[AdapterState, list[int]]:
    """A robust estimate of the clients' updates as one weight-1 encoding, and the indices of
    the updates it left out entirely (Krum's rejects; empty for the coordinate-wise rules).

    Args:
        updates: each client's update (payload / w), zero-padded where it owns no slot.
        counts: each client's count keys divided by its weight (1 on what it owns, else 0).
        combiner: ``median``, ``trimmed_mean``, ``krum`` or ``multi_krum``.

    Raises:
        MergeError: no update, or too few for Krum (n < 2f + 3), or keys that differ.
    """
    n = len(updates)
    if n == 0:
        raise MergeError("no update to combine")
    keys = set(updates[0])
    if any(set(u) != keys for u in updates) or any(set(c) != set(counts[0]) for c in counts):
        raise MergeError("encoding keys differ between replies")
    slots = [_slot_owners(c) for c in counts]
    chosen = list(range(n))
    if combiner in ("krum", "multi_krum"):
        if n < 2 * byzantine + 3:
            raise MergeError(
                f"robust.combiner={combiner} with robust.byzantine={byzantine} needs at least "
                f"2f + 3 = {2 * byzantine + 3} updates, got {n}"
            )
        scores = krum_scores(updates, byzantine)
        m = 1 if combiner == "krum" else (krum_select or n - byzantine)
        chosen = sorted(torch.argsort(scores)[: min(m, n)].tolist())
    elif combiner not in ("median", "trimmed_mean"):
        raise MergeError(f"unknown robust combiner {combiner!r}")
    out: AdapterState = {}
    for key in sorted(keys):
        stacked = _stack([updates[i] for i in chosen], [slots[i] for i in chosen], key)
        if combiner == "median":
            out[key] = _trimmed(stacked, 0.0, median=True)
        elif combiner == "trimmed_mean":
            out[key] = _trimmed(stacked, trim, median=False)
        else:  # the (unweighted) mean of the chosen updates over each coordinate's owners
            out[key] = _trimmed(stacked, 0.0, median=False)
    for key in counts[0]:  # weight 1 wherever any counted client owns the slot
        owned = torch.stack([counts[i][key] for i in chosen]) > 0
        out[key] = owned.any(0).to(torch.float32)
    left_out = [i for i in range(n) if i not in set(chosen)]
    return out, left_out
