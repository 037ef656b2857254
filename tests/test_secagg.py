"""Secure aggregation (SecAgg+): the sum is right, dropouts are survived, the server sees only
masked vectors, bad shares are named; then through the real ClientApp and Flower's engines."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import ConfigRecord, Message
from flwr.common.serde import config_record_from_proto, config_record_to_proto

import strategies
from fedllama import cli
from fedllama import config as config_lib
from fedllama.config import ConfigError, SecAggConfig
from fedllama.merge import SumAccumulator, frozen_key
from fedllama.model import adapters
from fedllama.privacy import secagg
from fedllama.privacy.secagg import (
    Params,
    Quantizer,
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggServer,
    aggregate_locally,
)
from fedllama.privacy.secagg.client import BadShares
from fedllama.privacy.secagg.params import from_wire
from fedllama.server import checkpoint
from fedllama.server.loop import RoundFailed
from fedllama.wire.layout import Layout
from fedllama.wire.records import ARRAYS, from_record
from server.app import check
from tests.harness import (
    REPO,
    TINY_YAML,
    Deployment,
    InProcessGrid,
    metrics_rows,
    seed_home_cache,
    tiny_config,
    write_jsonl,
)
from tests.harness import run as _run

ON = SecAggConfig(enabled=True)
STEP = Quantizer(ON.clip_range, ON.quantization_bits).step  # 1e6 / (2^47 - 1) ≈ 7.1e-9


def _vectors(n: int, length: int = 4000, seed: int = 0) -> dict[int, np.ndarray]:
    """Encodings-like vectors: weighted deltas (|x| up to ~100) and a few example counts."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        v = rng.standard_normal(length) * rng.uniform(0.01, 30.0)
        v[:3] = rng.integers(1, 600, 3)  # weights, as WEIGHT_KEY / slot masks carry
        out[100 + i] = v.astype(np.float32)
    return out


def _plain(vectors: dict[int, np.ndarray], nodes: set[int]) -> np.ndarray:
    return np.sum([vectors[n].astype(np.float64) for n in sorted(nodes)], axis=0)


# --------------------------------------------------------------------------------------------
# The secure sum


@pytest.mark.parametrize("n", [2, 3, 5, 12, 30])
def test_secure_sum_equals_plain_sum_within_quantization_error(n: int) -> None:
    vectors = _vectors(n)

    out = aggregate_locally(vectors, ON, rng=random.Random(n))

    err = np.abs(out.total - _plain(vectors, set(vectors)))
    assert err.max() <= n * STEP, "each client's stochastic rounding errs by under one step"
    assert err.max() > 0, "values are quantized, not sent as they are"


def test_quantizer_clips_counts_and_rounds_without_bias() -> None:
    q = Quantizer(clip_range=10.0, bits=16)  # step 10 / 32767
    x = np.array([25.0, -30.0, 10.0, 0.0], dtype=np.float32)

    values, clipped = q.quantize(x)

    assert clipped == 2, "25 and -30 lie outside ±10; 10 itself is not clipped"
    assert q.dequantize(values).tolist() == [10.0, -10.0, 10.0, 0.0]
    third = np.full(200_000, q.step / 3, dtype=np.float32)  # a third of a step
    mean = q.dequantize(q.quantize(third)[0]).mean()
    assert abs(mean - q.step / 3) < 0.01 * q.step, "stochastic rounding is unbiased"


def test_sum_of_negatives_wraps_mod_2_64_and_comes_back_signed() -> None:
    vectors = {1: np.full(8, -3.5, np.float32), 2: np.full(8, -1.25, np.float32)}

    out = aggregate_locally(vectors, ON)

    np.testing.assert_allclose(out.total, -4.75, atol=2 * STEP)


def test_a_32_bit_modulus_sums_signed_values_and_travels_in_half_the_bytes() -> None:
    # 24-bit values, 32-bit sums: up to (2^31 - 1) // (2^23 - 1) = 256 clients; C = 1000
    narrow = SecAggConfig(enabled=True, clip_range=1000.0, quantization_bits=24, modulus_bits=32)
    step = Quantizer(1000.0, 24, 32).step
    vectors = _vectors(12, length=2000)
    for v in vectors.values():
        v[3:6] = -900.0  # sums far below zero: they must wrap and come back signed

    out = aggregate_locally(vectors, narrow, rng=random.Random(5))
    wide = aggregate_locally(vectors, ON, rng=random.Random(5))

    err = np.abs(out.total - _plain(vectors, set(vectors)))
    assert err.max() <= 12 * step and err.max() > 0
    assert out.total[3] == pytest.approx(-10_800.0, abs=12 * step)
    assert out.bytes_up["mask"] == wide.bytes_up["mask"] // 2 == 12 * 2000 * 4


