"""Robustness: a poisoned round never becomes the global adapter, and the run goes on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedllama import config as config_lib
from fedllama.config import ConfigError
from fedllama.merge import WEIGHT_KEY
from fedllama.model import adapters
from fedllama.server.loop import rejection
from fedllama.wire.records import ARRAYS, METRICS, from_record, to_record
from tests.harness import TINY_YAML, InProcessGrid, logged, run, tiny_config


def test_a_poisoned_round_is_rejected_the_previous_adapter_kept_and_the_run_goes_on(
    cache_dir: Path, tmp_path: Path
) -> None:
    poisoned: list[int] = []

    def poison_once(pid: int, reply: Message) -> Message:
        if pid == 0 and not poisoned and ARRAYS in reply.content.array_records:
            sent = from_record(reply.content.array_records[ARRAYS])
            scaled = {k: v if k == WEIGHT_KEY else v * 1e30 for k, v in sent.items()}  # finite
            reply.content.array_records[ARRAYS] = to_record(scaled)
            poisoned.append(pid)
        return reply

    out = tmp_path / "run"
    cfg = tiny_config(cache_dir, out, "server.rounds=2", "output.plot=false")
    rows = run(InProcessGrid(3, poison_once), cfg)

    assert poisoned == [0]
    assert "rejected" in rows[1] and "global adapter" in rows[1]["rejected"]
    assert rows[1]["eval_loss"] == rows[0]["eval_loss"]  # the kept adapter's loss
    kept, _ = adapters.load_adapter(out / "round-001")
    initial, _ = adapters.load_adapter(out / "round-000")
    for key in initial:
        torch.testing.assert_close(kept[key], initial[key], rtol=0, atol=0)
    assert "rejected" not in rows[2] and math.isfinite(rows[2]["eval_loss"])
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]  # round 2 trained from the kept adapter


def _run(factor: float, last: float, evaluate: bool = True) -> SimpleNamespace:
    server = SimpleNamespace(reject_loss_factor=factor, evaluate=evaluate)
    return SimpleNamespace(cfg=SimpleNamespace(server=server), last_eval=last)


def test_the_guard_rejects_non_finite_adapters_and_losses_and_a_jump_over_the_factor() -> None:
    good = {"a": torch.ones(2)}

    assert rejection(_run(0, 2.0), good, 50.0) is None  # no factor: any finite loss
    assert rejection(_run(3, 2.0), good, 5.9) is None
    assert "over server.reject_loss_factor=3 times the last one (2.0000)" in str(
        rejection(_run(3, 2.0), good, 6.1)
    )
    assert "eval loss is nan" in str(rejection(_run(0, 2.0), good, math.nan))
    assert "NaN or Inf values in a" in str(
        rejection(_run(0, 2.0, evaluate=False), {"a": torch.tensor([1.0, math.inf])}, math.nan)
    )
    assert rejection(_run(3, 2.0, evaluate=False), good, math.nan) is None


def test_a_factor_of_one_or_less_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"server.reject_loss_factor: must be 0 \(off\) or > 1"):
        config_lib.load(TINY_YAML, ["server.reject_loss_factor=0.5"])


# --------------------------------------------------------------------------- a durable run


class Crash(RuntimeError):
    """Stands for the process dying at a write point."""


def _crash_on_call(target: object, name: str, call: int, monkeypatch) -> None:
    """Make ``target.name`` raise :class:`Crash` on its ``call``-th call (1-based)."""
    real = getattr(target, name)
    calls = [0]

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == call:
            raise Crash(f"{name} call {call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def _outcome(out: Path) -> tuple[list[tuple[int, float]], dict[str, torch.Tensor]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights, _ = adapters.load_adapter(out / "round-002")
    return [(r["round"], r["eval_loss"]) for r in rows], weights


def _assert_same_run(out: Path, reference: tuple[list, dict]) -> None:
    """The run in ``out`` ended as the uninterrupted one did: the same rounds, eval losses and
    final adapter, to float summation order (threads may add in another order)."""
    rows, weights = _outcome(out)
    assert [r for r, _ in rows] == [r for r, _ in reference[0]]
    losses = [loss for _, loss in reference[0]]
    assert [loss for _, loss in rows] == pytest.approx(losses, rel=1e-5)
    for key, value in reference[1].items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(cache_dir: Path, tmp_path_factory) -> tuple[list, dict]:
    out = tmp_path_factory.mktemp("reference") / "run"
    run(InProcessGrid(3), tiny_config(cache_dir, out, "server.rounds=2", "output.plot=false"))
    return _outcome(out)


@pytest.mark.parametrize(
    ("where", "call"),
    [
        ("save_file", 3),  # inside round 1's directory, before it is renamed into place
        ("append_row", 2),  # round 1's directory is in place, metrics.jsonl not yet updated
        ("write_config", 1),  # never got past the config
    ],
)
def test_a_crash_at_any_write_point_resumes_to_the_uninterrupted_result(
    cache_dir: Path, tmp_path: Path, reference, monkeypatch, where: str, call: int
) -> None:
    from fedllama.server import checkpoint

    out = tmp_path / "run"
    cfg = tiny_config(cache_dir, out, "server.rounds=2", "output.plot=false")
    with monkeypatch.context() as patch:
        _crash_on_call(checkpoint, where, call, patch)
        with pytest.raises(Crash):
            run(InProcessGrid(3), cfg)

    run(InProcessGrid(3), cfg)  # resumes

    _assert_same_run(out, reference)


def test_a_damaged_last_round_is_set_aside_and_redone(
    cache_dir: Path, tmp_path: Path, reference
) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(cache_dir, out, "server.rounds=2", "output.plot=false")
    run(InProcessGrid(3), cfg)
    state = out / "round-002" / "server_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 3, "eval_lo')  # and a half-written line

    with logged() as lines:
        run(InProcessGrid(3), cfg)

    assert any("round-002 cannot be read back" in line for line in lines)
    assert (out / "round-002.damaged" / "server_state.safetensors").is_file()  # kept, not lost
    _assert_same_run(out, reference)


# --------------------------------------------------------------------------- declared weights


def _reweigh(factor: float, pid_to_change: int = 1):  # type: ignore[no-untyped-def]
    """A tamper hook that multiplies one client's encoded weight (not its declared count)."""

    def tamper(pid: int, reply: Message) -> Message:
        if pid == pid_to_change and ARRAYS in reply.content.array_records:
            sent = from_record(reply.content.array_records[ARRAYS])
            sent[WEIGHT_KEY] = sent[WEIGHT_KEY] * factor
            reply.content.array_records[ARRAYS] = to_record(sent)
        return reply

    return tamper


