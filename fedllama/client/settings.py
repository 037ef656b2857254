"""A node's own settings and data: node config, its split, where it keeps state."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedllama import data, model
from fedllama.config import Config


class ClientSetupError(ValueError):
    """A node's settings (node config) are unusable."""


@dataclass
class NodeSettings:
    """Per-node settings: from ``--node-config`` in a deployment, partition ids in simulation."""

    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    lora_rank: int | None = None
    device: str | None = None
    batch_size: int | None = None
    local_steps: int | None = None
    cache_dir: str | None = None
    secagg_signing_key: str | None = None
    """Path of the key this node signs its SecAgg+ round keys with (its SuperNode key)."""
    secagg_roster: str | None = None
    """Path of the federation's SuperNode public keys; neighbours' keys are checked against it."""

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeSettings:
        """Read Flower's node config (``partition-id``, ``data-path``, ``lora-rank``,
        ``device``, ``batch-size``, ``local-steps``, ``cache-dir``, ``secagg-signing-key``,
        ``secagg-roster``)."""

        def get_int(key: str) -> int | None:
            value = node_config.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise ClientSetupError(f"node config {key}={value!r}: expected an integer")
            return value

        def get_str(key: str) -> str | None:
            value = node_config.get(key)
            if value is not None and not isinstance(value, str):
                raise ClientSetupError(f"node config {key}={value!r}: expected a quoted string")
            return value

        return cls(
            partition_id=get_int("partition-id"),
            num_partitions=get_int("num-partitions"),
            data_path=get_str("data-path"),
            lora_rank=get_int("lora-rank"),
            device=get_str("device"),
            batch_size=get_int("batch-size"),
            local_steps=get_int("local-steps"),
            cache_dir=get_str("cache-dir"),
            secagg_signing_key=get_str("secagg-signing-key"),
            secagg_roster=get_str("secagg-roster"),
        )

    def rank(self, cfg: Config) -> int:
        """This node's LoRA rank: ``lora-rank``, else ``lora.client_ranks`` by partition, else
        ``lora.r``. A dense adapter (``adapter.kind``) has no rank: ``lora-rank`` is refused.

        Raises:
            ClientSetupError: ``lora-rank`` set under a dense ``adapter.kind``, or another
                rank than ``lora.r`` with ``lora.target_parameters``.
        """
        if self.lora_rank is not None and cfg.adapter.dense:
            raise ClientSetupError(
                f"node config lora-rank={self.lora_rank}: mixed ranks apply to LoRA only, and "
                f"this run trains adapter.kind={cfg.adapter.kind}; start the SuperNode "
                "without lora-rank"
            )
        if self.lora_rank not in (None, cfg.lora.r) and cfg.lora.parameters():
            raise ClientSetupError(
                f"node config lora-rank={self.lora_rank}: mixed ranks do not apply with "
                f"lora.target_parameters (expert LoRA trains at lora.r={cfg.lora.r} on every "
                "client); start the SuperNode without lora-rank"
            )
        if self.lora_rank is not None:
            return self.lora_rank
        if cfg.lora.client_ranks and self.partition_id is not None:
            return cfg.lora.client_ranks[self.partition_id % len(cfg.lora.client_ranks)]
        return cfg.lora.r

    def apply(self, cfg: Config) -> Config:
        """The run config with this node's device, cache directory, batch size and local steps
        (not its rank: see :meth:`rank`)."""
        model_cfg = replace(cfg.model, device=self.device) if self.device else cfg.model
        if self.cache_dir:
            model_cfg = replace(model_cfg, cache_dir=self.cache_dir)
        train_cfg = cfg.train
        if self.batch_size is not None:
            train_cfg = replace(train_cfg, batch_size=self.batch_size)
        if self.local_steps is not None:
            train_cfg = replace(train_cfg, local_steps=self.local_steps)
        return replace(cfg, model=model_cfg, train=train_cfg)


def load_split(cfg: Config, node: NodeSettings) -> data.Split:
    """This node's train/eval examples: its own data path, or its simulation partition."""
    if node.data_path is not None:
        path = Path(node.data_path).expanduser()
        if not path.exists() or not os.access(path, os.R_OK):
            raise ClientSetupError(
                f"node config data-path={node.data_path!r} does not exist or is not readable"
            )
        return data.split_train_eval(
            data.read_local(path, cfg.data.columns), cfg.data.eval_fraction, f"node-{cfg.data.seed}"
        )
    if node.partition_id is None:
        raise ClientSetupError(
            "this node has neither data-path nor partition-id in its node config; start the "
            "SuperNode with --node-config 'data-path=\"/path/to/data.jsonl\"'"
        )
    num = node.num_partitions or cfg.simulation.num_clients
    federation = _federation(cfg, num)
    if not 0 <= node.partition_id < len(federation.clients):
        raise ClientSetupError(f"partition-id {node.partition_id} is outside 0..{num - 1}")
    return federation.clients[node.partition_id]


_FEDERATIONS: dict[str, data.Federation] = {}


def _federation(cfg: Config, num_clients: int) -> data.Federation:
    key = repr((cfg.data, num_clients, cfg.model.cache_dir))
    if key not in _FEDERATIONS:
        _FEDERATIONS.clear()
        _FEDERATIONS[key] = data.build_federation(
            cfg.data, num_clients, model.cache_root(cfg.model)
        )
    return _FEDERATIONS[key]


def client_state_path(cfg: Config, node: NodeSettings) -> Path:
    """Where a client keeps strategy state across rounds: per run (``output.dir``) and client."""
    run = hashlib.sha256(cfg.output.dir.encode()).hexdigest()[:12]
    if node.partition_id is not None and node.data_path is None:
        who = f"partition-{node.partition_id}"
    else:
        who = "node-" + hashlib.sha256(str(node.data_path).encode()).hexdigest()[:12]
    return model.cache_root(cfg.model) / "client-state" / run / f"{who}.safetensors"