def test_a_masked_vector_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(SecAggError, match=r"expected uint32 \(4,\) for a 32-bit modulus"):
        from_wire(np.zeros(4, np.uint64), 32, 4)
    with pytest.raises(SecAggError, match=r"expected uint64 \(4,\) for a 64-bit modulus"):
        from_wire(np.zeros(4, np.uint32), 64, 4)


def test_refuses_nan_in_an_encoding() -> None:
    with pytest.raises(SecAggError, match="NaN or Inf"):
        Quantizer(1.0, 32).quantize(np.array([0.0, np.nan], dtype=np.float32))


SUMMABLE = ["fedavg", "zero_pad", "rank_aware", "hetlora", "ffa_lora", "fedsa_lora", "rolora"]


@pytest.mark.parametrize("name", [*SUMMABLE, "flexlora"])
def test_every_summable_strategy_decodes_the_secure_sum_like_the_plain_one(name: str) -> None:
    # mixed ranks 2, 3, 4 (fedavg: all at 4), real encode/decode, random deltas
    cfg = config_lib.load(None, [f"strategy.name={name}", "lora.r=4"])
    merge = strategies.build(cfg)
    assert merge.summable
    gen = torch.Generator().manual_seed(0)
    keys = [f"base_model.model.layers.{i}.q_proj.lora_{f}.weight" for i in (0, 1) for f in "AB"]
    global_state = {k: torch.randn((4, 6) if "_A" in k else (5, 4), generator=gen) for k in keys}
    ranks = [4, 4, 4] if name == "fedavg" else [2, 3, 4]
    unsent = merge.frozen(1) | merge.local
    encodings = []
    for i, rank in enumerate(ranks):
        view = merge.client_view(global_state, rank)
        delta = {
            k: 0.01 * torch.randn(v.shape, generator=gen)
            for k, v in view.items()
            if not frozen_key(k, unsent)
        }
        encodings.append(merge.encode(delta, float(40 + 25 * i), view))
    acc = SumAccumulator()
    for e in encodings:
        acc.add(e)
    layout = Layout.of({k: tuple(v.shape) for k, v in encodings[0].items()})
    vectors = {
        100 + i: layout.flatten({k: v.numpy() for k, v in e.items()})
        for i, e in enumerate(encodings)
    }

    secure = merge.decode(layout.unflatten(aggregate_locally(vectors, ON).total), global_state)

    plain = merge.decode(acc.total, global_state)
    assert set(secure) == set(plain)
    for key in plain:
        torch.testing.assert_close(secure[key], plain[key], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Dropouts


@pytest.mark.parametrize(
    ("stage", "counted"),
    [("setup", False), ("share", False), ("mask", False), ("unmask", True)],
)
def test_a_dropout_at_each_stage_is_left_out_or_unmasked(stage: str, counted: bool) -> None:
    vectors = _vectors(6)
    dropper = 103

    out = aggregate_locally(vectors, ON, drop={dropper: stage}, rng=random.Random(1))

    expected = set(vectors) if counted else set(vectors) - {dropper}
    np.testing.assert_allclose(out.total, _plain(vectors, expected), rtol=0, atol=6 * STEP)
    assert out.server.dropped[stage] == [dropper]
    if stage == "mask":  # shared its keys, never sent a vector: its pairwise masks are removed
        assert out.server.rebuilt["key"] == {dropper}
    else:
        assert out.server.rebuilt["key"] == set()
    assert out.server.rebuilt["seed"] == expected


def test_dropouts_at_every_stage_in_one_round_of_twenty() -> None:
    vectors = _vectors(20, length=500)
    # at most k + 1 - t = 4 dropouts in any neighbourhood, wherever the ring puts them
    drop = {101: "setup", 102: "share", 103: "mask", 104: "unmask"}

    out = aggregate_locally(vectors, ON, drop=drop, rng=random.Random(2))

    counted = set(vectors) - {101, 102, 103}
    np.testing.assert_allclose(out.total, _plain(vectors, counted), rtol=0, atol=20 * STEP)
    assert out.server.k == 10 and out.server.threshold == 7  # 2·⌈log2 20⌉; ⌈0.6·11⌉


def test_fewer_than_t_survivors_abort_the_round_with_the_counts() -> None:
    vectors = _vectors(5)  # k = 4, t = 3
    drop = {100: "mask", 101: "mask", 102: "mask"}

    with pytest.raises(SecAggAbort, match="2 masked vectors arrived, fewer than the threshold t=3"):
        aggregate_locally(vectors, ON, drop=drop)


def test_too_few_share_holders_after_unmask_dropouts_abort_naming_the_node() -> None:
    vectors = _vectors(3)  # complete graph, t = 2 of 3 shares
    drop = {100: "unmask", 101: "unmask"}

    with pytest.raises(SecAggAbort, match=r"node 10\d's self-mask seed: 1 shares arrived"):
        aggregate_locally(vectors, ON, drop=drop)


# --------------------------------------------------------------------------------------------
# What the server sees


def test_server_view_is_masked_uniform_noise_unrelated_to_each_input() -> None:
    vectors = _vectors(5, length=20_000)

    out = aggregate_locally(vectors, ON, rng=random.Random(3))

    quant = Quantizer(ON.clip_range, ON.quantization_bits)
    for node, masked in out.masked.items():
        plain_q = np.round(vectors[node].astype(np.float64) * quant.scale).astype(np.int64)
        assert not np.any(masked.view(np.int64) == plain_q), f"node {node}: a value in the clear"
        unit = masked / 2.0**64  # uniform on [0, 1) if masked well
        assert abs(unit.mean() - 0.5) < 0.01 and abs(unit.std() - 12**-0.5) < 0.01
        assert abs(np.corrcoef(unit, vectors[node])[0, 1]) < 0.05
        top = np.bincount((masked >> np.uint64(60)).astype(np.int64), minlength=16)
        assert top.min() > 0.8 * len(masked) / 16, "the high bits are spread evenly too"
    partial = sum(out.masked[n] for n in (100, 101, 102))
    assert not np.allclose(quant.dequantize(partial), _plain(vectors, {100, 101, 102}), atol=1)


def test_server_never_rebuilds_both_secrets_of_one_node() -> None:
    vectors = _vectors(10, length=100)
    drop = {104: "mask", 107: "mask", 109: "unmask"}

    out = aggregate_locally(vectors, ON, drop=drop)

    seeds, keys = out.server.rebuilt["seed"], out.server.rebuilt["key"]
    assert keys == {104, 107} and seeds == set(vectors) - {104, 107}
    assert not seeds & keys


def _round_to_unmask(n: int = 4) -> tuple[SecAggServer, dict[int, SecAggClient]]:
    server = SecAggServer(list(range(1, n + 1)), ON, 1, length=10)
    clients = {}
    for node in server.setup_requests():
        clients[node], keys = SecAggClient.setup(node, server.params)
        server.add_keys(node, *keys)
    requests = server.share_requests()
    for node, keys in requests.items():
        server.add_shares(node, *clients[node].share(keys))
    for node, routed in server.mask_requests().items():
        clients[node].receive(routed)
        server.add_masked(node, clients[node].mask(np.zeros(10, np.float32))[0])
    return server, clients


def test_client_refuses_to_reveal_both_secrets_of_a_node() -> None:
    _, clients = _round_to_unmask()

    with pytest.raises(SecAggError, match="refusing to reveal both secrets of node 2"):
        clients[1].unmask(survivors=[1, 2, 3], dropped=[2])


def test_client_refuses_unmask_with_fewer_than_t_survivors() -> None:
    _, clients = _round_to_unmask()  # t = 3 of 4 shares

    with pytest.raises(SecAggError, match="only 2 survivors claimed, fewer than the threshold 3"):
        clients[1].unmask(survivors=[1, 2], dropped=[3, 4])


def test_client_answers_unmask_once_then_forgets_its_shares() -> None:
    _, clients = _round_to_unmask()
    clients[1].unmask(survivors=[1, 2, 3, 4], dropped=[])

    with pytest.raises(SecAggError, match="after the unmask stage"):
        clients[1].unmask(survivors=[1, 2, 3, 4], dropped=[])
    assert clients[1].seed_shares == {} and clients[1].key_shares == {}


def test_corrupted_share_ciphertext_is_refused_naming_its_sender() -> None:
    server = SecAggServer([1, 2, 3], ON, 1, length=4)
    clients = {}
    for node in server.setup_requests():
        clients[node], keys = SecAggClient.setup(node, server.params)
        server.add_keys(node, *keys)
    for node, keys in server.share_requests().items():
        server.add_shares(node, *clients[node].share(keys))
    routed = server.mask_requests()[3]
    routed[1] = routed[1][:40] + bytes([routed[1][40] ^ 1]) + routed[1][41:]

    with pytest.raises(
        BadShares, match="ciphertexts from nodes \\[1\\] do not authenticate"
    ) as err:
        clients[3].receive(routed)
    assert err.value.senders == [1]


def test_corrupted_unmask_share_is_named_and_the_sum_still_comes_out(caplog) -> None:
    server, clients = _round_to_unmask(5)  # t = 3; every seed has 5 holders
    asks = server.unmask_requests()
    for node, (survived, dropped) in asks.items():
        seeds, keys = clients[node].unmask(survived, dropped)
        if node == 2:
            share = seeds[4]
            seeds[4] = share[:10] + bytes([share[10] ^ 0xFF]) + share[11:]
        server.add_unmask(node, seeds, keys)

    with caplog.at_level("WARNING", logger="fedllama"):
        total = server.finish()

    assert "node(s) [2] sent a corrupted share of node 4's self-mask seed" in caplog.text
    np.testing.assert_allclose(total, 0.0, atol=5 * STEP)


def test_corrupted_share_without_spare_shares_fails_clearly() -> None:
    server, clients = _round_to_unmask(3)  # t = 2 of 3
    asks = server.unmask_requests()
    for node in (1, 2):  # node 3 never answers: every seed has exactly t = 2 shares
        seeds, keys = clients[node].unmask(*asks[node])
        if node == 1:
            seeds[3] = seeds[3][:-1] + bytes([seeds[3][-1] ^ 1])
        server.add_unmask(node, seeds, keys)

    with pytest.raises(SecAggAbort, match="node 3's self-mask seed: no 2 of the 2 shares"):
        server.finish()


def test_missing_share_is_reported_then_fails_the_round_below_t(caplog) -> None:
    server, clients = _round_to_unmask(3)
    asks = server.unmask_requests()
    for node in (1, 2):
        seeds, keys = clients[node].unmask(*asks[node])
        if node == 2:
            del seeds[1]
        with caplog.at_level("WARNING", logger="fedllama"):
            server.add_unmask(node, seeds, keys)

    assert "node 2 sent no share of node 1's self-mask seed" in caplog.text
    with pytest.raises(SecAggAbort, match="node 1's self-mask seed: 1 shares arrived"):
        server.finish()


def test_server_refuses_a_share_reply_that_skips_a_neighbour() -> None:
    server = SecAggServer([1, 2, 3], ON, 1, length=4)
    clients = {}
    for node in server.setup_requests():
        clients[node], keys = SecAggClient.setup(node, server.params)
        server.add_keys(node, *keys)
    ciphertexts, commitment = clients[1].share(server.share_requests()[1])
    del ciphertexts[2]

    with pytest.raises(SecAggError, match="expected one per neighbour"):
        server.add_shares(1, ciphertexts, commitment)


# --------------------------------------------------------------------------------------------
# Building blocks


@pytest.mark.parametrize(
    ("n", "k"), [(2, 1), (3, 2), (5, 4), (10, 8), (20, 10), (50, 12), (1000, 20)]
)
def test_neighbour_count_grows_with_log_n(n: int, k: int) -> None:
    assert secagg.neighbour_count(n) == k  # 2·⌈log2 N⌉, even, at most N - 1


def test_harary_graph_is_symmetric_with_k_neighbours_each() -> None:
    nodes = list(range(50))

    graph = secagg.harary_graph(nodes, 12, random.Random(0))

    assert all(len(graph[v]) == 12 and v not in graph[v] for v in nodes)
    assert all(v in graph[u] for v in nodes for u in graph[v])


@pytest.mark.parametrize(
    ("fraction", "shares", "t"),
    [(0.6, 5, 3), (0.6, 9, 6), (0.51, 2, 2), (0.6, 3, 2), (1.0, 13, 13)],
)
def test_threshold_is_the_ceiling_of_the_fraction_and_at_least_two(
    fraction: float, shares: int, t: int
) -> None:
    assert secagg.threshold_count(fraction, shares) == t  # 0.6·5 is 3.0000000000000004 in floats


def test_masks_are_one_aes_ctr_keystream_across_chunks() -> None:
    key = bytes(range(32))
    n = 2 * secagg.CHUNK + 5  # generated in three chunks

    stream = secagg.prg(key, n)

    zeros = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * n))
    assert np.array_equal(stream, np.frombuffer(zeros, "<u8"))
    assert not np.array_equal(secagg.prg(bytes(32), n), stream)


