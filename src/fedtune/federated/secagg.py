"""Secure aggregation: Flower's SecAgg+ (Bell et al., 2020) so that the server only
ever sees the weighted sum of the sites' states, never one site's.

Flower 1.41 ships the protocol as `SecAggPlusWorkflow` (server) and `secaggplus_mod`
(site), on its legacy strategy API: the workflow asks a legacy `Strategy` for the
round's `FitIns`, runs four stages over the grid (setup, share keys, collect masked
vectors, unmask) and hands the unmasked weighted average to `Strategy.aggregate_fit`.
The sites quantize their state (clipped to +-`secagg_clip`), mask it with pairwise and
private masks, and send only the masked integers.

What is written here is the bridge to fedtune's round loop, which runs on the Message
API with its own packing and checkpoints: `secure_round` runs one round of the
workflow with a legacy strategy that offers fedtune's packed global state (one flat
fp32 array, its layout in the config) and keeps the aggregate; at the sites
`secagg_mod` applies Flower's mod to SecAgg+ messages only, and `legacy_fit` turns the
collect stage's `FitIns` into fedtune's training and its reply into the `FitRes` the
mod masks. Bytes of every stage's messages are counted.

Limits: the server cannot validate one site's update (it never sees one): it checks
the aggregate (finite, the expected layout). Values are quantized: the aggregate
differs from FedAvg's by at most about `sites * 2 * secagg_clip / 2**22` per element.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedtune.config import FederatedConfig
from fedtune.errors import ConfigError
from fedtune.federated.grid import exchange
from fedtune.federated.wire import (
    LAYOUT,
    PACKED,
    message_bytes,
    pack_record,
    unpack_record,
)

FLAT = PACKED + np.dtype(np.float32).str


def check_secagg(fed: FederatedConfig, method: str) -> None:
    if not fed.secagg:
        return
    if fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"federated.secagg sums the sites' states: federated.strategy = "
                          f"{fed.strategy!r} needs to see each one; use fedavg or fedprox")
    if fed.dp != "off":
        raise ConfigError("federated.secagg with federated.dp is not supported yet: turn one off")
    if fed.transport != "fp32":
        raise ConfigError("federated.secagg quantizes the state itself: federated.transport "
                          "must be fp32")  # fmt: skip
    if method == "features":
        raise ConfigError("federated.secagg needs a method trained by gradient steps (lora, "
                          "ptuning, ...): the features method's weights exceed its range")


# --- the server's side -------------------------------------------------------------


class _Round(LegacyFedAvg):
    """A legacy strategy for one SecAgg+ round: offers every sampled site the same
    FitIns, and keeps the weighted average the workflow computes."""

    def __init__(self, fed: FederatedConfig, config: dict[str, Any]) -> None:
        super().__init__(fraction_fit=fed.fraction, min_fit_clients=max(2, fed.min_sites),
                         min_available_clients=max(2, fed.min_sites))  # fmt: skip
        self.fed = fed
        self.config = config
        self.sampled = 0
        self.results: list[FitRes] = []

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[ClientProxy, FitIns]]:  # fmt: skip
        clients = list(client_manager.all().values())
        n = max(int(len(clients) * self.fed.fraction), max(2, self.fed.min_sites))
        chosen = random.sample(clients, min(n, len(clients)))
        self.sampled = len(chosen)
        return [(c, FitIns(parameters, dict(self.config))) for c in chosen]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:  # fmt: skip
        self.results = [r for _, r in results]
        if not results:
            return None, {}
        # The workflow has put the unmasked weighted average into every result.
        return results[0][1].parameters, {}


class _CountingGrid(Grid):
    """The round's grid, counting the bytes of every message each way."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.down = self.up = self.payload_down = self.payload_up = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    @property
    def run(self) -> Any:
        return self.grid.run

    def set_run(self, run: Any) -> None:  # pragma: no cover - the server's grid has its run
        self.grid.set_run(run)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def _count(self, messages: list[Message], way: str) -> None:
        size = sum(message_bytes(m) for m in messages)
        payload = sum(_data_bytes(m) for m in messages)
        if way == "down":
            self.down, self.payload_down = self.down + size, self.payload_down + payload
        else:
            self.up, self.payload_up = self.up + size, self.payload_up + payload

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count(messages, "down")
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._count(replies, "up")
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # fmt: skip
        """With fedtune's bounded, fast-polling exchange: Flower's Grid.send_and_receive
        sleeps 3 s between polls, and SecAgg+ exchanges four times a round. Sites that
        did not reply in time are left out, as the workflow expects."""
        messages = list(messages)
        self._count(messages, "down")
        replies = exchange(self.grid, messages, 3600.0 if timeout is None else timeout).replies
        self._count(replies, "up")
        return replies


