"""Update codecs (wire.codec): round trips, bytes, error feedback, bad input, a real round."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedllama import config as config_lib
from fedllama.wire import codecs
from fedllama.wire.records import ARRAYS, METRICS, ReplyError, from_record, record_bytes
from fedllama.wire.validate import ReplySpec, validate_reply
from tests.harness import InProcessGrid, logged, tiny_config
from tests.harness import run as _run

A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"
M = "base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
COUNT = "count"
R, RANK, IN, OUT = 8, 3, 512, 384
KEEP = frozenset({COUNT})


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-3 client's encoding padded to rank 8 (as zero_pad and rank_aware send it)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(R, IN), torch.zeros(OUT, R)
    a[:RANK] = torch.randn(RANK, IN, generator=g)
    b[:, :RANK] = torch.randn(OUT, RANK, generator=g) * 1e-3
    m = torch.randn(OUT, generator=g)
    return {A: a, B: b, M: m, COUNT: torch.tensor([7.0, 7.0, 7.0, 0, 0, 0, 0, 0])}


SHAPES = {k: tuple(v.shape) for k, v in _state().items()}


def _decode(codec: codecs.Codec, record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(v) for k, v in codec.decode(dict(record.items()), SHAPES, KEEP).items()
    }


@pytest.mark.parametrize("name", ["none", "strip"])
def test_lossless_codecs_give_back_every_value(name: str) -> None:
    state = _state()
    codec = codecs.build(name)

    back = _decode(codec, codec.encode(state, KEEP))

    assert all(torch.equal(back[k], state[k]) for k in state)


def test_strip_sends_the_clients_own_rank_and_the_server_pads_it() -> None:
    state = _state()
    none = codecs.build("none").encode(state, KEEP)
    strip = codecs.build("strip").encode(state, KEEP)

    assert strip[A].shape == (RANK, IN) and strip[B].shape == (OUT, RANK)
    assert strip[M].shape == (OUT,) and strip[COUNT].shape == (R,), "rank-free keys as they are"
    factors = (R * IN + OUT * R) * 4
    saved = factors - (RANK * IN + OUT * RANK) * 4
    assert record_bytes(none) - record_bytes(strip) == saved


def test_fp16_halves_the_stripped_factors_within_half_precision() -> None:
    state = _state()
    codec = codecs.build("fp16")

    record = codec.encode(state, KEEP)
    back = _decode(codec, record)

    assert record[A].dtype == "float16" and record[COUNT].dtype == "float32"
    for key in (A, B, M):
        torch.testing.assert_close(back[key], state[key], rtol=1e-3, atol=1e-7)
    assert torch.equal(back[COUNT], state[COUNT]), "count keys travel exact"


def test_fp16_keeps_a_tensor_beyond_its_range_in_float32() -> None:
    state = _state()
    state[M] = state[M] * 1e6
    codec = codecs.build("fp16")

    record = codec.encode(state, KEEP)

    assert record[M].dtype == "float32" and record[A].dtype == "float16"
    assert torch.equal(_decode(codec, record)[M], state[M])


def test_int8_is_unbiased_and_within_one_step_of_each_value() -> None:
    state = _state()
    codec = codecs.build("int8")
    draws = [
        _decode(codec, codec.encode(state, KEEP, torch.Generator().manual_seed(s)))
        for s in range(400)
    ]

    for key, axis in ((A, 1), (B, 0), (M, 1)):  # one scale per rank slot (B: per column)
        rows = state[key] if state[key].ndim == 2 else state[key].reshape(1, -1)
        step = rows.abs().amax(dim=axis, keepdim=True) / 127
        for one in draws[:5]:
            err = (one[key].reshape(rows.shape) - rows).abs()
            assert bool((err <= step + 1e-7).all()), key
        mean = torch.stack([d[key] for d in draws]).mean(0).reshape(rows.shape)
        # the mean of 400 unbiased draws: within 5 standard errors (step / 2 / sqrt(400))
        assert bool(((mean - rows).abs() <= 5 * step / 2 / math.sqrt(400) + 1e-7).all()), key
    record = codec.encode(state, KEEP)
    assert record[A].dtype == "int8" and record[A].shape == (RANK, IN)
    assert record[A + codecs.SCALE].shape == (RANK,) and record[B + codecs.SCALE].shape == (RANK,)
    stripped = record_bytes(codecs.build("strip").encode(state, KEEP))
    assert record_bytes(record) < 0.33 * stripped  # a quarter, plus scales and headers


def test_ternary_is_unbiased_takes_one_of_three_values_a_slot_and_packs_four_a_byte() -> None:
    state = _state()
    codec = codecs.build("ternary")
    draws = [
        _decode(codec, codec.encode(state, KEEP, torch.Generator().manual_seed(s)))
        for s in range(400)
    ]

    for key, axis in ((A, 1), (B, 0), (M, 1)):  # one scale per rank slot (B: per column)
        rows = state[key] if state[key].ndim == 2 else state[key].reshape(1, -1)
        scale = rows.abs().amax(dim=axis, keepdim=True)
        for one in draws[:5]:  # each value is -s, 0 or s of its slot
            got = one[key].reshape(rows.shape)
            assert bool(((got == 0) | ((got.abs() - scale).abs() <= 1e-6 * scale)).all()), key
        mean = torch.stack([d[key] for d in draws]).mean(0).reshape(rows.shape)
        # 400 unbiased draws of a value with standard deviation <= s: within 5 standard errors
        assert bool(((mean - rows).abs() <= 5 * scale / math.sqrt(400) + 1e-7).all()), key
    record = codec.encode(state, KEEP)
    assert record[A].dtype == "uint8" and record[A].shape == (RANK, IN // 4)
    assert record[B].shape == (RANK, OUT // 4), "B packed by rank slot, along its outputs"
    assert record[M].shape == (1, OUT // 4) and record[COUNT].dtype == "float32"
    int8 = record_bytes(codecs.build("int8").encode(state, KEEP))
    assert record_bytes(record) < 0.5 * int8  # a quarter of int8's values; the same headers


def test_ternary_pads_a_slot_that_is_not_a_multiple_of_four_and_keeps_zero_slots() -> None:
    odd = {A: torch.tensor([[0.5, -1.0, 0.0, 0.25, 1.0], [0.0] * 5]), COUNT: torch.ones(1)}
    codec = codecs.build("ternary")

    record = codec.encode(odd, KEEP)
    back = codec.decode(dict(record.items()), {A: (2, 5), COUNT: (1,)}, KEEP)

    assert record[A].shape == (1, 2), "the zero slot is stripped, five values in two bytes"
    assert back[A].shape == (2, 5) and not back[A][1].any()
    assert set(np.abs(back[A][0]).tolist()) <= {0.0, 1.0} and back[A][0][1] == -1.0


def test_topk_sends_the_largest_entries_and_error_feedback_owes_the_rest(tmp_path: Path) -> None:
    codec = codecs.TopkCodec(fraction=0.1)
    memory = tmp_path / "state" / "client-3-topk-feedback.safetensors"
    weight = 7.0
    updates = [_state(seed) for seed in range(4)]
    sent_sum = {k: torch.zeros_like(v) for k, v in updates[0].items()}

    for update in updates:
        record = codecs.encode_update(codec, update, KEEP, weight, seed=0, feedback=memory)
        sent = _decode(codec, record)
        for k in sent:
            sent_sum[k] += sent[k]
        assert record[A].shape == (math.ceil(0.1 * R * IN),)
        assert record_bytes(record) < 0.2 * record_bytes(codecs.build("none").encode(update, KEEP))

    owed = codecs.Feedback(memory).load(SHAPES)  # a new object: read back from disk
    for key in (A, B, M):
        total = sum(u[key] for u in updates)
        torch.testing.assert_close(sent_sum[key] + owed[key] * weight, total, rtol=0, atol=1e-5)
        assert float(owed[key].abs().sum()) > 0, "something was left for later"
    assert COUNT not in owed and torch.equal(sent_sum[COUNT], 4 * updates[0][COUNT])


def test_topk_picks_by_magnitude() -> None:
    state = {A: torch.zeros(R, IN), COUNT: torch.ones(R)}
    state[A][2, 5], state[A][0, 0], state[A][7, 63] = -9.0, 4.0, 0.5
    codec = codecs.TopkCodec(fraction=2 / (R * IN))

    record = codec.encode(state, KEEP)

    assert list(record[A + codecs.INDEX].numpy()) == [0, 2 * IN + 5]
    assert list(record[A].numpy()) == [4.0, -9.0]


# ------------------------------------------------------------------------- bad input


def _content(arrays: dict[str, np.ndarray]) -> RecordDict:
    record = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
    metrics = MetricRecord({"num-examples": 7, "train-loss": 1.0})
    return RecordDict({ARRAYS: record, METRICS: metrics})


def _arrays(name: str) -> dict[str, np.ndarray]:
    codec = codecs.build(name, 0.1)
    return {k: a.numpy() for k, a in codec.encode(_state(), KEEP).items()}


def _spec(name: str) -> ReplySpec:
    return ReplySpec(shapes=SHAPES, codec=codecs.build(name, 0.1), keep=KEEP)


def _set(key: str, value: np.ndarray):  # type: ignore[no-untyped-def]
    return lambda a: a.__setitem__(key, value)


K = math.ceil(0.1 * R * IN)
"""Entries topk sends of A at wire.topk_fraction=0.1."""
BAD = [
    ("int8", lambda a: a.__setitem__(A, a[A].astype(np.float32)), f"{A}: dtype float32"),
    ("int8", _set(A + codecs.SCALE, np.full(RANK, np.nan, np.float32)), "scales must be finite"),
    ("int8", _set(A + codecs.SCALE, np.full(RANK, -1.0, np.float32)), "scales must be finite"),
    ("int8", _set(A + codecs.SCALE, np.ones(RANK + 1, np.float32)), "expected one per row"),
    ("int8", _set(B + codecs.SCALE, np.ones(OUT, np.float32)), "expected one per column"),
    ("int8", lambda a: a.pop(B + codecs.SCALE), f"missing key {B}{codecs.SCALE}"),
    ("int8", _set(A, np.full((RANK, IN), -128, np.int8)), "-128 is outside"),
    ("int8", _set(A + codecs.INDEX, np.zeros(1, np.int32)), "unexpected key"),
    ("ternary", _set(A, np.full((RANK, IN // 4), 0xFF, np.uint8)), "code 3 is outside"),
    ("ternary", _set(A, np.ones((RANK, IN // 4 + 1), np.uint8)), "cannot make"),
    ("ternary", _set(A, np.ones((R + 1, IN // 4), np.uint8)), "cannot make"),
    ("ternary", _set(A, np.ones((RANK, IN), np.int8)), "dtype int8, expected uint8"),
    ("ternary", _set(B + codecs.SCALE, np.ones(RANK + 1, np.float32)), "scales for"),
    ("ternary", _set(A + codecs.SCALE, np.full(RANK, np.inf, np.float32)), "must be finite"),
    ("topk", _set(A + codecs.INDEX, np.full(K, R * IN, np.int32)), f"outside 0..{R * IN - 1}"),
    ("topk", _set(A + codecs.INDEX, np.arange(K, dtype=np.int32)[::-1].copy()), "increasing"),
    ("topk", _set(A + codecs.INDEX, np.zeros(K, np.int32)), "increasing"),
    ("topk", _set(A + codecs.INDEX, np.arange(K - 1, dtype=np.int32)), "indices for"),
    ("topk", _set(A, np.ones(K, np.float32)), "dtype float32, expected float16"),
    ("topk", _set(A, np.full(K, np.inf, np.float16)), "contains NaN or Inf"),
    ("strip", _set(A, np.ones((R + 1, IN), np.float32)), "or its rank cut"),
    ("strip", _set(A, np.ones((RANK, IN - 1), np.float32)), "or its rank cut"),
    ("strip", _set(M, np.ones(OUT - 1, np.float32)), f"{M}: shape ({OUT - 1},)"),
    ("fp16", _set(COUNT, np.ones(R, np.float16)), f"{COUNT}: dtype float16"),
    ("none", _set(A, np.ones((RANK, IN), np.float32)), f"expected ({R}, {IN})"),
]


@pytest.mark.parametrize(("name", "mutate", "reason"), BAD)
def test_a_reply_that_does_not_match_the_codec_is_refused_with_the_reason(
    name: str, mutate, reason: str
) -> None:
    arrays = _arrays(name)
    validate_reply(_content(arrays), _spec(name))  # the unchanged reply passes
    mutate(arrays)

    with pytest.raises(ReplyError) as err:
        validate_reply(_content(arrays), _spec(name))

    assert reason in str(err.value)


def test_codecs_are_refused_with_secure_aggregation_and_lossy_ones_with_dp() -> None:
    with pytest.raises(config_lib.ConfigError, match="cannot be summed under masks"):
        config_lib.load(
            None, ["wire.codec=strip", "secagg.enabled=true", "simulation.num_clients=4"]
        )
    dp = ["dp.enabled=true", "dp.noise_multiplier=1.0", "simulation.num_clients=4"]
    with pytest.raises(config_lib.ConfigError, match="lift an update above dp.clip_norm"):
        config_lib.load(None, ["wire.codec=int8", *dp])
    assert config_lib.load(None, ["wire.codec=strip", *dp]).wire.codec == "strip"


# ------------------------------------------------------------------------- a real round

MIXED = ["server.rounds=1", "strategy.name=rank_aware", "lora.client_ranks=[1,2,4]"]


def _corrupt_scale(pid: int, reply: Message) -> Message:
    if pid == 1:
        arrays = reply.content.array_records[ARRAYS]
        key = next(k for k in arrays if k.endswith(codecs.SCALE))
        scales = arrays[key].numpy().copy()
        scales[0] = np.inf
        arrays[key] = Array(scales)
    return reply


def test_a_round_with_int8_sends_fewer_bytes_and_drops_a_corrupt_reply_by_name(
    cache_dir: Path, tmp_path: Path
) -> None:
    plain = _run(InProcessGrid(3), tiny_config(cache_dir, tmp_path / "none", *MIXED))
    stripped = _run(
        InProcessGrid(3), tiny_config(cache_dir, tmp_path / "strip", *MIXED, "wire.codec=strip")
    )
    with logged() as warnings:
        coded = _run(
            InProcessGrid(3, tamper=_corrupt_scale),
            tiny_config(cache_dir, tmp_path / "int8", *MIXED, "wire.codec=int8"),
        )

    assert plain[1]["clients_ok"] == 3 and stripped[1]["clients_ok"] == 3
    # ranks 1, 2, 4 of 4: strip saves the padding, exactly; int8 a further ~4x
    assert stripped[1]["bytes_up"] < 0.75 * plain[1]["bytes_up"]
    assert stripped[1]["eval_loss"] == pytest.approx(plain[1]["eval_loss"], rel=1e-6)
    assert coded[1]["clients_ok"] == 2 and coded[1]["clients_dropped"] == 1
    assert coded[1]["dropped"][0]["client-id"] == 1
    assert "scales must be finite" in coded[1]["dropped"][0]["reason"]
    assert any("(client 1)" in w and "scales must be finite" in w for w in warnings)
    # the tiny model's factors are small (64 x rank): each array's 128-byte header weighs
    assert coded[1]["bytes_up"] / 2 < 0.8 * stripped[1]["bytes_up"] / 3


def test_a_round_with_ternary_mixed_ranks_merges_and_sends_fewer_bytes_than_int8(
    cache_dir: Path, tmp_path: Path
) -> None:
    rows = {
        name: _run(
            InProcessGrid(3), tiny_config(cache_dir, tmp_path / name, *MIXED, f"wire.codec={name}")
        )
        for name in ("int8", "ternary")
    }

    int8, ternary = rows["int8"][1], rows["ternary"][1]
    assert ternary["clients_ok"] == 3 and math.isfinite(ternary["eval_loss"])
    assert ternary["eval_loss"] != rows["ternary"][0]["eval_loss"], "the merged update moved it"
    assert ternary["bytes_up"] < int8["bytes_up"]


def test_a_float16_view_stays_float32_where_it_would_overflow() -> None:
    state = {"small": torch.tensor([1e-3, -2.5]), "huge": torch.tensor([1e6, 0.0])}

    record = codecs.encode_view(state, "fp16")

    assert (record["small"].dtype, record["huge"].dtype) == ("float16", "float32")
    assert from_record(record)["huge"].tolist() == [1e6, 0.0]
    assert from_record(record)["small"].dtype == torch.float32
    assert torch.equal(from_record(codecs.encode_view(state))["small"], state["small"])


def test_a_float16_downlink_halves_the_bytes_down_and_trains_as_float32_does(
    cache_dir: Path, tmp_path: Path
) -> None:
    two = ("server.rounds=2", "output.plot=false")
    wide = _run(InProcessGrid(3), tiny_config(cache_dir, tmp_path / "f32", *two))
    half = _run(
        InProcessGrid(3), tiny_config(cache_dir, tmp_path / "f16", *two, "wire.downlink=fp16")
    )

    # round 2 starts from a trained global: float16 rounds it, each array's header stays
    assert 0.45 < half[2]["bytes_down"] / wide[2]["bytes_down"] < 0.6
    assert half[2]["bytes_up"] == wide[2]["bytes_up"]
    # the clients trained from the rounded view: their first steps' loss shows it (the server's
    # eval of the float32 global after their deltas can round to the same float32 loss)
    assert half[2]["train_loss"] != wide[2]["train_loss"], "the clients got the rounded view"
    assert half[2]["eval_loss"] == pytest.approx(wide[2]["eval_loss"], rel=1e-3)
