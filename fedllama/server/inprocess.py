"""An in-process stand-in for Flower's ``Grid``: runs a ClientApp synchronously on push.

It drives the real ServerApp loop and ClientApp code without Ray or a SuperLink (tests and
benchmarks), the way Flower's own strategy tests fake replies instead of starting a network.
Messages are routed by their type (``train``, ``train.secagg_setup``, ...) as a SuperNode
routes them, and each node keeps one ``Context`` whose ``state`` persists across messages, as
a SuperNode keeps it. A ClientApp exception becomes an error reply, as on a SuperNode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message], Message | None]
"""Called with (partition id, reply); returns the reply to deliver, or None to drop it."""


class InProcessGrid:
    """Nodes 100, 101, ... with partition ids 0, 1, ...; replies computed synchronously.

    Args:
        client_app: the ClientApp every node runs.
        num_nodes: how many nodes.
        tamper: changes or drops replies (fault injection).
        node_config: extra node config by partition id (e.g. ``{"lora-rank": 8}``).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        tamper: Tamper | None = None,
        node_config: dict[int, dict[str, int | str]] | None = None,
    ) -> None:
        self.client_app = client_app
        self.node_ids = [100 + i for i in range(num_nodes)]
        self.tamper = tamper
        self.node_config = node_config or {}
        self.replies: dict[str, Message] = {}
        self.contexts: dict[int, Context] = {}
        self.trained: list[tuple[int, int]] = []
        """(round, partition id) of every message that trained."""
        self._next = 0
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes."""
        return list(self.node_ids)

    def context(self, node: int) -> Context:
        """The node's context, created on its first message."""
        pid = self.node_ids.index(node)
        node_config: dict[str, bool | float | int | str] = {
            "partition-id": pid,
            "num-partitions": len(self.node_ids),
            **self.node_config.get(pid, {}),
        }
        return self.contexts.setdefault(
            node,
            Context(
                run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={}
            ),
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp on each message now; its reply waits for ``pull_messages``."""
        ids = []
        for msg in messages:
            self._next += 1
            msg_id = f"msg-{self._next}"
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            pid = self.node_ids.index(node)
            reply: Message | None
            try:
                reply = self.client_app(msg, self.context(node))
            except Exception as err:  # a SuperNode turns a ClientApp exception into this
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if "config" in msg.content.config_records:  # a message that trains
                server_round = int(str(msg.content.config_records["config"]["server-round"]))
                self.trained.append((server_round, pid))
            if self.tamper is not None and reply is not None:
                reply = self.tamper(pid, reply)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = node
                self.replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that are ready, each delivered once."""
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