def _data_bytes(m: Message) -> int:
    """Bytes of data a protocol message carries: arrays (legacy, serialized ndarrays)
    and the byte strings in its configs (public keys, ciphertexts, masked vectors)."""
    if not m.has_content():
        return 0
    n = sum(len(a.data) for r in m.content.array_records.values() for a in r.values())
    for rec in m.content.config_records.values():
        for v in rec.values():
            items = v if isinstance(v, list) else [v]
            n += sum(len(x) for x in items if isinstance(x, bytes))
    return n


def secure_round(
    grid: Grid, rnd: int, arrays: ArrayRecord, config: dict[str, Any], fed: FederatedConfig,
    max_weight: float,
) -> dict[str, Any]:  # fmt: skip
    """One round of SecAgg+ over `grid`: returns {"arrays": the new global state or None,
    "sites", "sampled", "train_loss", "bytes_down", "bytes_up"}."""
    wire, layout = pack_record(arrays)
    flat = np.asarray(wire[FLAT].numpy(), dtype=np.float32)
    counting = _CountingGrid(grid)
    strategy = _Round(fed, {**config, LAYOUT: layout})
    manager = SimpleClientManager()
    for node in grid.get_node_ids():
        manager.register(GridClientProxy(node, counting, run_id=grid.run.run_id))
    server_context = Context(run_id=grid.run.run_id, node_id=0, node_config={},
                             state=RecordDict(), run_config={})  # fmt: skip
    context = LegacyContext(server_context, strategy=strategy, client_manager=manager)
    context.state[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([flat]), keep_input=True)  # fmt: skip
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
    before = context.state.array_records[MAIN_PARAMS_RECORD]
    SecAggPlusWorkflow(
        num_shares=fed.secagg_shares, reconstruction_threshold=fed.secagg_threshold,
        clipping_range=fed.secagg_clip, max_weight=max_weight, timeout=fed.timeout,
    )(counting, context)  # fmt: skip
    after = context.state.array_records[MAIN_PARAMS_RECORD]
    out: dict[str, Any] = {"arrays": None, "sampled": strategy.sampled,
                           "sites": len(strategy.results), "bytes_down": counting.down,
                           "bytes_up": counting.up, "payload_down": counting.payload_down,
                           "payload_up": counting.payload_up}  # fmt: skip
    if after is before or not strategy.results:
        return out
    (agg,) = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, keep_input=True))
    agg = np.asarray(agg, dtype=np.float32)
    if agg.shape != flat.shape or not np.isfinite(agg).all():
        raise ConfigError(f"round {rnd}: the securely aggregated state is malformed "
                          f"({agg.shape}, finite {bool(np.isfinite(agg).all())})")  # fmt: skip
    out["arrays"] = unpack_record(ArrayRecord({FLAT: _array(agg)}), layout)
    losses = [(r.num_examples, float(r.metrics.get("train_loss", float("nan"))))
              for r in strategy.results]  # fmt: skip
    total = sum(n for n, _ in losses)
    out["train_loss"] = sum(n * x for n, x in losses) / total if total else float("nan")
    return out


def _array(a: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(a)


# --- the site's side ---------------------------------------------------------------


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ messages; every other message as is
    (Flower's mod expects every training message to be one of the protocol's)."""
    from flwr.client.mod import secaggplus_mod

    if (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records):  # fmt: skip
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_legacy_fit(msg: Message) -> bool:
    """The collect stage's FitIns (legacy records), not a fedtune training message."""
    return msg.has_content() and "arrays" not in msg.content.array_records \
        and any(k.startswith("fitins") for k in msg.content.array_records)  # fmt: skip


def fitins_as_message(msg: Message) -> Message:
    """The collect stage's FitIns as a fedtune training message (packed fp32 state)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    (flat,) = parameters_to_ndarrays(fitins.parameters)
    content = RecordDict({"arrays": ArrayRecord({FLAT: _array(np.asarray(flat, np.float32))}),
                          "config": ConfigRecord(dict(fitins.config))})  # fmt: skip
    inner = Message(content, msg.metadata.dst_node_id, MessageType.TRAIN)
    return inner


def reply_as_fitres(reply: Message, msg: Message, layout: str) -> Message:
    """fedtune's training reply as the FitRes the mod masks: the trained state as one
    flat fp32 array in the server's layout, the number of examples and the metrics."""
    record = unpack_record(reply.content.array_records["arrays"],
                           str(reply.content.config_records["site"][LAYOUT]))  # fmt: skip
    repacked, got = pack_record(ArrayRecord({k: record[k] for k, _, _ in _names(layout)}))
    if got != layout:
        raise ConfigError("the site's state does not match the server's layout")
    metrics: dict[str, bool | bytes | float | int | str] = {
        k: float(v) for k, v in reply.content.metric_records["metrics"].items()
        if isinstance(v, int | float)
    }
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([repacked[FLAT].numpy()]),
                    int(metrics["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _names(layout: str) -> list[tuple[str, str, list[int]]]:
    import json

    return [tuple(x) for x in json.loads(layout)]
