"""Server optimizers against hand-computed steps (Reddi et al., ICLR 2021, Algorithm 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedllama import config
from fedllama.config import ConfigError
from fedllama.merge.optimizer import ServerAdaptive, ServerAvgM, ServerSGD, build_server_optimizer
from fedllama.model import adapters
from tests.harness import InProcessGrid, tiny_config
from tests.harness import run as _run

K = "w"


def test_sgd_adds_lr_times_delta() -> None:
    out = ServerSGD(lr=0.5).step({K: torch.tensor([1.0, 1.0])}, {K: torch.tensor([2.0, -4.0])})
    assert out[K].tolist() == [2.0, -1.0]


def test_avgm_accumulates_momentum() -> None:
    opt = ServerAvgM(lr=1.0, momentum=0.5)
    x = opt.step({K: torch.tensor([0.0])}, {K: torch.tensor([1.0])})  # m = 1
    x = opt.step(x, {K: torch.tensor([1.0])})  # m = 0.5·1 + 1 = 1.5
    assert x[K].item() == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # m = 0.5·2 = 1; v = 0.5·0.01 + 0.5·4 = 2.005; x = 1 / (√2.005 + 0.1)
        ("adam", 1 / (2.005**0.5 + 0.1)),
        # v = 0.01 - 0.5·4·sign(0.01 - 4) = 2.01; x = 1 / (√2.01 + 0.1)
        ("yogi", 1 / (2.01**0.5 + 0.1)),
    ],
)
def test_adaptive_first_step(kind: str, expected: float) -> None:
    opt = ServerAdaptive(kind, lr=1.0, beta1=0.5, beta2=0.5, tau=0.1)
    x = opt.step({K: torch.tensor([0.0])}, {K: torch.tensor([2.0])})
    assert x[K].item() == pytest.approx(expected, rel=1e-6)


def test_state_round_trip_continues_identically() -> None:
    deltas = [{K: torch.tensor([2.0, -1.0])}, {K: torch.tensor([0.5, 0.5])}]
    straight = ServerAdaptive("yogi", lr=0.1)
    x = straight.step({K: torch.zeros(2)}, deltas[0])
    expected = straight.step(x, deltas[1])
    first = ServerAdaptive("yogi", lr=0.1)
    x = first.step({K: torch.zeros(2)}, deltas[0])
    resumed = ServerAdaptive("yogi", lr=0.1)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.step(x, deltas[1])[K], expected[K])


def test_builder_reads_server_section() -> None:
    cfg = config.load(None, ["server.optimizer=avgm", "server.momentum=0.7", "server.lr=0.3"])
    opt = build_server_optimizer(cfg.server)
    assert isinstance(opt, ServerAvgM) and (opt.lr, opt.momentum) == (0.3, 0.7)
    with pytest.raises(ConfigError, match=r"server.beta2: must be in \[0, 1\)"):
        config.load(None, ["server.beta2=1.0"])


def test_resumed_run_keeps_the_optimizer_moments(cache_dir: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    _run(
        InProcessGrid(3),
        tiny_config(cache_dir, straight, "server.optimizer=adam", "server.lr=0.01"),
    )
    split = tmp_path / "split"
    _run(
        InProcessGrid(3),
        tiny_config(cache_dir, split, "server.optimizer=adam", "server.lr=0.01", "server.rounds=1"),
    )
    _run(InProcessGrid(3), tiny_config(cache_dir, split, "server.optimizer=adam", "server.lr=0.01"))

    a, _ = adapters.load_adapter(straight / "round-002")
    b, _ = adapters.load_adapter(split / "round-002")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError, match="server.optimizer=adam"):
        _run(
            InProcessGrid(3),
            tiny_config(cache_dir, split, "server.optimizer=yogi", "server.rounds=3"),
        )