def test_client_state_survives_a_round_trip_through_flowers_config_record() -> None:
    server = SecAggServer([1, 2, 3], ON, 7, length=4)
    clients = {n: SecAggClient.setup(n, server.params) for n in (1, 2, 3)}
    for n, (_, keys) in clients.items():
        server.add_keys(n, *keys)
    client = clients[1][0]
    client.share(server.share_requests()[1])

    wire = config_record_from_proto(config_record_to_proto(ConfigRecord(client.to_record())))
    again = SecAggClient.from_record(wire)

    assert again == client
    assert again.params == Params(7, 2, 3, ON.clip_range, ON.quantization_bits)


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("secagg.threshold=0.5", r"secagg.threshold: must be in \(0.5, 1\], got 0.5"),
        ("secagg.quantization_bits=60", "secagg.quantization_bits: must be in 16..53"),
        ("secagg.clip_range=0", "secagg.clip_range: must be > 0"),
        ("secagg.num_neighbours=-2", "secagg.num_neighbours: must be >= 0"),
        ("simulation.num_clients=1", "secagg.enabled: needs at least 2 clients"),
        ("secagg.modulus_bits=48", "secagg.modulus_bits: must be 32 or 64"),
        (
            "secagg.modulus_bits=32",
            r"secagg.quantization_bits: is 48: a sum of 2 clients would "
            r"overflow secagg.modulus_bits=32; at most 31 bits",
        ),
    ],
)
def test_bad_secagg_settings_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_lib.load(TINY_YAML, ["secagg.enabled=true", override])


