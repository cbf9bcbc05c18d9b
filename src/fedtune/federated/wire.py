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


def arrays_of(msg: Message, key: str = "arrays") -> ArrayRecord:
    return msg.content.array_records[key]


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
