"""Server optimizers: how the aggregated delta moves the global state.

The aggregated delta Δ (the clients' weighted mean of ``trained - view``) is a pseudo-gradient
pointing downhill. Every optimizer here follows Reddi et al., "Adaptive Federated Optimization"
(ICLR 2021), Algorithm 2, except ``avgm`` (Hsu et al., 2019):

* ``sgd``:  x <- x + η·Δ                              (η = 1: plain FedAvg)
* ``avgm``: m <- β·m + Δ;             x <- x + η·m    (FedAvgM)
* ``adam``: m <- β1·m + (1-β1)·Δ;  v <- β2·v + (1-β2)·Δ²;                 x <- x + η·m/(√v+τ)
* ``yogi``: m <- β1·m + (1-β1)·Δ;  v <- v - (1-β2)·Δ²·sign(v - Δ²);        x <- x + η·m/(√v+τ)

with v initialised to τ² as in the paper. Optimizer state is saved with every round so that a
resumed run continues with the same moments.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fedllama.config import ServerConfig
from fedllama.merge.interface import AdapterState


class ServerOptimizer(Protocol):
    """Applies an aggregated delta to the global state."""

    def step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        """New global state."""
        ...

    def state_dict(self) -> AdapterState:
        """Tensors to save with a round (empty for stateless optimizers)."""
        ...

    def load_state_dict(self, state: AdapterState) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


def _check_keys(global_state: AdapterState, delta: AdapterState) -> None:
    if set(global_state) != set(delta):
        diff = sorted(set(global_state) ^ set(delta))[:3]
        raise ValueError(f"aggregated delta keys differ from the global state's: {diff}")


class ServerSGD:
    """``x <- x + lr·Δ``; with lr 1 this is plain FedAvg (McMahan et al., AISTATS 2017)."""

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        """New global state."""
        _check_keys(global_state, delta)
        return {k: global_state[k] + self.lr * delta[k] for k in global_state}

    def state_dict(self) -> AdapterState:
        """No state."""
        return {}

    def load_state_dict(self, state: AdapterState) -> None:
        """No state."""


class _Stateful:
    """Moments kept per key, saved as ``m.<key>`` / ``v.<key>``."""

    def __init__(self) -> None:
        self.m: AdapterState = {}
        self.v: AdapterState = {}

    def state_dict(self) -> AdapterState:
        """The moments, prefixed ``m.`` and ``v.``."""
        return {
            **{f"m.{k}": t for k, t in self.m.items()},
            **{f"v.{k}": t for k, t in self.v.items()},
        }

    def load_state_dict(self, state: AdapterState) -> None:
        """Restore the moments."""
        self.m = {k[2:]: t.clone() for k, t in state.items() if k.startswith("m.")}
        self.v = {k[2:]: t.clone() for k, t in state.items() if k.startswith("v.")}


class ServerAvgM(_Stateful):
    """FedAvgM (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution", 2019)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum

    def step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        """``m <- β·m + Δ``; ``x <- x + η·m``."""
        _check_keys(global_state, delta)
        out = {}
        for k, x in global_state.items():
            m = self.m.get(k, torch.zeros_like(x))
            self.m[k] = self.momentum * m + delta[k]
            out[k] = x + self.lr * self.m[k]
        return out


class ServerAdaptive(_Stateful):
    """FedAdam / FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)."""

    def __init__(
        self, kind: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__()
        if kind not in ("adam", "yogi"):
            raise ValueError(f"adaptive server optimizer must be adam or yogi, got {kind!r}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau

    def step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        """One step of Algorithm 2 (FedAdam or FedYogi) on every key."""
        _check_keys(global_state, delta)
        out = {}
        for k, x in global_state.items():
            d = delta[k]
            m = self.m.get(k, torch.zeros_like(x))
            v = self.v.get(k, torch.full_like(x, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * d
            d2 = d * d
            if self.kind == "adam":
                v = self.beta2 * v + (1 - self.beta2) * d2
            else:
                v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
            self.m[k], self.v[k] = m, v
            out[k] = x + self.lr * m / (v.sqrt() + self.tau)
        return out


def build_server_optimizer(cfg: ServerConfig) -> ServerOptimizer:
    """The optimizer named by ``server.optimizer`` with its settings."""
    if cfg.optimizer == "sgd":
        return ServerSGD(cfg.lr)
    if cfg.optimizer == "avgm":
        return ServerAvgM(cfg.lr, cfg.momentum)
    if cfg.optimizer in ("adam", "yogi"):
        return ServerAdaptive(cfg.optimizer, cfg.lr, cfg.beta1, cfg.beta2, cfg.tau)
    raise ValueError(f"server.optimizer: unknown {cfg.optimizer!r}; valid: sgd, avgm, adam, yogi")
