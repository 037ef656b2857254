"""Push messages and stream the replies back as they arrive."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


SUPERLINK_NODE_ID = 1
"""Source node id of the error replies the SuperLink itself makes (Flower 1.39)."""


def stream_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    poll_s: float = 0.2,
    setting: str = "server.timeout_s",
) -> Iterator[Message]:
    """Push messages and yield replies as they arrive (``send_and_receive``, streamed).

    Nodes that do not answer are named in the log. A SuperNode that died is reported by the
    SuperLink itself with an error reply (``Node Unavailable``) once its heartbeat lapses: in
    Flower 1.39 a SuperNode sends one about every 20 s and is declared offline 2 x 30 s after
    the last, so 40-60 s after it died. That reply comes from the SuperLink's node id; it is
    re-addressed here as a reply from the node it stands for, so that the caller logs and
    counts it against that node. A node still silent at ``timeout`` is logged by id, with
    ``setting``, the config key the timeout came from.
    """
    sent = list(messages)
    ids: list[str | None] = list(grid.push_messages(sent))
    ids += [None] * (len(sent) - len(ids))  # Flower returns [] for a payload that is too large
    pairs = list(zip(ids, sent, strict=True))
    by_id = {mid: msg for mid, msg in pairs if mid}
    unpushed = sorted(msg.metadata.dst_node_id for mid, msg in pairs if not mid)
    if unpushed:
        log.warning("could not push messages to node(s) %s", ", ".join(map(str, unpushed)))
    pending = set(by_id)
    start = time.monotonic()
    while pending and time.monotonic() < start + timeout:
        replies = list(grid.pull_messages(pending))
        for reply in replies:
            admitted = _admit(reply, by_id, pending, time.monotonic() - start)
            if admitted is not None:
                pending.discard(admitted.metadata.reply_to_message_id)
                yield admitted
        if pending and not replies:
            time.sleep(poll_s)
    if pending:
        silent = sorted(by_id[mid].metadata.dst_node_id for mid in pending)
        log.warning(
            "%d node(s) did not reply within %s=%.0f s: %s",
            len(silent),
            setting,
            timeout,
            ", ".join(map(str, silent)),
        )


def _admit(
    reply: Message, by_id: dict[str, Message], pending: set[str], waited: float
) -> Message | None:
    """The reply as this round counts it, or None (logged) when the round did not ask for it:
    a second reply to a message, a reply to a message of another round, or one from a node
    other than the addressee. The SuperLink's own "node unavailable" error replies are
    re-addressed to the node they stand for."""
    mid = reply.metadata.reply_to_message_id
    if mid not in pending:
        log.warning(
            "refused a reply from node %d: it answers message %r, which %s",
            reply.metadata.src_node_id,
            mid,
            "was already answered" if mid in by_id else "this round did not send",
        )
        return None
    original = by_id[mid]
    src, dst = reply.metadata.src_node_id, original.metadata.dst_node_id
    relayed = src == SUPERLINK_NODE_ID and reply.has_error()
    if src != dst and not relayed:
        log.warning("refused a reply from node %d to the message sent to node %d", src, dst)
        return None
    if relayed:
        log.warning(
            "node %d is unreachable (reported by the SuperLink %.1f s after the message was "
            "sent): %s",
            dst,
            waited,
            reply.error.reason,
        )
        return Message(reply.error, reply_to=original)
    return reply
