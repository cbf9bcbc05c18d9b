"""Client-level differential privacy: Flower's fixed-clipping DP wrappers and its RDP
accountant (a front of Google's `dp-accounting`), sized to the federation at run time.

`federated.dp = "server"`: the server clips every site's update to `dp_clip` (L2, all
trainable tensors together), averages them with equal weights and adds Gaussian noise
of std `dp_noise * dp_clip / m` (m sites in the round) to the average; the server sees
raw updates. `"client"`: each site clips its own update before it leaves (the clipping
norm comes in the round's config; `clip_update` below), the server adds the same noise.
Both use Flower's `DifferentialPrivacyClientSideFixedClipping` for the noise and the
accounting; in server mode the clipping is done by fedtune's update validation
(`screen`), because Flower's server-side wrapper divides by the update's norm and fails
on a site that sends its state back unchanged (norm 0).

Accounting: every aggregated round is one Gaussian release with noise multiplier z,
composed by Flower's `RdpAccountant` with no amplification by site sampling and the
add-or-remove-one-site relation (the only accounted model Flower's fixed-clipping
wrappers support), so epsilon does not depend on `federated.fraction`. A round that
does not release an aggregate (abandoned, or fewer replies than sites sampled, which
Flower's accounted mode refuses to aggregate) spends nothing.

What is written here: choosing z for a target epsilon (`dp_accounting`'s calibration
over the run's rounds), sizing the wrappers to the number of connected sites when a
round starts (Flower fixes `num_sampled_clients` at construction; fedtune learns the
sites from the grid), and keeping the accountant in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    compute_clip_model_update,
    get_norm,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedtune.config import FederatedConfig
from fedtune.errors import ConfigError

UNIT_WEIGHT = "unit-weight"
"""Metric every site sends as 1: the DP average weighs sites equally (the sensitivity of
a weighted average is not `dp_clip / m`), so the inner FedAvg weighs by this key."""
CLIPPING_NORM = KEY_CLIPPING_NORM


def noise_for_epsilon(epsilon: float, delta: float, rounds: int) -> float:
    """The noise multiplier z whose `rounds` Gaussian releases (no amplification) spend
    `epsilon` at `delta` under RDP accounting (dp-accounting's calibration)."""
    import dp_accounting
    from dp_accounting import dp_event, rdp

    def accountant() -> Any:
        return rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        )

    def event(z: float) -> Any:
        return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), rounds)

    return float(dp_accounting.calibrate_dp_mechanism(
        accountant, event, epsilon, delta,
        bracket_interval=dp_accounting.mechanism_calibration.ExplicitBracketInterval(1e-3, 1e4),
    ))  # fmt: skip


def noise_multiplier(fed: FederatedConfig) -> float:
    """`federated.dp_noise`, or the noise that spends `dp_epsilon` over the run's rounds."""
    if fed.dp_noise > 0:
        return fed.dp_noise
    if fed.dp_epsilon > 0:
        return noise_for_epsilon(fed.dp_epsilon, fed.dp_delta, fed.rounds)
    raise ConfigError(
        f"federated.dp = {fed.dp!r} needs a privacy level: set federated.dp_epsilon (a target "
        "for the whole run, e.g. 8) or federated.dp_noise (the noise multiplier, e.g. 1.0)"
    )


class _Sized:
    """Mixin: size the wrapper to the connected sites at the start of every round and
    create the accountant for that population (restored from a checkpoint if given)."""

    fed: FederatedConfig
    num_sampled_clients: int
    accountant: Any
    restore: dict[str, Any] | None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        n = len(list(grid.get_node_ids()))
        self.num_sampled_clients = max(int(n * self.fed.fraction), max(1, self.fed.min_sites))
        if self.accountant is None:
            self.accountant = RdpAccountant(PrivacyConfig(
                target_delta=self.fed.dp_delta, population_size=n,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            ))  # fmt: skip
            if self.restore:
                self.accountant.load_state_dict(self.restore)
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        if self.fed.dp == "server":  # the server clips (screen): the sites must not
            for m in messages:
                conf = m.content.config_records["config"]
                if KEY_CLIPPING_NORM in conf:
                    del conf[KEY_CLIPPING_NORM]
        return messages

    def epsilon(self) -> float:
        """Epsilon spent so far at `dp_delta` (0 before the first release)."""
        if self.accountant is None or self.accountant.num_releases == 0:
            return 0.0
        return float(self.accountant.get_privacy_spent().epsilon)

    def accountant_state(self) -> dict[str, Any] | None:
        return self.accountant.state_dict() if self.accountant is not None else self.restore


class PrivateStrategy(_Sized, DifferentialPrivacyClientSideFixedClipping):
    """Noise on the average of clipped updates, and the privacy account."""


def wrap(inner: FedAvg, fed: FederatedConfig) -> PrivateStrategy:
    """`inner` (FedAvg or FedProx, weighing sites equally) with `fed.dp`'s wrapper."""
    if fed.dp_clip <= 0:
        raise ConfigError(f"federated.dp_clip = {fed.dp_clip} must be > 0")
    if not 0 < fed.dp_delta < 1:
        raise ConfigError(f"federated.dp_delta = {fed.dp_delta} must be in (0, 1)")
    z = noise_multiplier(fed)
    # Built without an accountant: Flower's constructor checks the accounted setup, which
    # fedtune guarantees (FedAvg's aggregate, unit weights, no amplification); the
    # accountant is created when the first round learns the number of sites.
    strategy = PrivateStrategy(inner, z, fed.dp_clip, 1)
    strategy.fed, strategy.restore = fed, None
    return strategy


def clip_update(state: dict[str, Any], start: dict[str, Any], norm: float) -> None:
    """A site's side of client-side DP: state <- start + clip(state - start, norm), in
    place (Flower's `compute_clip_model_update` on the tensors as numpy arrays)."""
    keys = list(state)
    new = [state[k].detach().cpu().float().numpy().copy() for k in keys]
    old = [np.asarray(start[k].detach().cpu().float().numpy()) for k in keys]
    if get_norm([a - b for a, b in zip(new, old, strict=True)]) == 0:
        return  # nothing to clip (and Flower's clipping would divide by zero)
    compute_clip_model_update(new, old, norm)
    import torch

    for k, v in zip(keys, new, strict=True):
        state[k] = torch.from_numpy(np.asarray(v, dtype=np.float32))
