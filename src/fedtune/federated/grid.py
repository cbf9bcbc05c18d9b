"""A Flower `Grid` that runs every site's `ClientApp` in this process, one after
another, without Ray or a SuperLink. Flower's own in-memory grid needs a LinkState
and a simulation engine that starts one worker per site, each loading the base
model; here the model is loaded once (fedtune.federated.apps keeps it) and each
site owns only its `Context` (its loop state between rounds).

Messages still go through Flower's protobuf serialization in both directions, so
a site only ever sees what a real transport would deliver.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedtune.errors import FedtuneError
from fedtune.federated.wire import roundtrip

log = logging.getLogger("fedtune.federated")

CLIENT_EXCEPTION = 1
"""Error code of a reply whose ClientApp raised."""
NO_REPLY = 2
"""Error code the server gives a site that sent no reply within the timeout."""


class InProcessGrid(Grid):
    """Sites are node ids 1000+i; `contexts[node_id]` is that site's Flower Context."""

    def __init__(self, client_app: ClientApp, contexts: dict[int, Context], run_id: int) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self._run = Run.create_empty(run_id)
        self._inbox: dict[str, Message] = {}
        # Messages created by the ServerApp carry this identity (as under a SuperLink).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no site with node id {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self._inbox[msg.metadata.message_id] = roundtrip(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Runs the ClientApp for each pending message (in order) and returns the
        replies. An exception in a site becomes an error reply, as a SuperNode
        would report it; fedtune's own input errors stop the run instead."""
        replies = []
        for mid in message_ids:
            msg = self._inbox.pop(mid, None)
            if msg is None:
                continue
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(msg, context)
            except FedtuneError:
                raise
            except Exception as e:
                log.error("site %s failed:\n%s", msg.metadata.dst_node_id, traceback.format_exc())
                reply = Message(Error(CLIENT_EXCEPTION, f"{type(e).__name__}: {e}"), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            replies.append(roundtrip(reply))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Sites run one after another in this process, so `timeout` has nothing
        to bound here; the deployment engine's grid applies it."""
        return list(self.pull_messages(list(self.push_messages(messages))))


POLL_FIRST = 0.05
POLL_MAX = 0.2
"""Seconds between the server's polls for replies: from POLL_FIRST, growing by half
each poll up to POLL_MAX, and back to POLL_FIRST after a reply (the other sites are
likely close behind). Flower's Grid.send_and_receive sleeps 3 s between polls, which
alone cost a deployed round 1.5 s on average."""


@dataclass
class Exchange:
    replies: list[Message]
    """One reply per site that answered in time (errors included), in the order the
    messages were sent."""
    missing: list[int]
    """Node ids that sent no reply within the timeout."""
    ignored: int = 0
    """Replies dropped: a second reply to one message, or a reply to a message of
    another exchange (an old round)."""
    pushed: float = 0.0
    """Seconds pushing the messages took."""
    arrived: list[float] = field(default_factory=list)
    """Seconds from the start of the push to each reply in `replies`."""


def exchange(grid: Grid, messages: list[Message], timeout: float,
             poll: tuple[float, float] = (POLL_FIRST, POLL_MAX)) -> Exchange:  # fmt: skip
    """Send `messages` and collect the replies for at most `timeout` seconds: a bounded
    wait, replies kept only if they answer a message of this exchange, once each."""
    t0 = time.monotonic()
    ids = list(grid.push_messages(messages))
    pushed = time.monotonic() - t0
    if len(ids) != len(messages):  # e.g. the SuperLink refused an oversized push
        raise FedtuneError(
            f"the server could push only {len(ids)} of {len(messages)} messages to the sites; "
            "if the update is large, try federated.transport = 'bf16' or a smaller method"
        )
    order = {mid: i for i, mid in enumerate(ids) if mid}
    by_id = {mid: messages[i] for mid, i in order.items()}
    # A message Flower could not store (empty id) has no reply coming: its site failed.
    missing_now = [m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True) if not mid]
    pending = set(order)
    got: list[tuple[int, float, Message]] = []
    ignored = 0
    deadline = time.monotonic() + timeout
    wait = poll[0]
    while pending:
        for r in grid.pull_messages([mid for mid in ids if mid in pending]):
            mid = r.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                if r.has_error() and r.metadata.src_node_id != by_id[mid].metadata.dst_node_id:
                    # The SuperLink answers for an unavailable node: its error, but
                    # from the SuperLink's id. Reply from the site it stands for.
                    r = Message(r.error, reply_to=by_id[mid])
                got.append((order[mid], time.monotonic() - t0, r))
                wait = poll[0]
            else:
                ignored += 1
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        wait = min(poll[1], wait * 1.5)
    missing = missing_now + [by_id[mid].metadata.dst_node_id for mid in ids if mid in pending]
    # In the order the messages were sent, not of arrival: aggregation sums in this
    # order, and float sums depend on it (a rerun or a resumed run must match).
    got.sort(key=lambda x: x[0])
    return Exchange([r for *_, r in got], missing, ignored, pushed, [t for _, t, _ in got])
