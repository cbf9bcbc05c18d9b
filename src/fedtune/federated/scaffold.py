"""SCAFFOLD: control variates that correct each site's drift towards its own optimum
(Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", option II). Written here: Flower (1.41) ships no SCAFFOLD strategy.

The server holds the global state x and a control c (zeros at first) and sends both.
Site i trains from x, moving every trainable tensor by -lr · (c - c_i) after each
optimizer step, ends at y_i and sets

    c_i+ = (x - y_i) / Σ lr  -  (c - c_i)

(Σ lr is the sum of the step learning rates, the paper's K · lr under a schedule);
it replies y_i and Δc_i = c_i+ - c_i. The server sets

    x <- x + eta_g · (Σ n_i y_i / Σ n_i  -  x)     (eta_g = 1: FedAvg's average)
    c <- c + |S| / N · mean_i Δc_i                  (S: the sites of the round, N: all)

The sites train with AdamW, so the correction is applied after the optimizer's step,
in the optimizer's update units (as OpenFedLLM's SCAFFOLD does): c and c_i are then
averages of update directions rather than of raw gradients, and c_i+ is exactly the
site's mean update direction of the round. c_i never leaves its site: it lives in
the site's `Context.state`, checkpointed and resumed with the site's loop state; c
is the strategy's state, checkpointed with it. Both directions carry two states
(x and c down, y_i and Δc_i up), and the byte accounting counts both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.errors import ConfigError

CONTROL = "control"
"""ArrayRecord key of the control state in a message: c down, Δc_i up."""
SITE_CONTROL = "fedtune.scaffold.site_control"
"""Context.state key of a site's own control c_i."""


class Scaffold(FedAvg):
    """FedAvg's sampling and example-weighted average, plus SCAFFOLD's controls."""

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_lr = server_lr
        self.control: dict[str, np.ndarray] = {}
        """The server control c (fp32, by tensor name); empty until the first round."""
        self._start: dict[str, np.ndarray] = {}
        self._all_sites = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._all_sites = len(list(grid.get_node_ids()))
        self._start = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in arrays.items()}
        if not self.control:
            self.control = {k: np.zeros_like(v) for k, v in self._start.items()}
        return messages

    def train_payload(self) -> dict[str, ArrayRecord]:
        """What every training message carries besides the global state."""
        return {CONTROL: ArrayRecord({k: Array(v) for k, v in self.control.items()})}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas = []
        for r in replies:
            if r.has_error():
                continue
            if CONTROL not in r.content.array_records:
                raise ConfigError(
                    "a site replied without its SCAFFOLD control update: every site must run "
                    "a fedtune whose ClientApp knows federated.strategy = 'scaffold'"
                )
            deltas.append(r.content.array_records[CONTROL])
            del r.content[CONTROL]  # Flower's FedAvg expects one ArrayRecord per reply
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not deltas:
            return arrays, metrics
        if self.server_lr != 1.0:
            arrays = ArrayRecord({
                k: Array((x + self.server_lr * (np.asarray(a.numpy()) - x)).astype(np.float32))
                for k, a in arrays.items() for x in [self._start[k]]
            })  # fmt: skip
        share = len(deltas) / max(self._all_sites, len(deltas))
        for k in self.control:
            mean = np.mean([np.asarray(d[k].numpy(), dtype=np.float64) for d in deltas], axis=0)
            self.control[k] = (self.control[k] + share * mean).astype(np.float32)
        return arrays, metrics


# --- the site's side ----------------------------------------------------------------


def site_controls(
    server_control: dict[str, torch.Tensor], state: RecordDict
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(c, c_i): the server's control and this site's own (zeros before its first round)."""
    if SITE_CONTROL in state.array_records:
        own = {k: torch.from_numpy(np.array(a.numpy()))
               for k, a in state.array_records[SITE_CONTROL].items()}  # fmt: skip
    else:
        own = {k: torch.zeros_like(v) for k, v in server_control.items()}
    if own.keys() != server_control.keys():
        raise ConfigError("the server's SCAFFOLD control does not match this site's trainable "
                          "state: same fedtune and run config at every party?")  # fmt: skip
    return server_control, own


def correction(c: dict[str, torch.Tensor], c_i: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """c - c_i: what each local step subtracts (times its learning rate)."""
    return {k: c[k] - c_i[k] for k in c}


def update_site_control(
    state: RecordDict,
    start: dict[str, torch.Tensor],
    end: dict[str, torch.Tensor],
    c: dict[str, torch.Tensor],
    c_i: dict[str, torch.Tensor],
    lr_sum: float,
) -> dict[str, torch.Tensor]:
    """Set c_i+ = (x - y_i) / Σ lr - (c - c_i) in the site's state; returns Δc_i."""
    if lr_sum <= 0:  # no step moved the state (e.g. one warm-up step at lr 0)
        new = dict(c_i)
    else:
        new = {k: (start[k] - end[k].float()) / lr_sum - (c[k] - c_i[k]) for k in c}
    state[SITE_CONTROL] = ArrayRecord({k: Array(v.contiguous().numpy()) for k, v in new.items()})
    return {k: new[k] - c_i[k] for k in c}