def test_too_many_clients_for_the_bits_are_refused() -> None:
    # (2^63 - 1) // (2^52 - 1) = 2048 clients at 53 bits
    with pytest.raises(ConfigError, match="64-bit sum holds at most 2048 clients"):
        config_lib.load(
            None,
            ["secagg.enabled=true", "secagg.quantization_bits=53", "simulation.num_clients=2049",
             "data.partition=iid"],
        )  # fmt: skip


def test_too_many_clients_for_a_32_bit_modulus_are_refused() -> None:
    # (2^31 - 1) // (2^23 - 1) = 256 clients at 24 bits
    with pytest.raises(ConfigError, match="32-bit sum holds at most 256 clients"):
        config_lib.load(
            None,
            ["secagg.enabled=true", "secagg.modulus_bits=32", "secagg.quantization_bits=24",
             "simulation.num_clients=257", "data.partition=iid"],
        )  # fmt: skip


def test_check_refuses_factored_flexlora_with_secagg_naming_it() -> None:
    cfg = config_lib.load(
        TINY_YAML,
        ["secagg.enabled=true", "strategy.name=flexlora", "strategy.flexlora_form=factored"],
    )

    with pytest.raises(ConfigError, match=r"strategy flexlora \(strategy.flexlora_form=factored"):
        check(cfg)