def test_an_encoded_weight_other_than_the_declared_count_is_dropped(
    cache_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(cache_dir, tmp_path / "run", "server.rounds=1", "output.plot=false")
    with logged() as lines:
        rows = run(InProcessGrid(3, _reweigh(1000.0)), cfg)

    assert rows[-1]["clients_ok"] == 2 and rows[-1]["clients_dropped"] == 1
    expected = "fedllama.weight: the encoded weight"
    assert any(expected in line and "is not the declared" in line for line in lines)


def test_a_reply_over_the_example_cap_is_dropped(cache_dir: Path, tmp_path: Path) -> None:
    from fedllama.server.aggregate import RoundFailed

    free = tiny_config(cache_dir, tmp_path / "run", "server.rounds=1", "output.plot=false")
    counts = [c["num-examples"] for c in run(InProcessGrid(3), free)[-1]["clients"]]
    cap = int(min(counts)) - 1
    capped = tiny_config(
        cache_dir,
        tmp_path / "capped",
        "output.plot=false",
        f"server.max_examples={cap}",
        "server.failed_round=stop",
    )

    with logged() as lines, pytest.raises(RoundFailed, match="0 good replies"):
        run(InProcessGrid(3), capped)

    assert len(counts) == 3
    assert sum(f"over server.max_examples={cap}" in line for line in lines) == 3


def test_under_secure_aggregation_a_weight_nobody_declared_stops_the_release_and_a_retry(
    cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from strategies.fedavg import FedAvg

    real = FedAvg.encode
    calls = [0]

    def inflated(self, delta, weight, view=None):  # type: ignore[no-untyped-def]
        if weight != 1.0:  # a client's encoding (the server probes shapes with weight 1)
            calls[0] += 1
            weight = weight * (50 if calls[0] == 1 else 1)  # the first client lies
        return real(self, delta, weight, view)

    monkeypatch.setattr(FedAvg, "encode", inflated)
    cfg = tiny_config(
        cache_dir, tmp_path / "run", "server.rounds=1", "output.plot=false", "secagg.enabled=true"
    )
    with logged() as lines:
        rows = run(InProcessGrid(3), cfg)

    failed = [line for line in lines if "a client encoded a weight it did not declare" in line]
    assert len(failed) == 1 and "retrying" in failed[0]  # not released; the round is redone
    assert "the summed clients' weights (examples) total" in failed[0]
    assert calls[0] == 6 and rows[-1]["clients_ok"] == 3 and "skipped" not in rows[-1]


# --------------------------------------------------------------------------- fuzz


def _fuzzed_replies(rng: np.random.Generator, count: int, spec_shapes: dict) -> list[RecordDict]:
    """``count`` malformed train replies, each a valid one with one seeded defect."""
    good_arrays = {k: np.full(shape, 0.01, np.float32) for k, shape in spec_shapes.items()}
    good_arrays[WEIGHT_KEY] = np.array([5.0], np.float32)
    key = sorted(spec_shapes)[0]

    def array(value: np.ndarray, dtype: str | None = None, shape: tuple | None = None) -> Array:
        out = Array(value)
        if dtype is not None:
            out.dtype = dtype
        if shape is not None:
            out.shape = shape
        return out

    defects = [
        lambda a, m: a.pop(key),
        lambda a, m: a.__setitem__("unexpected", array(np.ones(2, np.float32))),
        lambda a, m: a.__setitem__(key, array(np.ones((9, 9), np.float32))),
        lambda a, m: a.__setitem__(key, array(good_arrays[key].astype(np.float64))),
        lambda a, m: a.__setitem__(key, array(good_arrays[key].astype(">f4"), dtype="float32")),
        lambda a, m: a.__setitem__(key, array(np.array(["x"] * 4), "float32", (2, 2))),
        lambda a, m: a.__setitem__(key, array(np.full(spec_shapes[key], np.nan, np.float32))),
        lambda a, m: a.__setitem__(key, array(np.full(spec_shapes[key], -np.inf, np.float32))),
        lambda a, m: a.__setitem__(
            WEIGHT_KEY, array(np.array([rng.choice([0.0, -5, 1e30])], np.float32))
        ),
        lambda a, m: setattr(a[key], "data", a[key].data[: int(rng.integers(0, 40))]),
        lambda a, m: setattr(a[key], "data", rng.bytes(int(rng.integers(1, 200)))),
        lambda a, m: m.pop("num-examples"),
        lambda a, m: m.__setitem__("num-examples", float(rng.choice([0, -3, 1e308, np.nan]))),
        lambda a, m: m.__setitem__("train-loss", float(rng.choice([-1.0, np.inf, np.nan]))),
        lambda a, m: m.__setitem__("steps", [1, 2]),
        lambda a, m: m.__setitem__("client-eval-loss", [0.5]),
        lambda a, m: m.__setitem__("surprise", 1.0),
        lambda a, m: m.__setitem__("num-examples", 7),  # disagrees with the encoded weight 5
    ]
    replies = []
    for i in range(count):
        arrays = {k: Array(v) for k, v in good_arrays.items()}
        metrics: dict = {"num-examples": 5, "train-loss": 1.5}
        defects[i % len(defects)](arrays, metrics)
        replies.append(RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)}))
    return replies


