"""The ClientApp Flower's Deployment Engine loads at a site: thin, so that a warm
base model survives between messages.

Flower (1.41) runs a fresh `flwr-clientapp` process for every message a SuperNode
receives (Flower issue #3670): importing torch and transformers and loading the
base model would cost every site ~8 s or more per round. So this module imports
nothing but Flower, and forwards each message to the site's long-lived worker
(`fedtune.federated.worker`, started by `fedtune site` next to the SuperNode),
which keeps fedtune's Workspace (base model, data, encoded features) in memory for
the life of the site. The worker's Unix socket is named by the node config key
`worker`; without it the message is handled here, in the fresh process, by
`fedtune.federated.apps.client_app` (cold: the model loads every message).

Wire format between the two (local, same user; the socket file is 0600 in a 0700
folder): frames of an 8-byte big-endian length and bytes. A request is three
frames: a JSON header, the Message (Flower's protobuf) and the Context (protobuf);
a reply is a JSON header (`{"ok": true}` or `{"error": "..."}`), the reply Message
and the Context's state (protobufs). Written here because Flower has no
long-lived ClientApp process in this version.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

WORKER_KEY = "worker"
"""Node config key: path of the site worker's Unix socket."""
WORKER_TIMEOUT_KEY = "worker-timeout"
"""Node config key: seconds to wait for the worker's reply to one message (default
`DEFAULT_TIMEOUT`): a bound on a round's local training."""
DEFAULT_TIMEOUT = 3600.0
CONNECT_TIMEOUT = 10.0
_LEN = struct.Struct(">Q")
MAX_FRAME = 8 << 30
"""Largest frame accepted (8 GiB: a full fine-tune of a multi-billion model in fp32)."""


class SiteWorkerError(RuntimeError):
    """The site worker could not be reached, or it failed handling a message."""


# --- framing --------------------------------------------------------------------


def send_frames(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(_LEN.pack(len(frame)))
        sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes is over the {MAX_FRAME}-byte limit")
    return _recv_exact(sock, n)


def encode_request(msg: Message, context: Context) -> tuple[bytes, bytes, bytes]:
    header = json.dumps({"type": msg.metadata.message_type}).encode()
    return (header, message_to_proto(msg).SerializeToString(),
            context_to_proto(context).SerializeToString())  # fmt: skip


def decode_request(frames: list[bytes]) -> tuple[dict[str, Any], Message, Context]:
    header = json.loads(frames[0])
    msg = message_from_proto(ProtoMessage.FromString(frames[1]))
    context = context_from_proto(ProtoContext.FromString(frames[2]))
    return header, msg, context


def encode_reply(reply: Message | None, context: Context | None,
                 error: str = "") -> tuple[bytes, bytes, bytes]:  # fmt: skip
    header = json.dumps({"ok": not error, "error": error}).encode()
    if reply is None or context is None:
        return header, b"", b""
    return (header, message_to_proto(reply).SerializeToString(),
            recorddict_to_proto(context.state).SerializeToString())  # fmt: skip


# --- the proxy ------------------------------------------------------------------


def forward(msg: Message, context: Context, path: str, timeout: float) -> Message:
    """Have the worker at `path` handle `msg`; its reply, with `context.state`
    updated as the worker left it."""
    if not os.path.exists(path):
        raise SiteWorkerError(
            f"no site worker at {path} (node config {WORKER_KEY}={path}): start the site "
            "with `fedtune site ...`, which runs the worker next to the SuperNode, or drop "
            f"{WORKER_KEY} from the node config to load the model in every message"
        )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(path)
            sock.settimeout(timeout)
            send_frames(sock, *encode_request(msg, context))
            header = json.loads(recv_frame(sock))
            reply_bytes, state_bytes = recv_frame(sock), recv_frame(sock)
    except TimeoutError as err:
        raise SiteWorkerError(
            f"site worker at {path} sent no reply in {timeout:.0f} s; raise the node config "
            f"{WORKER_TIMEOUT_KEY} if local training takes longer"
        ) from err
    except OSError as err:  # refused, reset, closed mid-reply: the worker died
        raise SiteWorkerError(
            f"site worker at {path} failed ({err}); see the site's log and restart "
            "`fedtune site`"
        ) from err
    if not header.get("ok"):
        raise SiteWorkerError(str(header.get("error") or "the site worker failed"))
    reply = message_from_proto(ProtoMessage.FromString(reply_bytes))
    context.state = recorddict_from_proto(ProtoRecordDict.FromString(state_bytes))
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    return Message(reply.content, reply_to=msg)


def handle(msg: Message, context: Context) -> Message:
    """One message at this site: through the warm worker when the node config names
    one, else by fedtune's ClientApp in this process."""
    path = str(context.node_config.get(WORKER_KEY, "") or "")
    if path:
        timeout = float(context.node_config.get(WORKER_TIMEOUT_KEY, DEFAULT_TIMEOUT))
        return forward(msg, context, path, timeout)
    from fedtune.federated.apps import client_app as cold_app

    return cold_app(msg, context)


client_app = ClientApp()
# Every kind of message fedtune's ClientApp answers goes through `handle`.
client_app.train()(handle)
client_app.evaluate()(handle)
client_app.query("personalize")(handle)
client_app.query("knn")(handle)