def test_check_refuses_every_trusted_server_strategy_and_accepts_summable_ones() -> None:
    refused, accepted = [], []
    for name in sorted(strategies.REGISTRY):
        cfg = config_lib.load(
            TINY_YAML,
            ["secagg.enabled=true", f"strategy.name={name}", "strategy.flexlora_form=factored"],
        )
        try:
            check(cfg)
            accepted.append(name)
        except ConfigError as err:
            assert f"secagg.enabled: strategy {name}" in str(err)
            assert "trusted-server rule" in str(err)
            refused.append(name)

    assert set(accepted) >= set(SUMMABLE)
    assert "flexlora" in refused
    for name in refused:
        assert not strategies.build(
            config_lib.load(None, [f"strategy.name={name}", "strategy.flexlora_form=factored"])
        ).summable


def test_fedllama_check_reports_the_refusal(capsys) -> None:
    code = cli.main(
        ["check", str(TINY_YAML), "secagg.enabled=true", "strategy.name=flexlora",
         "strategy.flexlora_form=factored"]
    )  # fmt: skip

    assert code == 2
    assert "trusted-server rule" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Through the real ClientApp (in-process grid, tiny model)

MIXED = ["server.rounds=1", "strategy.name=rank_aware", "lora.client_ranks=[2,3,4]"]


class Recorder:
    """A grid tamper hook that keeps every reply the server receives (optionally changing it)."""

    def __init__(self, change: Any = None) -> None:
        self.replies: list[tuple[int, Message]] = []
        self.change = change

    def __call__(self, pid: int, reply: Message) -> Message | None:
        if self.change is not None:
            reply = self.change(pid, reply)
        if reply is not None:
            self.replies.append((pid, reply))
        return reply


