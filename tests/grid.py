"""An in-process stand-in for Flower's Grid: runs the real ClientApp on push.

It exercises the real ServerApp loop and ClientApp code without Ray or a SuperLink, the way
Flower's own strategy tests fake replies instead of starting a network. Messages are routed by
their type (``train``, ``train.secagg_setup``, ...) as a SuperNode routes them, and each node
keeps one ``Context`` whose ``state`` persists across messages, as a SuperNode keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import clients.app
import strategies
from fedllama.config import Config
from fedllama.rounds import run_server

Tamper = Callable[[int, Message], Message | None]


class InProcessGrid:
    """Nodes 100, 101, ... with partition ids 0, 1, ...; replies computed synchronously."""

    def __init__(
        self,
        num_nodes: int,
        tamper: Tamper | None = None,
        node_config: dict[int, dict[str, int | str]] | None = None,
    ) -> None:
        self.node_ids = [100 + i for i in range(num_nodes)]
        self.tamper = tamper
        self.node_config = node_config or {}
        self.replies: dict[str, Message] = {}
        self.contexts: dict[int, Context] = {}
        self.trained: list[tuple[int, int]] = []  # (round, partition id)
        self._next = 0
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._next += 1
            msg_id = f"msg-{self._next}"
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            pid = self.node_ids.index(node)
            context = self.contexts.setdefault(
                node,
                Context(
                    run_id=1,
                    node_id=node,
                    node_config={
                        "partition-id": pid,
                        "num-partitions": len(self.node_ids),
                        **self.node_config.get(pid, {}),
                    },
                    state=RecordDict(),
                    run_config={},
                ),
            )
            try:
                reply = clients.app.app(msg, context)
            except Exception as err:  # a SuperNode turns a ClientApp exception into this
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if "config" in msg.content.config_records:  # a message that trains
                self.trained.append(
                    (int(msg.content.config_records["config"]["server-round"]), pid)
                )
            if self.tamper is not None:
                reply = self.tamper(pid, reply)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = node
                self.replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def run(grid: InProcessGrid, cfg: Config) -> list[dict[str, Any]]:
    """The real server loop over an in-process grid."""
    return run_server(grid, cfg, strategies.build(cfg))  # type: ignore[arg-type]
