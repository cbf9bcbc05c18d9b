"""Simulated misbehaving sites, for measuring the defences (`federated.attack`).

The first `federated.attackers` sites (partition ids 0..attackers-1) misbehave in
every round; the others are honest. Off by default; the server says on its first
line and in the report that a run was attacked. Faults and attacks:

- `nan`, `inf`: one element of the sent state is NaN / +Inf (a diverged site);
- `shape`: the first tensor is sent one element short (a site on another model);
- `oversize`: the message carries ten times the state's bytes (+ 5 MB) of padding;
- `scale`: the site sends global + attack_scale * update (model replacement);
- `signflip`: global - attack_scale * update;
- `labelflip`: the site trains on its data with every label id y replaced by K-1-y.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedtune.config import FederatedConfig
from fedtune.data import Example
from fedtune.errors import ConfigError
from fedtune.federated.partition import Site

PADDING = "padding"


def check_attack(fed: FederatedConfig) -> None:
    if fed.attack == "none":
        return
    if fed.attackers < 1:
        raise ConfigError(f"federated.attack = {fed.attack!r} needs federated.attackers >= 1")
    if fed.partition == "own":
        raise ConfigError("federated.attack simulates attackers among partitioned sites; "
                          "with partition 'own' every site is partition 0: use another one")
    if fed.attackers > fed.sites:
        raise ConfigError(f"federated.attackers = {fed.attackers} > federated.sites = {fed.sites}")


def attacks(fed: FederatedConfig, pid: int) -> bool:
    """Whether site `pid` misbehaves in this run."""
    return fed.attack != "none" and pid < fed.attackers


def flipped(site: Site, labels: tuple[str, ...]) -> Site:
    """The site with every training label y replaced by labels[K-1-y]."""
    k = {label: i for i, label in enumerate(labels)}
    train = [Example(e.text, labels[len(labels) - 1 - k[e.label]], e.origin, e.site)
             for e in site.train]  # fmt: skip
    return replace(site, train=train)


def attack_state(fed: FederatedConfig, trained: dict[str, torch.Tensor],
                 start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The state an attacking site sends instead of `trained` (the state-level attacks)."""
    out = {k: v.detach().clone().float() for k, v in trained.items()}
    first = next(iter(out))
    if fed.attack in ("nan", "inf"):
        out[first].view(-1)[0] = float("nan") if fed.attack == "nan" else float("inf")
    elif fed.attack in ("scale", "signflip"):
        s = fed.attack_scale if fed.attack == "scale" else -fed.attack_scale
        out = {k: start[k] + s * (v - start[k]) for k, v in out.items()}
    elif fed.attack == "shape":
        out[first] = out[first].reshape(-1)[:-1].clone()
    return out


def attack_message(fed: FederatedConfig, content: RecordDict) -> None:
    """The message-level attack: `oversize` pads the reply with 10x its bytes + 5 MB
    (beyond the default limit, 4x + 1 MB)."""
    if fed.attack == "oversize":
        size = sum(a.numpy().nbytes for a in content.array_records["arrays"].values())
        pad = np.zeros(10 * size + 5_000_000, dtype=np.uint8)
        content[PADDING] = ArrayRecord({PADDING: Array(pad)})