@pytest.fixture(scope="module")
def plain_and_secure(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One mixed-rank round of rank_aware, plain then secure, on the same clients and seeds."""
    out = {}
    for mode in ("plain", "secure"):
        run_dir = tmp_path_factory.mktemp(mode) / "run"
        rec = Recorder()
        cfg = tiny_config(cache_dir, run_dir, *MIXED, f"secagg.enabled={mode == 'secure'}")
        rows = _run(InProcessGrid(3, rec), cfg)
        out[mode] = {"rows": rows, "dir": run_dir, "replies": rec.replies}
    return out


def test_secure_round_gives_the_plain_rounds_adapter(plain_and_secure: dict[str, Any]) -> None:
    plain, _ = adapters.load_adapter(plain_and_secure["plain"]["dir"] / "round-001")
    secure, _ = adapters.load_adapter(plain_and_secure["secure"]["dir"] / "round-001")
    round0, _ = adapters.load_adapter(plain_and_secure["plain"]["dir"] / "round-000")

    assert any(not torch.equal(round0[k], plain[k]) for k in plain), "the round changed something"
    for key in plain:
        torch.testing.assert_close(secure[key], plain[key], rtol=0, atol=1e-6)


def test_secure_round_records_stages_bytes_and_drops(plain_and_secure: dict[str, Any]) -> None:
    row = plain_and_secure["secure"]["rows"][-1]

    assert row["clients_ok"] == 3 and row["clients_dropped"] == 0
    stages = row["secagg"]["stages"]
    assert list(stages) == ["setup", "share", "mask", "unmask"]
    assert all(s["sent"] == 3 and s["ok"] == 3 and s["dropped"] == 0 for s in stages.values())
    assert all(s["bytes_up"] > 0 and s["bytes_down"] > 0 for s in stages.values())
    _, reply = plain_and_secure["plain"]["replies"][0]
    size = sum(a.numpy().size for a in reply.content.array_records[ARRAYS].values())
    # one uint64 per encoded value (float32 sends 4 bytes), plus npy headers and metrics
    assert 3 * 8 * size < stages["mask"]["bytes_up"] < 3 * (8 * size + 1024)
    assert row["bytes_up"] == sum(s["bytes_up"] for s in stages.values())
    assert sorted(c["lora-rank"] for c in row["clients"]) == [2, 3, 4]
    assert all(c["secagg-clipped"] == 0 for c in row["clients"])


def test_a_32_bit_modulus_gives_the_plain_rounds_adapter_in_half_the_bytes(
    plain_and_secure: dict[str, Any], cache_dir: Path, tmp_path: Path
) -> None:
    narrow = ["secagg.modulus_bits=32", "secagg.quantization_bits=24", "secagg.clip_range=1000"]
    cfg = tiny_config(cache_dir, tmp_path / "run", *MIXED, "secagg.enabled=true", *narrow)

    rows = _run(InProcessGrid(3), cfg)

    plain, _ = adapters.load_adapter(plain_and_secure["plain"]["dir"] / "round-001")
    secure, _ = adapters.load_adapter(tmp_path / "run" / "round-001")
    for key in plain:  # steps of 1000 / (2^23 - 1) on sums weighted by example counts
        torch.testing.assert_close(secure[key], plain[key], rtol=0, atol=1e-4)
    wide = plain_and_secure["secure"]["rows"][-1]["secagg"]["stages"]["mask"]["bytes_up"]
    mask = rows[-1]["secagg"]["stages"]["mask"]["bytes_up"]
    assert 0.45 * wide < mask < 0.55 * wide, "a uint32 per value instead of a uint64"
    assert all(c["secagg-clipped"] == 0 for c in rows[-1]["clients"])


def _payloads(message: Message) -> list[bytes]:
    content = message.content
    out = [a.data for r in content.array_records.values() for a in r.values()]
    for rec in content.config_records.values():
        for value in rec.values():
            out += [
                v for v in (value if isinstance(value, list) else [value]) if isinstance(v, bytes)
            ]
    return out


def test_server_receives_no_clients_encoding(plain_and_secure: dict[str, Any]) -> None:
    encodings = {
        pid: from_record(reply.content.array_records[ARRAYS])
        for pid, reply in plain_and_secure["plain"]["replies"]
    }
    seen = [p for _, reply in plain_and_secure["secure"]["replies"] for p in _payloads(reply)]
    assert not any(
        ARRAYS in r.content.array_records for _, r in plain_and_secure["secure"]["replies"]
    )

    for pid, encoding in encodings.items():
        for key, tensor in encoding.items():
            values = tensor.reshape(-1).numpy()
            nonzero = values[values != 0]
            if nonzero.size < 4:
                continue
            window = nonzero[:4].tobytes()  # 16 bytes of this client's float32 encoding
            assert not any(window in payload for payload in seen), f"client {pid}: {key}"
            q = np.round(nonzero[:4].astype(np.float64) * Quantizer(ON.clip_range, 48).scale)
            assert not any(q.astype("<i8").tobytes() in p for p in seen), f"client {pid}: {key}"


def test_dropout_after_masking_is_unmasked_and_still_counted(
    cache_dir: Path, tmp_path: Path, plain_and_secure: dict[str, Any], caplog
) -> None:
    def vanish_at_unmask(pid: int, reply: Message) -> Message | None:
        return None if pid == 1 and reply.metadata.message_type.endswith("unmask") else reply

    cfg = tiny_config(
        cache_dir, tmp_path / "run", *MIXED, "secagg.enabled=true", "secagg.timeout_s=1"
    )
    with caplog.at_level("WARNING", logger="fedllama"):
        rows = _run(InProcessGrid(3, vanish_at_unmask), cfg)

    assert "secagg unmask: dropped node 101 (client 1): no reply" in caplog.text
    assert rows[-1]["clients_ok"] == 3 and rows[-1]["dropped"] == []  # its vector is summed
    assert rows[-1]["secagg"]["stages"]["unmask"]["dropped"] == 1
    plain, _ = adapters.load_adapter(plain_and_secure["plain"]["dir"] / "round-001")
    secure, _ = adapters.load_adapter(tmp_path / "run" / "round-001")
    for key in plain:
        torch.testing.assert_close(secure[key], plain[key], rtol=0, atol=1e-6)


def test_corrupted_share_drops_its_recipient_and_the_rest_aggregate(
    cache_dir: Path, tmp_path: Path, plain_and_secure: dict[str, Any], caplog
) -> None:
    def corrupt_share_for_node_102(pid: int, reply: Message) -> Message:
        if pid == 0 and reply.metadata.message_type.endswith("share"):
            rec = reply.content.config_records[secagg.SECAGG]
            dst, cts = list(rec["dst"]), list(rec["ciphertexts"])
            i = dst.index(102)
            cts[i] = cts[i][:50] + bytes([cts[i][50] ^ 1]) + cts[i][51:]
            rec["ciphertexts"] = cts
        return reply

    cfg = tiny_config(cache_dir, tmp_path / "run", *MIXED, "secagg.enabled=true")
    with caplog.at_level("WARNING", logger="fedllama"):
        rows = _run(InProcessGrid(3, corrupt_share_for_node_102), cfg)

    assert "secagg mask: dropped node 102: could not authenticate the shares of nodes [100]" in (
        caplog.text
    )
    assert rows[-1]["clients_ok"] == 2 and rows[-1]["secagg"]["unmasked_dropouts"] == 1
    (dropped,) = rows[-1]["dropped"]  # no client id yet: node 102 never sent a good reply
    assert dropped["node"] == 102 and dropped["stage"] == "mask" and "client-id" not in dropped
    # expected: the plain rule over clients 0 and 1 only, from their recorded plain encodings
    merge = strategies.build(tiny_config(cache_dir, tmp_path / "x", *MIXED))
    round0, _ = checkpoint.load_global(plain_and_secure["plain"]["dir"], 0)
    acc = SumAccumulator()
    for pid, reply in plain_and_secure["plain"]["replies"]:
        if pid in (0, 1):
            acc.add(from_record(reply.content.array_records[ARRAYS]))
    delta = merge.decode(acc.total, round0)
    secure, _ = checkpoint.load_global(tmp_path / "run", 1)
    for key in round0:
        torch.testing.assert_close(secure[key], round0[key] + delta[key], rtol=0, atol=1e-6)


def test_a_sender_that_corrupts_all_its_shares_is_named_and_the_retry_goes_on_without_it(
    cache_dir: Path, tmp_path: Path, caplog
) -> None:
    def corrupt_every_share_of_node_100(pid: int, reply: Message) -> Message:
        if pid == 0 and reply.metadata.message_type.endswith("share"):
            rec = reply.content.config_records[secagg.SECAGG]
            rec["ciphertexts"] = [
                ct[:50] + bytes([ct[50] ^ 1]) + ct[51:] for ct in rec["ciphertexts"]
            ]
        return reply

    cfg = tiny_config(cache_dir, tmp_path / "run", *MIXED, "secagg.enabled=true")
    with caplog.at_level("WARNING", logger="fedllama"):
        rows = _run(InProcessGrid(3, corrupt_every_share_of_node_100), cfg)

    assert "retrying without nodes [100]" in caplog.text  # not its two accusers
    assert rows[-1]["clients_ok"] == 2 and "skipped" not in rows[-1]
    assert sorted(c["node"] for c in rows[-1]["clients"]) == [101, 102]


def test_too_few_clients_left_skip_the_round_and_keep_the_adapter(
    cache_dir: Path, tmp_path: Path
) -> None:
    def two_vanish_at_setup(pid: int, reply: Message) -> Message | None:
        return None if pid in (1, 2) and reply.metadata.message_type.endswith("setup") else reply

    out = tmp_path / "run"
    cfg = tiny_config(cache_dir, out, *MIXED, "secagg.enabled=true", "secagg.timeout_s=1")

    rows = _run(InProcessGrid(3, two_vanish_at_setup), cfg)

    first, retry = rows[-1]["skipped"].split(" | ")
    assert "secure aggregation failed: 0 clients left after the share stage" in first
    assert (
        "retry 1:" in retry and "at least 2 clients in a round, got 1" in retry
    )  # 100 was only pruned
    round0, _ = checkpoint.load_global(out, 0)
    kept, _ = checkpoint.load_global(out, 1)
    assert all(torch.equal(kept[k], v) for k, v in round0.items())
    with pytest.raises(RoundFailed, match="0 clients left after the share stage"):
        stop = ("secagg.enabled=true", "secagg.timeout_s=1", "server.failed_round=stop")
        _run(
            InProcessGrid(3, two_vanish_at_setup),
            tiny_config(cache_dir, tmp_path / "s", *MIXED, *stop),
        )


# --------------------------------------------------------------------------------------------
# Flower's simulation engine and `flwr run`


@pytest.mark.slow
def test_simulate_with_secagg_and_mixed_ranks(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fedllama.cli", "simulate", str(TINY_YAML),
        f"model.cache_dir={cache_dir}", f"output.dir={out}", "strategy.name=hetlora",
        "lora.client_ranks=[2,3,4]", "secagg.enabled=true",
    ]  # fmt: skip

    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)

    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "secure aggregation over 3 clients" in log
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3]
    assert all(s["ok"] == 3 for r in rows[1:] for s in r["secagg"]["stages"].values())
    assert sorted(c["lora-rank"] for c in rows[-1]["clients"]) == [2, 3, 4]


@pytest.mark.slow
def test_flwr_run_with_secagg_keeps_client_secrets_across_messages(
    cache_dir: Path, tmp_path: Path
) -> None:
    from tests.harness import local_flwr_env, stop_processes_mentioning

    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "run"
    env = local_flwr_env(home)
    overrides = (
        f"model.cache_dir={cache_dir} output.dir={out} server.rounds=1 secagg.enabled=true "
        "strategy.name=zero_pad lora.client_ranks=[2,4]"
    )
    cmd = [
        "flwr", "run", ".",
        "--run-config", f'config="simulations/configs/tiny.yaml" overrides="{overrides}"',
        "--federation-config", "num-supernodes=3",
        "--stream",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        stop_processes_mentioning(str(home))

    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients_ok"] == 3
    assert rows[-1]["secagg"]["stages"]["unmask"]["ok"] == 3


@pytest.mark.slow
def test_secagg_over_tls_superlink_and_supernodes_with_a_process_per_message(
    deployment: Deployment,
) -> None:
    dep = deployment
    for who in ("coordinator", "hospital-a", "hospital-b"):
        seed_home_cache(dep, who)
    data_a = write_jsonl(dep.home("hospital-a") / "data" / "icd.jsonl", "ICD codes", 30)
    data_b = write_jsonl(dep.home("hospital-b") / "data" / "hpo.jsonl", "phenotypes", 50)
    out = dep.root / "coordinator" / "run"
    roster = dep.root / "roster.txt"  # the registered SuperNode keys, handed to everyone
    roster.write_bytes(
        b"".join(dep.creds.nodes[n].public_key.read_bytes() for n in ("hospital-a", "hospital-b"))
    )
    dep.start_superlink()
    dep.register("hospital-a", "hospital-b")
    dep.start_supernode("hospital-a", data_a, 2, "--secagg-roster", str(roster))
    dep.start_supernode("hospital-b", data_b, 4, "--secagg-roster", str(roster))

    run = dep.flwr_run(
        "model.cache_dir=~/.cache/fedllama model.quantization=none secagg.enabled=true",
        f"output.dir={out} server.rounds=1 strategy.name=rank_aware lora.r=4",
        f"secagg.roster={roster}",
        timeout=900,
    )

    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    row = metrics_rows(out)[-1]
    assert row["clients_ok"] == 2 and row["dropped"] == []  # both signed, both verified
    assert all(s["ok"] == 2 for s in row["secagg"]["stages"].values())
    for name in ("hospital-a", "hospital-b"):
        # one fresh ClientApp process per stage: the secrets crossed them in context.state
        assert dep.nodes[name].text().count("Start `flwr-clientapp` process") >= 4


def test_logging_is_quiet_for_a_clean_round(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fedllama"):
        aggregate_locally(_vectors(4, length=50), ON)

    assert caplog.text == ""
