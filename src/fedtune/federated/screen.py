"""Update validation: every site's reply is checked before it reaches the strategy.

A federation's sites do not fully trust each other, and a reply is untrusted input:
one NaN, one wrongly shaped tensor or one x1000 update in a plain average corrupts the
global model for everyone. The server therefore screens each training reply, always:

1. its serialized size is within `federated.max_update_bytes`;
2. it unpacks (`wire.pack_record`'s layout agrees with the data);
3. it holds exactly the tensors of the global state: same names, shapes, and the
   element type of the run's transport;
4. every element is finite;
5. its number of examples (FedAvg's weight) is a positive finite number;
6. with `federated.update_norm` > 0, the L2 norm of its update (its state minus the
   global state, all tensors together) is within the bound: beyond it the update is
   scaled back onto the bound (`clip`) or the reply is rejected (`reject`); with
   server-side differential privacy (`federated.dp = "server"`) every update is
   clipped to `federated.dp_clip` here (see `privacy`).

A rejected reply drops its site for the round with the reason (metrics.jsonl, the
console line, report.md); the round loop treats the remaining replies as the round's.
Written here: Flower's strategies (1.41) check that replies are consistent with each
other (`validate_message_reply_consistency`) and raise on a mismatch, ending the run;
they do not compare a reply with the global state or bound its size or norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedtune.config import FederatedConfig
from fedtune.federated.scaffold import CONTROL
from fedtune.federated.wire import arrays_of, decode_record, encode_state, message_bytes

NUM_EXAMPLES = "num-examples"


@dataclass
class Screened:
    accepted: list[Message]
    """Replies that passed, their states decoded to fp32 and unpacked."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Site name -> why its reply was dropped."""
    clipped: dict[str, float] = field(default_factory=dict)
    """Site name -> the norm its update had before it was clipped to the bound."""
    norms: dict[str, float] = field(default_factory=dict)
    """Site name -> the L2 norm of its (accepted) update, before any clipping."""


def expected_bytes(global_state: ArrayRecord, transport: str, states: int = 1) -> int:
    """Bytes of tensor data a reply carries: the global state in the transport type,
    `states` times (SCAFFOLD's reply carries two)."""
    enc = encode_state(_tensors(global_state), transport)
    return states * sum(a.numpy().nbytes for a in enc.values())


def size_limit(fed: FederatedConfig, global_state: ArrayRecord, states: int = 1) -> int:
    """`federated.max_update_bytes`, or four times the expected size plus 1 MB."""
    if fed.max_update_bytes > 0:
        return fed.max_update_bytes
    return 4 * expected_bytes(global_state, fed.transport, states) + 1_000_000


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def screen(
    replies: list[Message],
    global_state: ArrayRecord,
    fed: FederatedConfig,
    names: dict[int, str],
    limit: int,
) -> Screened:
    """Check every (non-error) training reply against `global_state` (fp32, the state
    the sites were sent); see the module docstring for the checks."""
    expected = encode_state(_tensors(global_state), fed.transport)
    layout = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in expected.items()}
    start = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in global_state.items()}
    out = Screened([])
    for r in replies:
        node = r.metadata.src_node_id
        name = names.get(node) or (
            str(r.content["site"]["name"]) if r.has_content() and "site" in r.content
            else f"node-{node}"
        )  # fmt: skip
        try:
            norm = _check(r, layout, start, fed, limit)
        except _Rejected as e:
            out.rejected[name] = str(e)
            continue
        out.norms[name] = norm
        if fed.update_norm > 0 and norm > fed.update_norm and fed.update_norm_action == "reject":
            out.rejected[name] = (f"update norm {norm:.4g} exceeds federated.update_norm = "
                                  f"{fed.update_norm:g}")  # fmt: skip
            continue
        bound = min(fed.update_norm if fed.update_norm > 0 else math.inf,
                    fed.dp_clip if fed.dp == "server" else math.inf)
        if norm > bound:
            _clip(r, start, bound / norm)
            out.clipped[name] = norm
        out.accepted.append(r)
    return out


class _Rejected(Exception):
    pass


def _check(
    r: Message,
    layout: dict[str, tuple[tuple[int, ...], np.dtype]],
    start: dict[str, np.ndarray],
    fed: FederatedConfig,
    limit: int,
) -> float:
    """Raise _Rejected with the reason, else decode the reply's states in place and
    return the L2 norm of its update."""
    size = message_bytes(r)
    if size > limit:
        raise _Rejected(f"message of {size:,} bytes exceeds the limit of {limit:,} "
                        "(federated.max_update_bytes)")  # fmt: skip
    if "arrays" not in r.content.array_records:
        raise _Rejected("reply carries no trained state")
    extra = sorted(set(r.content.array_records) - {"arrays", CONTROL})
    if extra:
        raise _Rejected(f"reply carries unexpected records {extra[:3]}")
    weight = r.content.metric_records["metrics"].get(NUM_EXAMPLES) \
        if "metrics" in r.content.metric_records else None  # fmt: skip
    if (isinstance(weight, bool) or not isinstance(weight, int | float)
            or not math.isfinite(weight) or weight <= 0):  # fmt: skip
        raise _Rejected(f"{NUM_EXAMPLES} = {weight!r} is not a positive number")
    keys = ["arrays"] + [CONTROL] * (CONTROL in r.content.array_records)
    for key in keys:
        try:
            record = arrays_of(r, key)
        except Exception as e:  # a layout that does not fit its data
            raise _Rejected(f"{key}: cannot unpack ({e})") from None
        got = set(record)
        if got != set(layout):
            missing, extra = sorted(set(layout) - got), sorted(got - set(layout))
            raise _Rejected(f"{key}: tensor names differ from the global state (missing "
                            f"{missing[:3]}, unexpected {extra[:3]})")  # fmt: skip
        for k, a in record.items():
            shape, dtype = layout[k]
            if tuple(a.shape) != shape or np.dtype(a.dtype) != dtype:
                raise _Rejected(f"{key}: {k} is {np.dtype(a.dtype).name}{list(a.shape)}, "
                                f"expected {dtype.name}{list(shape)}")  # fmt: skip
        decoded = decode_record(record, fed.transport)
        for k, a in decoded.items():
            if not np.isfinite(a.numpy()).all():
                bad = int((~np.isfinite(a.numpy())).sum())
                raise _Rejected(f"{key}: {k} has {bad} non-finite values (NaN or Inf)")
        # In the global state's order: Flower's DP clipping pairs tensors by position.
        r.content[key] = ArrayRecord({k: decoded[k] for k in layout})
    sq = sum(float(np.sum((np.asarray(a.numpy(), np.float64) - start[k]) ** 2))
             for k, a in r.content.array_records["arrays"].items())  # fmt: skip
    return math.sqrt(sq)


def _clip(r: Message, start: dict[str, np.ndarray], factor: float) -> None:
    """Scale the reply's update by `factor` (< 1): state = start + factor * (state - start)."""
    record = r.content.array_records["arrays"]
    r.content["arrays"] = ArrayRecord({
        k: Array((start[k] + factor * (np.asarray(a.numpy(), np.float32) - start[k]))
                 .astype(np.float32))
        for k, a in record.items()
    })  # fmt: skip
