"""Every SecAgg+ stage in one process, without Flower messaging (tests and benchmarks)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from fedllama.config import SecAggConfig
from fedllama.privacy.dp import distributed
from fedllama.privacy.dp.distributed import DdgParams
from fedllama.privacy.secagg.client import SecAggClient
from fedllama.privacy.secagg.messages import (
    STAGES,
    fields_bytes,
    keys_reply,
    mask_request,
    setup_request,
    share_request,
    shares_reply,
    unmask_reply,
    unmask_request,
)
from fedllama.privacy.secagg.params import F32, F64, U64, from_wire, to_wire
from fedllama.privacy.secagg.server import SecAggServer


@dataclass
class LocalRound:
    """What :func:`aggregate_locally` returns: the sum and everything the server saw."""

    total: F64
    server: SecAggServer
    masked: dict[int, U64]
    """Each node's masked vector as the server received it."""
    client_seconds: dict[str, dict[int, float]]
    """Stage → node → that client's compute time in the stage."""
    server_seconds: dict[str, float]
    """Stage → the server's compute time (for "unmask", rebuilding and unmasking the sum)."""
    bytes_down: dict[str, int]
    """Stage → protocol payload bytes sent to clients (without the mask stage's global state)."""
    bytes_up: dict[str, int]
    """Stage → payload bytes clients sent (the mask stage: the masked vectors)."""


def aggregate_locally(
    vectors: Mapping[int, F32],
    cfg: SecAggConfig,
    server_round: int = 1,
    drop: Mapping[int, str] | None = None,
    rng: random.Random | None = None,
    ddg: DdgParams | None = None,
) -> LocalRound:
    """Run every stage in one process, without Flower messaging (tests and benchmarks).

    ``vectors`` maps node ids to flattened encodings; ``drop[node] = stage`` makes that node
    vanish instead of replying in that stage ("setup", "share", "mask" or "unmask"). Client and
    server work are timed apart, and message fields are counted as the glue would send them.
    With ``ddg`` each client encodes its vector (the payload) with its share of distributed
    DP noise instead of the fixed-point quantizer, and ``total`` is the decoded payload sum.
    """
    return _LocalDriver(vectors, cfg, server_round, drop or {}, rng, ddg).run()


T = TypeVar("T")


class _LocalDriver:
    """One in-process round: the server, its clients, and what each side cost per stage."""

    def __init__(
        self,
        vectors: Mapping[int, F32],
        cfg: SecAggConfig,
        server_round: int,
        drop: Mapping[int, str],
        rng: random.Random | None,
        ddg: DdgParams | None = None,
    ) -> None:
        self.vectors, self.server_round, self.drop, self.ddg = vectors, server_round, drop, ddg
        length = ddg.size if ddg else next(iter(vectors.values())).shape[0]
        extra = {} if rng is None else {"rng": rng}
        self.client_s: dict[str, dict[int, float]] = {stage: {} for stage in STAGES}
        self.server_s = dict.fromkeys(STAGES, 0.0)
        self.down = dict.fromkeys(STAGES, 0)
        self.up = dict.fromkeys(STAGES, 0)
        self.server = self.serve(
            "setup", SecAggServer, sorted(vectors), cfg, server_round, length, **extra
        )
        self.clients: dict[int, SecAggClient] = {}
        self.masked: dict[int, U64] = {}

    def serve(self, stage: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run server work, timed into ``stage``."""
        t = time.perf_counter()
        out = call(*args, **kwargs)
        self.server_s[stage] += time.perf_counter() - t
        return out

    def on_client(self, stage: str, node: int, call: Callable[..., T], *args: Any) -> T:
        """Run one client's work, timed into ``stage``."""
        t = time.perf_counter()
        out = call(*args)
        self.client_s[stage][node] = time.perf_counter() - t
        return out

    def answering(self, stage: str, requests: Mapping[int, dict[str, Any]]) -> list[int]:
        """Count the requests' bytes; the nodes that do not vanish in ``stage``."""
        self.down[stage] += sum(fields_bytes(f) for f in requests.values())
        return [n for n in requests if self.drop.get(n) != stage]

    def run(self) -> LocalRound:
        """Every stage in turn; the unmasked sum."""
        server = self.server
        requests = {
            n: setup_request(p) for n, p in self.serve("setup", server.setup_requests).items()
        }
        for node in self.answering("setup", requests):
            self.clients[node], public = self.on_client(
                "setup", node, SecAggClient.setup, node, server.params
            )
            self.up["setup"] += fields_bytes(keys_reply(*public))
            self.serve("setup", server.add_keys, node, *public)
        self.share_stage()
        self.mask_stage()
        self.unmask_stage()
        if self.ddg is None:
            total = self.serve("unmask", server.finish)
        else:
            summed = self.serve("unmask", server.finish_integers)
            total = self.serve("unmask", distributed.decode, summed, self.ddg)[0]
        return LocalRound(
            total, server, self.masked, self.client_s, self.server_s, self.down, self.up
        )

    def share_stage(self) -> None:
        """Stage 2: neighbourhood keys out, encrypted shares back."""
        keys_by_node = self.serve("share", self.server.share_requests)
        requests = {n: share_request(self.server_round, k) for n, k in keys_by_node.items()}
        for node in self.answering("share", requests):
            client = self.clients[node]
            ciphertexts, commitment = self.on_client(
                "share", node, client.share, keys_by_node[node]
            )
            self.up["share"] += fields_bytes(shares_reply(ciphertexts, commitment))
            self.serve("share", self.server.add_shares, node, ciphertexts, commitment)

    def mask_stage(self) -> None:
        """Stage 3: routed shares out, masked vectors back."""
        routed = self.serve("mask", self.server.mask_requests)
        requests = {n: mask_request(self.server_round, c, bytes(32)) for n, c in routed.items()}
        for node in self.answering("mask", requests):
            client = self.clients[node]

            def mask(node: int = node, client: SecAggClient = client) -> U64:
                client.receive(routed[node])
                if self.ddg is not None:
                    vector = self.vectors[node].astype(np.float64)
                    return client.mask_integers(distributed.encode(vector, self.ddg))
                return client.mask(self.vectors[node])[0]

            bits = self.server.cfg.modulus_bits
            self.masked[node] = to_wire(self.on_client("mask", node, mask), bits)
            self.up["mask"] += self.masked[node].nbytes
            summed = from_wire(self.masked[node], bits, self.masked[node].shape[0])
            self.serve("mask", self.server.add_masked, node, summed)

    def unmask_stage(self) -> None:
        """Stage 4: survivors and dropouts out, shares back."""
        asks = self.serve("unmask", self.server.unmask_requests)
        requests = {n: unmask_request(self.server_round, *a) for n, a in asks.items()}
        for node in self.answering("unmask", requests):
            seeds, keys = self.on_client("unmask", node, self.clients[node].unmask, *asks[node])
            self.up["unmask"] += fields_bytes(unmask_reply(seeds, keys))
            self.serve("unmask", self.server.add_unmask, node, seeds, keys)
