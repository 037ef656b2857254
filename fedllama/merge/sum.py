"""The running sum of encodings the summable path needs, and the weighted mean."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedllama.merge.interface import WEIGHT_KEY, AdapterState, MergeError


class SumAccumulator:
    """Running sum of encodings, checked key by key and shape by shape against the first."""

    def __init__(self) -> None:
        self.total: AdapterState = {}
        self.count = 0

    def add(self, encoded: AdapterState) -> None:
        """Add one client's encoding (raises :class:`MergeError` on a mismatch)."""
        if self.count == 0:
            self.total = {k: v.detach().to(torch.float32).clone() for k, v in encoded.items()}
        else:
            if set(encoded) != set(self.total):
                raise MergeError(
                    f"encoding keys differ from the first reply's: "
                    f"{sorted(set(encoded) ^ set(self.total))[:3]}"
                )
            for k, v in encoded.items():
                if v.shape != self.total[k].shape:
                    raise MergeError(
                        f"{k}: shape {tuple(v.shape)}, expected {tuple(self.total[k].shape)}"
                    )
                self.total[k].add_(v)
        self.count += 1


def weighted_mean(summed: AdapterState, keys: Iterable[str]) -> AdapterState:
    """``summed[k] / Σw`` for each key, where the sum carries the total weight at WEIGHT_KEY."""
    total = float(summed[WEIGHT_KEY][0])
    if total <= 0:
        raise MergeError(f"total client weight is {total}; nothing to average")
    return {k: summed[k] / total for k in keys}
