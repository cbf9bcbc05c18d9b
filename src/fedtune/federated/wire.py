"""What crosses a site boundary, and how much of it.

- The trainable state travels as a Flower `ArrayRecord` in the transport element
  type (fp32, fp16 or bf16). numpy has no bfloat16, so bf16 tensors travel as their
  raw 16-bit patterns (int16) and the message's config says so; the receiver
  turns everything back into fp32 before use. Written here: Flower ships arrays
  as numpy, with no notion of a lossy transport type.
- Byte accounting: `message_bytes` is the size of the serialized Flower message
  (protobuf: metadata, keys, numpy headers and data) — what a transport carries;
  `payload_bytes` is the tensor data alone (elements x bytes per element).
- A site's loop state (`TrainSession`) is kept in the node's `Context.state`
  between rounds, as records, so it survives wherever Flower keeps that state.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import serde

from fedtune.errors import ConfigError

TRANSPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SESSION_ARRAYS = "fedtune.session.arrays"
SESSION_META = "fedtune.session.meta"


def _dtype(transport: str) -> torch.dtype:
    try:
        return TRANSPORT_DTYPES[transport]
    except KeyError:
        raise ConfigError(
            f"federated.transport = {transport!r} is not one of {', '.join(TRANSPORT_DTYPES)}"
        ) from None


def encode_state(state: dict[str, torch.Tensor], transport: str = "fp32") -> ArrayRecord:
    """A trainable state as an ArrayRecord with floating tensors in `transport`."""
    dtype = _dtype(transport)
    arrays: dict[str, Array] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(dtype)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        arrays[name] = Array(t.contiguous().numpy())
    return ArrayRecord(arrays)


def decode_state(record: ArrayRecord, transport: str = "fp32") -> dict[str, torch.Tensor]:
    """The inverse of `encode_state`: fp32 tensors (bf16 bit patterns restored)."""
    _dtype(transport)
    out = {}
    for name, arr in record.items():
        t = torch.from_numpy(np.array(arr.numpy()))  # copy: writable, owned
        if transport == "bf16" and t.dtype == torch.int16:
            t = t.view(torch.bfloat16)
        out[name] = t.float() if t.is_floating_point() else t
    return out


def decode_record(record: ArrayRecord, transport: str) -> ArrayRecord:
    """An ArrayRecord as fp32 numpy arrays, for aggregation by Flower's strategies."""
    if transport == "fp32":
        return record
    return ArrayRecord({k: Array(v.numpy()) for k, v in decode_state(record, transport).items()})


PACKED = "fedtune.packed."
"""Key prefix of a packed ArrayRecord: one flat array per element type."""
LAYOUT = "layout"
"""ConfigRecord key (in a message's "config"/"site" record) of a packed record's
layout: JSON [[name, dtype, shape], ...] in packing order."""


def pack_record(record: ArrayRecord) -> tuple[ArrayRecord, str]:
    """`record` as one flat array per element type, and its layout (JSON).

    Flower (1.41) moves every Array of a message as an object of its own, one
    request each way over the SuperLink: a LoRA state of ~70 tensors took 2-5 s per
    message on loopback. Packed, a message carries one array (two with integer
    tensors). Elementwise aggregation is unchanged (the mean of concatenations is
    the concatenation of means), but the server unpacks before its strategy runs."""
    groups: dict[str, list[np.ndarray]] = {}
    layout = []
    for name, arr in record.items():
        a = np.ascontiguousarray(arr.numpy())
        groups.setdefault(a.dtype.str, []).append(a.reshape(-1))
        layout.append([name, a.dtype.str, list(a.shape)])
    packed = ArrayRecord({PACKED + dt: Array(np.concatenate(parts))
                          for dt, parts in groups.items()})  # fmt: skip
    return packed, json.dumps(layout)


def unpack_record(record: ArrayRecord, layout: str) -> ArrayRecord:
    """The inverse of `pack_record`; a record that is not packed is returned as is."""
    if not any(k.startswith(PACKED) for k in record):
        return record
    flat = {k[len(PACKED):]: np.asarray(a.numpy()) for k, a in record.items()}
    used = dict.fromkeys(flat, 0)
    out: dict[str, Array] = {}
    for name, dt, shape in json.loads(layout):
        n = math.prod(shape)
        start = used[dt]
        if start + n > len(flat[dt]):
            raise ConfigError(f"packed state too short for {name} {shape}: sender and "
                              "receiver disagree on the trainable state (same fedtune and "
                              "config at every party?)")  # fmt: skip
        out[name] = Array(flat[dt][start : start + n].reshape(shape).copy())
        used[dt] = start + n
    if any(used[dt] != len(flat[dt]) for dt in flat):
        raise ConfigError("packed state longer than its layout says")
    return ArrayRecord(out)


def arrays_of(msg: Message, key: str = "arrays") -> ArrayRecord:
    """The message's ArrayRecord `key`, unpacked when it was packed (`pack_record`;
    the layout rides in the message's "config" or "site" ConfigRecord)."""
    record = msg.content.array_records[key]
    for holder in ("config", "site"):
        conf = msg.content.config_records.get(holder)
        if conf is not None and LAYOUT in conf:
            return unpack_record(record, str(conf[LAYOUT]))
    return record


def config_of(msg: Message, key: str = "config") -> dict[str, Any]:
    return dict(msg.content.config_records[key]) if key in msg.content.config_records else {}


def metrics_of(msg: Message, key: str = "metrics") -> dict[str, float]:
    return {k: float(v) for k, v in msg.content.metric_records[key].items()}  # type: ignore[arg-type]


def payload_bytes(record: ArrayRecord) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


def message_bytes(message: Message) -> int:
    """Size of the message serialized as Flower's protobuf `Message`."""
    return int(serde.message_to_proto(message).ByteSize())


def message_payload_bytes(message: Message) -> int:
    if not message.has_content():
        return 0
    return sum(payload_bytes(r) for r in message.content.array_records.values())


def roundtrip(message: Message) -> Message:
    """Serialize and parse a message, as a transport would: the receiver gets a
    copy built from bytes, never a reference to the sender's objects."""
    from flwr.proto.message_pb2 import Message as ProtoMessage

    proto = ProtoMessage.FromString(serde.message_to_proto(message).SerializeToString())
    return serde.message_from_proto(proto)


# --- a site's loop state between rounds ----------------------------------------


def save_session(state: RecordDict, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state[SESSION_ARRAYS] = ArrayRecord(
        {k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()}
    )
    state[SESSION_META] = ConfigRecord({"json": json.dumps(meta)})


def load_session(state: RecordDict) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    if SESSION_META not in state:
        return None
    arrays = state.array_records[SESSION_ARRAYS]
    tensors = {k: torch.from_numpy(np.array(a.numpy())) for k, a in arrays.items()}
    meta = json.loads(str(state.config_records[SESSION_META]["json"]))
    return tensors, meta


def recorddict_bytes(state: RecordDict) -> bytes:
    return bytes(serde.recorddict_to_proto(state).SerializeToString())


def recorddict_from_bytes(data: bytes) -> RecordDict:
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return serde.recorddict_from_proto(ProtoRecordDict.FromString(data))
