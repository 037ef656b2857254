"""Update codecs: what a client's encoding becomes on the wire, and what the server reads back.

One interface (:class:`Codec`), one registry (:data:`CODECS`), chosen by ``wire.codec``. What
each LoRA factor travels as:

- ``none``: float32 at the global rank (rank slots a client lacks are zeros). Lossless.
- ``strip``: float32 at the client's own rank: trailing all-zero rank slots are cut and the
  server pads them back. Lossless.
- ``fp16``: strip, then IEEE half precision (a tensor with a value beyond its range stays
  float32).
- ``int8``: strip, then int8 with one float32 scale per row (absmax / 127) and stochastic
  rounding, so that the decoded value is unbiased (Alistarh et al., "QSGD", NeurIPS 2017).
- ``ternary``: strip, then each rank slot as s·q, q in {-1, 0, 1} (two bits, four values a
  byte), s the slot's absmax, q drawn so that the decoded value is unbiased (TernGrad: Wen et
  al., "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep Learning",
  NeurIPS 2017).
- ``topk``: the ``wire.topk_fraction`` largest magnitudes of each tensor as (int32 flat index,
  float16 value); what is left out is kept by the client and added to its next update: error
  feedback (Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018;
  Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019).

Count keys (a strategy's example weights) always travel as float32, untouched: the server checks
them exactly. A codec's extra arrays sit under ``<key>#scale`` and ``<key>#index``; the value
array keeps the key's own name, so ``none`` is the format every earlier version sent.

The server decodes before it validates anything else (``wire/validate.validate_reply``): a
reply whose arrays do not match the codec (names, dtypes, shapes), with scales that are not
finite and non-negative, or indices out of range, unsorted or repeated, is a
:class:`ReplyError`, dropped with the client's name and the reason; the round goes on.

Lossy codecs are refused with differential privacy (rounding after clipping can lift an update
above the clip norm the noise is calibrated to, and error feedback re-sends clipped-away mass)
and every codec but ``none`` with secure aggregation (SecAgg+ masks one fixed-point vector of
equal length for every client: a per-client length, scale or index set cannot be summed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file, save_file

from fedllama.merge import AdapterState
from fedllama.merge.lora import is_a, is_b
from fedllama.wire.records import ReplyError, to_record

SCALE = "#scale"
INDEX = "#index"


def rank_dim(key: str) -> int | None:
    """The rank dimension of a LoRA factor (A: rows, B: columns), None for any other key."""
    return 0 if is_a(key) else 1 if is_b(key) else None


def strip(key: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` without its trailing all-zero rank slots (at least one slot kept)."""
    dim = rank_dim(key)
    if dim is None or value.ndim != 2:
        return value
    used = value.abs().sum(dim=1 - dim).nonzero()
    keep = max(int(used.max()) + 1 if used.numel() else 1, 1)
    return value.narrow(dim, 0, keep)


