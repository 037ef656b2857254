"""Encodings <-> one flat vector, in an order both sides agree on (checked by a digest)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


if TYPE_CHECKING:
    from fedllama.merge import AdapterState


@dataclass(frozen=True)
class Layout:
    """How an encoding is flattened: its keys in sorted order with their shapes."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]]) -> Layout:
        """The layout of encodings with these key shapes."""
        return cls(tuple((k, tuple(int(d) for d in shapes[k])) for k in sorted(shapes)))

    @property
    def size(self) -> int:
        """Elements of the flattened vector."""
        return sum(math.prod(shape) for _, shape in self.shapes)

    def digest(self) -> bytes:
        """SHA-256 of the layout, so client and server can check they flatten alike."""
        return hashlib.sha256(repr(self.shapes).encode()).digest()

    def flatten(self, arrays: Mapping[str, npt.NDArray[Any]]) -> F32:
        """Concatenate the encoding's arrays in sorted key order, as float32 (size,)."""
        return np.concatenate(
            [np.asarray(arrays[k], dtype=np.float32).reshape(-1) for k, _ in self.shapes]
        )

    def unflatten(self, vector: F64) -> AdapterState:
        """Inverse of :meth:`flatten` (float32 tensors)."""
        import torch

        out: AdapterState = {}
        start = 0
        for key, shape in self.shapes:
            stop = start + math.prod(shape)
            out[key] = torch.from_numpy(vector[start:stop].astype(np.float32).reshape(shape))
            start = stop
        return out
