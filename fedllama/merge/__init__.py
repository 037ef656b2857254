"""The merge core: the strategy interface, the running sum, the residual adapter's
bookkeeping, low-rank algebra and the server optimizers. Plain torch: no Flower import.

Strategies live in ``strategies/`` (one file each) and implement :class:`MergeStrategy`; this
package does not import them.
"""

from fedllama.merge.interface import (
    WEIGHT_KEY,
    AdapterState,
    MergeError,
    MergeStrategy,
    ResidualMergeStrategy,
    TrustedMergeStrategy,
    frozen_key,
)
from fedllama.merge.lora import is_a, is_b, is_dense, lora_pairs, pad, rank_of
from fedllama.merge.residual import (
    RESIDUAL,
    add_residual,
    residual_view,
    split_residual,
    with_prefix,
    with_residual,
)
from fedllama.merge.sum import SumAccumulator, weighted_mean

__all__ = [
    "RESIDUAL",
    "WEIGHT_KEY",
    "AdapterState",
    "MergeError",
    "MergeStrategy",
    "ResidualMergeStrategy",
    "SumAccumulator",
    "TrustedMergeStrategy",
    "add_residual",
    "frozen_key",
    "is_a",
    "is_b",
    "is_dense",
    "lora_pairs",
    "pad",
    "rank_of",
    "residual_view",
    "split_residual",
    "weighted_mean",
    "with_prefix",
    "with_residual",
]