def unstrip(key: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A stripped factor padded back to ``shape`` with zero rank slots.

    Raises:
        ReplyError: ``value`` is not ``shape`` cut along the key's rank dimension.
    """
    if tuple(value.shape) == shape:
        return value
    dim = rank_dim(key)
    if dim is None or value.ndim != 2 or len(shape) != 2:
        raise ReplyError(f"{key}: shape {tuple(value.shape)}, expected {shape}")
    if value.shape[1 - dim] != shape[1 - dim] or not 1 <= value.shape[dim] <= shape[dim]:
        raise ReplyError(f"{key}: shape {tuple(value.shape)}, expected {shape} or its rank cut")
    out = np.zeros(shape, dtype=value.dtype)
    if dim == 0:
        out[: value.shape[0]] = value
    else:
        out[:, : value.shape[1]] = value
    return out


def _array(record: Mapping[str, Array], name: str, dtypes: tuple[str, ...]) -> np.ndarray:
    """The numpy value of ``record[name]``, its dtype one of ``dtypes``.

    Raises:
        ReplyError: it is missing, of another dtype, or its payload does not decode.
    """
    if name not in record:
        raise ReplyError(f"missing key {name}")
    array = record[name]
    if array.dtype not in dtypes:
        raise ReplyError(f"{name}: dtype {array.dtype}, expected {' or '.join(dtypes)}")
    try:
        values = array.numpy()
    except Exception as err:  # a corrupt payload fails inside numpy's loader
        raise ReplyError(f"{name}: payload cannot be decoded ({err})") from None
    declared = np.dtype(array.dtype)
    if values.dtype != declared or tuple(values.shape) != tuple(array.shape):
        raise ReplyError(
            f"{name}: payload is {values.dtype.str} {values.shape}, not the declared "
            f"{declared.str} {tuple(array.shape)}"
        )
    return values


@dataclass
class Codec:
    """A wire format for one reply's encoding.

    Subclasses set ``name``, ``lossless``, ``suffixes`` (the extra arrays of a coded key) and
    implement :meth:`encode_key` / :meth:`decode_key`; keys in ``keep`` (count keys) and
    non-float tensors go as float32, as they are.
    """

    name: ClassVar[str] = "none"
    lossless: ClassVar[bool] = True
    suffixes: ClassVar[tuple[str, ...]] = ()

    def encode(
        self,
        state: AdapterState,
        keep: frozenset[str] = frozenset(),
        generator: torch.Generator | None = None,
    ) -> ArrayRecord:
        """The encoding as it travels (``generator`` drives stochastic rounding)."""
        arrays: dict[str, np.ndarray] = {}
        for key, value in state.items():
            value = value.detach().to("cpu", torch.float32)
            if key in keep:
                arrays[key] = value.numpy()
            else:
                arrays.update(self.encode_key(key, value, generator))
        return ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})

    def wire_keys(self, key: str, keep: frozenset[str]) -> set[str]:
        """The arrays a reply carries for ``key``."""
        return {key} if key in keep else {key, *(key + s for s in self.suffixes)}

    def decode(
        self,
        record: Mapping[str, Array],
        shapes: Mapping[str, tuple[int, ...]],
        keep: frozenset[str],
    ) -> dict[str, np.ndarray]:
        """float32 arrays of exactly ``shapes`` from a reply's arrays.

        Raises:
            ReplyError: a missing or unexpected array, a wrong dtype or shape, a bad scale or
                index; the message names the array.
        """
        expected = set().union(*(self.wire_keys(k, keep) for k in shapes)) if shapes else set()
        extra = sorted(set(record) - expected)
        if extra:
            raise ReplyError(f"unexpected key {extra[0]} ({len(extra)} unexpected)")
        missing = sorted(expected - set(record))
        if missing:
            raise ReplyError(f"missing key {missing[0]} ({len(missing)} missing)")
        out = {}
        for key, shape in shapes.items():
            if key in keep:
                value = _array(record, key, ("float32",))
                if tuple(value.shape) != shape:
                    raise ReplyError(f"{key}: shape {tuple(value.shape)}, expected {shape}")
            else:
                value = self.decode_key(key, record, shape)
            out[key] = value.astype(np.float32, copy=False)
        return out

    def encode_key(
        self, key: str, value: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, np.ndarray]:
        return {key: value.numpy()}

    def decode_key(
        self, key: str, record: Mapping[str, Array], shape: tuple[int, ...]
    ) -> np.ndarray:
        value = _array(record, key, ("float32",))
        if tuple(value.shape) != shape:
            raise ReplyError(f"{key}: shape {tuple(value.shape)}, expected {shape}")
        return value


class StripCodec(Codec):
    """float32 at the client's own rank (trailing zero rank slots cut; the server pads)."""

    name = "strip"

    def encode_key(
        self, key: str, value: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, np.ndarray]:
        return {key: strip(key, value).contiguous().numpy()}

    def decode_key(
        self, key: str, record: Mapping[str, Array], shape: tuple[int, ...]
    ) -> np.ndarray:
        return unstrip(key, _array(record, key, ("float32",)), shape)


FP16_MAX = float(np.finfo(np.float16).max)


class Fp16Codec(Codec):
    """Strip, then float16 (a tensor with a value beyond float16's range stays float32)."""

    name = "fp16"
    lossless = False

    def encode_key(
        self, key: str, value: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, np.ndarray]:
        value = strip(key, value).contiguous()
        fits = bool(value.abs().max() <= FP16_MAX) if value.numel() else True
        return {key: value.to(torch.float16).numpy() if fits else value.numpy()}

    def decode_key(
        self, key: str, record: Mapping[str, Array], shape: tuple[int, ...]
    ) -> np.ndarray:
        return unstrip(key, _array(record, key, ("float16", "float32")), shape)


def encode_view(state: AdapterState, downlink: str = "none") -> ArrayRecord:
    """The global state as it travels to clients (``wire.downlink``): float32 as it is, or
    ``fp16`` (each tensor within float16's range halved; the client widens it back)."""
    if downlink == "none":
        return to_record(state)
    arrays = {}
    for key, value in state.items():
        value = value.detach().to("cpu", torch.float32)
        fits = bool(value.abs().max() <= FP16_MAX) if value.numel() else True
        arrays[key] = Array(value.to(torch.float16).numpy() if fits else value.numpy())
    return ArrayRecord(array_dict=arrays)


def _scale_axis(key: str) -> int:
    """The axis one int8 scale spans: a B factor's columns (one scale per rank slot, over its
    output features), every other matrix's rows."""
    return 0 if is_b(key) else 1


class Int8Codec(Codec):
    """Strip, then int8 per rank slot (a row of A, a column of B; a row of any other matrix,
    all of a vector): q = stochastic_round(x / s), s = absmax / 127, so E[q s] = x."""

    name = "int8"
    lossless = False
    suffixes = (SCALE,)

    def encode_key(
        self, key: str, value: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, np.ndarray]:
        matrix = strip(key, value)
        matrix = matrix if matrix.ndim == 2 else matrix.reshape(1, -1)
        axis = _scale_axis(key)
        scale = matrix.abs().amax(dim=axis) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(axis)
        scaled = matrix / safe
        low = scaled.floor()
        up = torch.rand(scaled.shape, generator=generator) < (scaled - low)  # E[q] = scaled
        q = (low + up.to(low.dtype)).clamp(-127, 127).to(torch.int8)
        return {key: q.contiguous().numpy(), key + SCALE: scale.contiguous().numpy()}

    def decode_key(
        self, key: str, record: Mapping[str, Array], shape: tuple[int, ...]
    ) -> np.ndarray:
        q = _array(record, key, ("int8",))
        scale = _array(record, key + SCALE, ("float32",))
        axis = _scale_axis(key)
        flat = len(shape) != 2
        if q.ndim != 2 or (flat and q.shape != (1, math.prod(shape))):
            raise ReplyError(f"{key}: int8 values of shape {q.shape} cannot make {shape}")
        if scale.shape != (q.shape[1 - axis],):
            raise ReplyError(
                f"{key}{SCALE}: {scale.shape} scales for int8 values {q.shape}, expected one "
                f"per {'column' if axis == 0 else 'row'}"
            )
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise ReplyError(f"{key}{SCALE}: scales must be finite and >= 0")
        if (q == -128).any():
            raise ReplyError(f"{key}: int8 value -128 is outside the codec's [-127, 127]")
        value: np.ndarray = q.astype(np.float32) * np.expand_dims(scale, axis)
        return value.reshape(shape) if flat else unstrip(key, value, shape)


def _slots(key: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` (stripped) as rows that each get one scale: A's rank slots as they are, B's
    transposed (a slot is a column), any other matrix by row, a vector or a single column as
    one row."""
    if is_b(key):
        return value.t()
    if value.ndim == 2 and value.shape[1] > 1:
        return value
    return value.reshape(1, -1)


def _unslots(key: str, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`_slots` into ``shape`` (rank slots padded back)."""
    if is_b(key):
        return unstrip(key, np.ascontiguousarray(rows.T), shape)
    if len(shape) == 2 and shape[1] > 1:
        return unstrip(key, rows, shape)
    return rows.reshape(shape)


class TernaryCodec(Codec):
    """Strip, then each rank slot (a row of A, a column of B; a row of any other matrix, all of
    a vector) as s·q with q in {-1, 0, 1}: s = the slot's absmax, q = +-1 with probability
    |x|/s, so E[s q] = x (TernGrad: Wen et al., NeurIPS 2017). Four values per byte (q + 1 in
    two bits), one float32 scale per slot."""

    name = "ternary"
    lossless = False
    suffixes = (SCALE,)

    def encode_key(
        self, key: str, value: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, np.ndarray]:
        rows = _slots(key, strip(key, value))
        scale = rows.abs().amax(dim=1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        keep = torch.rand(rows.shape, generator=generator) < rows.abs() / safe
        codes = (torch.sign(rows) * keep + 1).to(torch.uint8).numpy()  # 0, 1, 2
        width = -(-codes.shape[1] // 4)
        padded = np.ones((codes.shape[0], width * 4), dtype=np.uint8)  # pad with code 1 (zero)
        padded[:, : codes.shape[1]] = codes
        quads = padded.reshape(codes.shape[0], width, 4)
        packed = quads[..., 0] | quads[..., 1] << 2 | quads[..., 2] << 4 | quads[..., 3] << 6
        return {key: packed.astype(np.uint8), key + SCALE: scale.contiguous().numpy()}

    def decode_key(
        self, key: str, record: Mapping[str, Array], shape: tuple[int, ...]
    ) -> np.ndarray:
        packed = _array(record, key, ("uint8",))
        scale = _array(record, key + SCALE, ("float32",))
        full = _slots(key, torch.zeros(shape)).shape
        slots = packed.shape[0] if packed.ndim == 2 else -1
        if packed.ndim != 2 or packed.shape[1] != -(-full[1] // 4) or not 1 <= slots <= full[0]:
            raise ReplyError(
                f"{key}: packed ternary values of shape {packed.shape} cannot make {shape}"
            )
        if scale.shape != (slots,):
            raise ReplyError(f"{key}{SCALE}: {scale.shape} scales for {slots} slots")
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise ReplyError(f"{key}{SCALE}: scales must be finite and >= 0")
        codes = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-1)
        codes = codes.reshape(slots, -1)[:, : full[1]]
        if (codes == 3).any():
            raise ReplyError(f"{key}: code 3 is outside the ternary codec's {{0, 1, 2}}")
        rows = (codes.astype(np.float32) - 1.0) * scale[:, None]
        return _unslots(key, rows, shape)


@dataclass
class TopkCodec(Codec):
    """The ``fraction`` largest magnitudes of each tensor: int32 flat indices (increasing) and
    float16 values; the rest is the caller's to keep (:func:`encode_update`)."""

    name = "topk"
    lossless = False
    suffixes = (INDEX,)
    fraction: float = 0.05

    def count(self, numel: int) -> int:
        return max(1, math.ceil(self.fraction * numel))

    def encode_key(
        self, key: str, value: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, np.ndarray]:
        flat = value.reshape(-1)
        index = flat.abs().topk(min(self.count(flat.numel()), flat.numel())).indices.sort().values
        values = flat[index]
        if bool(values.abs().max() > FP16_MAX):
            values = values.clamp(-FP16_MAX, FP16_MAX)  # the excess stays in the residual
        return {
            key: values.to(torch.float16).numpy(),
            key + INDEX: index.to(torch.int32).numpy(),
        }

    def decode_key(
        self, key: str, record: Mapping[str, Array], shape: tuple[int, ...]
    ) -> np.ndarray:
        values = _array(record, key, ("float16",))
        index = _array(record, key + INDEX, ("int32",))
        numel = math.prod(shape)
        if values.ndim != 1 or index.shape != values.shape or values.size > numel:
            raise ReplyError(
                f"{key}{INDEX}: {index.shape} indices for {values.shape} values of a {shape} tensor"
            )
        if index.size and (index.min() < 0 or index.max() >= numel):
            raise ReplyError(f"{key}{INDEX}: an index is outside 0..{numel - 1}")
        if index.size > 1 and not (np.diff(index) > 0).all():
            raise ReplyError(f"{key}{INDEX}: indices must be strictly increasing")
        dense = np.zeros(numel, dtype=np.float32)
        dense[index] = values.astype(np.float32)
        return np.asarray(dense.reshape(shape))


CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (Codec, StripCodec, Fp16Codec, Int8Codec, TernaryCodec, TopkCodec)
}
"""``wire.codec`` -> its codec class."""


def build(name: str, topk_fraction: float = 0.05) -> Codec:
    """The codec ``wire.codec`` names."""
    if name == TopkCodec.name:
        return TopkCodec(fraction=topk_fraction)
    return CODECS[name]()


class Feedback:
    """A client's error-feedback memory for ``topk``: what earlier rounds left unsent, per
    encoding key, divided by that round's weight (so a client whose example count changes adds
    back the update it owes, not an old weight's multiple). Kept in a safetensors file beside the
    client's other state, so it survives restarts."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self, shapes: Mapping[str, tuple[int, ...]]) -> AdapterState:
        """The saved residual where its keys and shapes still match (else nothing)."""
        if self.path is None or not self.path.is_file():
            return {}
        saved = load_file(str(self.path))
        return {k: v for k, v in saved.items() if k in shapes and tuple(v.shape) == shapes[k]}

    def save(self, residual: AdapterState) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in residual.items()}, str(tmp))
        tmp.replace(self.path)


def encode_update(
    codec: Codec,
    encoded: AdapterState,
    keep: frozenset[str],
    weight: float,
    seed: int,
    feedback: Path | None = None,
) -> ArrayRecord:
    """A client's reply arrays: ``encoded`` through ``codec``, stochastic rounding seeded by
    ``seed`` (a run is reproducible). With ``topk`` the residual remembered in ``feedback`` (a
    file; None: no memory) is added first (times ``weight``), and what the server will not
    decode is remembered for the next round."""
    generator = torch.Generator().manual_seed(seed)
    if not isinstance(codec, TopkCodec):
        return codec.encode(encoded, keep, generator)
    memory = Feedback(feedback)
    shapes = {k: tuple(v.shape) for k, v in encoded.items()}
    owed = memory.load(shapes)
    total = {k: v + owed[k] * weight if k in owed else v for k, v in encoded.items()}
    record = codec.encode(total, keep, generator)
    sent = codec.decode(dict(record.items()), shapes, keep)  # exactly what the server will see
    memory.save(
        {k: (v - torch.from_numpy(sent[k])) / weight for k, v in total.items() if k not in keep}
    )
    return record


def feedback_path(state_path: Path) -> Path:
    """Where a client keeps its ``topk`` residual: beside its other state."""
    return state_path.with_name(f"{state_path.stem}-topk-feedback.safetensors")