def test_ten_thousand_malformed_replies_are_each_dropped_with_a_reason() -> None:
    from fedllama.privacy.secagg.messages import MASKED
    from fedllama.privacy.secagg.params import SecAggError
    from fedllama.server.aggregate import RoundPlan, RoundRecord, collect
    from fedllama.server.secure import _check_masked
    from fedllama.wire.validate import ReplyError, ReplySpec
    from strategies.fedavg import FedAvg

    shapes = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (3, 2), WEIGHT_KEY: (1,)}
    spec = ReplySpec(shapes=shapes)
    global_state = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    rng = np.random.default_rng(0)
    bad = _fuzzed_replies(rng, 9_000, shapes)
    fine = {k: Array(np.full(s, 0.01, np.float32)) for k, s in shapes.items()}
    fine[WEIGHT_KEY] = Array(np.array([5.0], np.float32))
    valid = RecordDict(
        {ARRAYS: ArrayRecord(fine), METRICS: MetricRecord({"num-examples": 5, "train-loss": 1.0})}
    )
    InProcessGrid(1)  # sets Flower's task identity, which a Message needs
    messages = []
    for i, content in enumerate([*bad, valid, valid]):
        msg = Message(content, dst_node_id=1, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = 1000 + i
        messages.append(msg)
    plan = RoundPlan(1, [], FedAvg(), global_state, spec)
    record = RoundRecord(server_round=1)

    with logged() as lines:
        collect(plan, messages, record)

    assert record.ok == 2 and record.dropped == 9_000
    assert len(lines) == 9_000 and all(": " in line.split("dropped node", 1)[1] for line in lines)
    assert record.delta is not None
    assert all(bool(torch.isfinite(v).all()) for v in record.delta.values())

    # the secure path's reply parsing: every malformed masked reply is a named SecAggError
    refused = 0
    for i in range(1_500):
        kind = i % 5
        payload = [
            np.array(["x"] * 4),
            np.full(4, np.nan),
            np.ones(4, np.int64),
            np.ones(3, np.uint64),
            np.ones(4, ">u8"),
        ][kind]
        masked = Array(payload)
        masked.dtype, masked.shape = "uint64", (4,)
        metrics = MetricRecord({"num-examples": 5, "train-loss": 1.0, "secagg-clipped": 0})
        with pytest.raises((SecAggError, ReplyError)):
            _check_masked(
                RecordDict({MASKED: ArrayRecord({MASKED: masked}), METRICS: metrics}), 4, 64
            )
        refused += 1
    assert refused == 1_500


def test_thousands_of_malformed_secagg_stage_replies_are_each_dropped_with_a_reason() -> None:
    """The secure path's key, share and unmask replies: each malformed one is a named drop of
    its node, the well-formed ones go on, and nothing else escapes (3 x 1,200 seeded cases)."""
    import copy
    import random

    from fedllama.config import SecAggConfig
    from fedllama.privacy.secagg import SecAggClient
    from fedllama.privacy.secagg.messages import keys_reply, shares_reply, unmask_reply
    from fedllama.server.aggregate import RoundPlan
    from fedllama.server.secure import _SecureRound
    from fedllama.wire.validate import ReplySpec
    from strategies.fedavg import FedAvg

    InProcessGrid(1)  # Flower's task identity, which a Message needs
    nodes = [1, 2, 3, 4, 5]
    shapes = {"m.lora_A.weight": (2, 3), WEIGHT_KEY: (1,)}
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    plan = RoundPlan(1, messages, FedAvg(), {}, ReplySpec(shapes=shapes))
    cfg = SecAggConfig(enabled=True, num_neighbours=4)  # every node neighbours all; t = 3
    base = _SecureRound(None, plan, cfg, 1.0)  # type: ignore[arg-type]
    base.server.rng = random.Random(0)  # the OS's CSPRNG cannot be copied; the graph is drawn
    server = copy.deepcopy(base.server)  # a clean round, played through to build good replies
    clients, keys = {}, {}
    for n in nodes:
        clients[n], keys[n] = SecAggClient.setup(n, server.params)
        server.add_keys(n, *keys[n])
    after_setup = copy.deepcopy(server)
    good = {"setup": {n: keys_reply(*keys[n]) for n in nodes}, "share": {}}
    for n, request in server.share_requests().items():
        good["share"][n] = fields = shares_reply(*clients[n].share(request))
        routed = dict(zip(fields["dst"], fields["ciphertexts"], strict=True))
        server.add_shares(n, routed, fields["commitment"])
    for n, routed in server.mask_requests().items():
        clients[n].receive(routed)
        server.add_masked(n, clients[n].mask(np.zeros(base.length, np.float32))[0])
    after_mask = copy.deepcopy(server)
    asks = server.unmask_requests()
    good["unmask"] = {n: unmask_reply(*clients[n].unmask(*asks[n])) for n in nodes}

    rng = np.random.default_rng(0)
    junk = [None, 7, "x", 1.5, True, [1, 2], [b"a", "b"], b"", rng.bytes(97)]
    mutable = {
        "setup": ["pk-enc", "pk-mask"],
        "share": ["dst", "ciphertexts", "commitment"],
        "unmask": ["seed-owners", "seed-shares"],  # every node survived: no key shares asked
    }

    def malformed(stage: str, fields: dict) -> dict:
        out = dict(fields)
        key = mutable[stage][int(rng.integers(len(mutable[stage])))]
        kind = int(rng.integers(4))
        if kind == 0:
            del out[key]
        elif kind == 1:
            out[key] = junk[int(rng.integers(len(junk)))]
        elif isinstance(out[key], list):  # one short, or the first repeated
            out[key] = out[key][:-1] if kind == 2 else [out[key][0], *out[key]]
        else:  # bytes of a wrong length (never 32, a commitment's, nor a point's 97)
            out[key] = rng.bytes(int(rng.integers(1, 31)))
        return out

    starts = {"setup": base.server, "share": after_setup, "unmask": after_mask}
    bad = 5
    dropped = dict.fromkeys(starts, 0)
    for stage, start in starts.items():
        for _ in range(1_200):
            secure = copy.copy(base)
            secure.server = copy.deepcopy(start)
            replies = [(n, good[stage][n]) for n in nodes if n != bad]
            replies.append((bad, malformed(stage, good[stage][bad])))
            secure.ask = lambda *_, r=replies: iter(r)  # type: ignore[method-assign]
            {"setup": secure.advertise_keys, "share": secure.share_keys, "unmask": secure.unmask}[
                stage
            ]()
            assert secure.server.reasons.get(bad), (stage, replies[-1][1])
            assert not set(secure.server.reasons) - {bad}  # the well-formed ones go on
            dropped[stage] += 1
    assert dropped == {"setup": 1_200, "share": 1_200, "unmask": 1_200}
