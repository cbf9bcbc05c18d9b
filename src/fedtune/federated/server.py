"""The server side of a federation: strategies, the round loop, byte accounting,
checkpoints and resume.

The aggregation rules are Flower's (`flwr.serverapp.strategy`: FedAvg, FedProx,
FedAdam, FedYogi, FedAvgM), plus SCAFFOLD (`fedtune.federated.scaffold`). The round
loop is written here instead of calling `Strategy.start`, because `start` always
begins at round 1 and keeps the server optimizer's state to itself: fedtune
checkpoints after every round (global state, strategy state, round, RNG, metrics)
and resumes from there, measures every message, encodes the transport type, and
stops on a validation plateau.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from rich.console import Console
from rich.markup import escape
from safetensors.torch import load_file, save_file

import fedtune
from fedtune.config import FederatedConfig, RunConfig
from fedtune.errors import ConfigError
from fedtune.evaluate import Metrics, check_select_by, selection_key, val_line
from fedtune.federated.apps import VERSION_KEY, Workspace, workspace
from fedtune.federated.attacks import check_attack
from fedtune.federated.grid import NO_REPLY, exchange
from fedtune.federated.privacy import UNIT_WEIGHT, PrivateStrategy, wrap
from fedtune.federated.scaffold import Scaffold
from fedtune.federated.screen import Screened, screen, size_limit
from fedtune.federated.secagg import check_secagg, secure_round
from fedtune.federated.wire import (
    LAYOUT,
    decode_state,
    encode_state,
    message_bytes,
    message_payload_bytes,
    metrics_of,
    pack_record,
)
from fedtune.methods import is_frozen
from fedtune.runs import METRICS_FILE, MODEL_DIR, append_jsonl

log = logging.getLogger("fedtune.federated")

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"


def build_strategy(fed: FederatedConfig, lr: float, method: str = "") -> Strategy:
    """Flower's strategy for `fed.strategy`, configured from the run config (`method`:
    the run's method, checked against strategies that need gradient steps), wrapped in
    Flower's differential-privacy wrapper with `fed.dp`."""
    check_attack(fed)
    check_secagg(fed, method)
    check_personalization(fed)
    if fed.dp == "off":
        return _base_strategy(fed, lr, method)
    if fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(
            f"federated.dp = {fed.dp!r} adds noise calibrated to a plain average of clipped "
            f"updates; federated.strategy = {fed.strategy!r} is not one: use fedavg or fedprox"
        )
    return wrap(_base_strategy(fed, lr, method, weighted_by_key=UNIT_WEIGHT), fed)


def check_personalization(fed: FederatedConfig) -> None:
    """Personalization is scored on each site's own validation set: a setting that
    has none fails here, before the first round, not after the last one."""
    if fed.personalize_epochs < 0:
        raise ConfigError(
            f"federated.personalize_epochs = {fed.personalize_epochs} must be >= 0 (0 = off)"
        )
    if fed.personalize_epochs > 0 and fed.validation != "site":
        raise ConfigError(
            f"federated.personalize_epochs = {fed.personalize_epochs} reports each site's "
            "global and personalized model on the site's own validation set, and "
            f"federated.validation = {fed.validation!r} gives the sites none: set "
            "federated.validation = 'site' (or personalize_epochs = 0)"
        )


ROBUST = ("krum", "multikrum", "bulyan", "median", "trimmedmean")


def _base_strategy(fed: FederatedConfig, lr: float, method: str = "",
                   weighted_by_key: str = "num-examples") -> FedAvg:  # fmt: skip
    # Flower logs each sampling/aggregation step (and a warning when federated
    # evaluation is off, which is the shared-validation setup); fedtune prints
    # one line per round instead.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    common: dict[str, Any] = {
        "fraction_train": fed.fraction,
        "fraction_evaluate": 1.0 if fed.validation == "site" else 0.0,
        "min_train_nodes": max(1, fed.min_sites),
        "min_evaluate_nodes": max(1, fed.min_sites) if fed.validation == "site" else 0,
        "min_available_nodes": max(1, fed.min_sites),
        "weighted_by_key": weighted_by_key,
    }
    if not 0 < fed.fraction <= 1:
        raise ConfigError(f"federated.fraction = {fed.fraction} must be in (0, 1]")
    if fed.min_sites > fed.sites and fed.partition not in ("column", "own"):
        raise ConfigError(f"federated.min_sites = {fed.min_sites} > federated.sites = {fed.sites}")
    if fed.rounds < 1:
        raise ConfigError(f"federated.rounds = {fed.rounds} must be at least 1")
    if fed.local_batch_size < 0:
        raise ConfigError(f"federated.local_batch_size = {fed.local_batch_size} must be >= 1 "
                          "(or 0: train.batch_size)")  # fmt: skip
    if fed.strategy == "fedavg":
        return FedAvg(**common)
    if fed.strategy == "fedprox":
        return FedProx(**common, proximal_mu=fed.proximal_mu)
    if fed.strategy in ("fedadam", "fedyogi"):
        cls = FedAdam if fed.strategy == "fedadam" else FedYogi
        return cls(**common, eta=fed.server_lr or 1e-2, eta_l=lr, beta_1=fed.beta_1,
                   beta_2=fed.beta_2, tau=fed.tau)  # fmt: skip
    if fed.strategy == "fedavgm":
        return FedAvgM(**common, server_learning_rate=fed.server_lr or 1.0,
                       server_momentum=fed.server_momentum)  # fmt: skip
    if fed.strategy == "scaffold":
        if method and is_frozen(method):
            raise ConfigError(f"federated.strategy = 'scaffold' corrects gradient steps; method "
                              f"{method} has none: use fedavg or fedprox")  # fmt: skip
        return Scaffold(**common, server_lr=fed.server_lr or 1.0)
    if fed.strategy in ROBUST:
        return _robust(fed, common)
    raise ConfigError(f"unknown federated.strategy {fed.strategy!r}")  # pragma: no cover


def _robust(fed: FederatedConfig, common: dict[str, Any]) -> FedAvg:
    """Flower's Byzantine-robust rules. Each compares the sites' states (their updates
    from one global state), so a site's update is judged against the others'."""
    f = fed.malicious
    if f < 0:
        raise ConfigError(f"federated.malicious = {f} must be >= 0")
    known = fed.partition not in ("column", "own")  # else the number of sites comes later
    if fed.strategy == "median":
        return FedMedian(**common)
    if fed.strategy == "trimmedmean":
        if not 0 <= fed.trim < 0.5:
            raise ConfigError(f"federated.trim = {fed.trim} must be in [0, 0.5)")
        return FedTrimmedAvg(**common, beta=fed.trim)
    if fed.strategy == "bulyan":
        if known and fed.sites < 4 * f + 3:
            raise ConfigError(f"bulyan needs at least 4 * malicious + 3 = {4 * f + 3} sites, "
                              f"the run has {fed.sites}: lower federated.malicious or use "
                              "multikrum / trimmedmean")  # fmt: skip
        return Bulyan(**common, num_malicious_nodes=f)
    if known and fed.sites < 2 * f + 3:
        raise ConfigError(f"{fed.strategy} needs at least 2 * malicious + 3 = {2 * f + 3} sites, "
                          f"the run has {fed.sites}: lower federated.malicious")  # fmt: skip
    if fed.strategy == "krum":
        return Krum(**common, num_malicious_nodes=f)
    keep = fed.krum_keep or max(1, fed.sites - f)
    return MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=keep)


# --- strategy state: the server optimizer's moments, for checkpoints ------------


def strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """Every array-valued attribute of a Flower strategy (FedOpt's m_t/v_t and
    current arrays, FedAvgM's momentum, SCAFFOLD's control), found generically so
    that a strategy added later is checkpointed too. Private attributes (`_name`) are
    a round's scratch, set again by the next `configure_train`, and are left out."""
    out: dict[str, torch.Tensor] = {}
    for attr, v in vars(strategy).items():
        if attr.startswith("_"):
            continue
        if isinstance(v, ArrayRecord):
            out |= {f"{attr}|rec|{k}": torch.from_numpy(np.array(a.numpy())) for k, a in v.items()}
        elif isinstance(v, dict) and v and all(isinstance(x, np.ndarray) for x in v.values()):
            out |= {f"{attr}|dict|{k}": torch.from_numpy(np.array(x)) for k, x in v.items()}
        elif isinstance(v, list) and v and all(isinstance(x, np.ndarray) for x in v):  # FedAvgM
            out |= {f"{attr}|list|{i:06d}": torch.from_numpy(np.array(x)) for i, x in enumerate(v)}
    return out


def load_strategy_state(strategy: Strategy, tensors: dict[str, torch.Tensor]) -> None:
    from flwr.app import Array

    found: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        attr, kind, name = key.split("|", 2)
        found.setdefault(attr, {"kind": kind, "items": {}})["items"][name] = t.numpy()
    for attr, spec in found.items():
        items = spec["items"]
        if spec["kind"] == "rec":
            value: Any = ArrayRecord({k: Array(v) for k, v in items.items()})
        elif spec["kind"] == "dict":
            value = dict(items)
        else:
            value = [items[k] for k in sorted(items)]
        setattr(strategy, attr, value)


# --- the state a checkpoint holds ------------------------------------------------


@dataclass
class FederationState:
    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per round: val metrics (shared and/or site), train loss, sites, bytes."""
    traffic: list[dict[str, Any]] = field(default_factory=list)
    """One record per message: round, site, direction, bytes, payload_bytes."""
    best_round: int = 0
    best_val_loss: float = float("inf")
    """The shared validation loss of the round kept (the lowest unless `train.select_by`
    names a metric)."""
    best_val_score: float = float("nan")
    """The `train.select_by` value of the round kept."""
    stopped_early: bool = False
    complete: bool = False
    seconds: float = 0.0
    privacy: dict[str, Any] | None = None
    """With federated.dp: the privacy accountant's state (Flower's `state_dict`)."""


def write_checkpoint(
    out: Path,
    state: FederationState,
    arrays: ArrayRecord,
    best: ArrayRecord,
    strategy: Strategy,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Atomically replace `out/checkpoint` (written beside it, then renamed)."""
    tmp, final, old = (out / f"{CHECKPOINT_DIR}{s}" for s in (".tmp", "", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(decode_state(arrays), str(tmp / "global.safetensors"))
    save_file(decode_state(best), str(tmp / "best.safetensors"))
    sstate = strategy_state(strategy)
    if sstate:
        save_file({k: v.contiguous() for k, v in sstate.items()}, str(tmp / "strategy.safetensors"))
    meta = {
        "state": state.__dict__,
        "python_random": _random_state(),
        "torch_rng": torch.get_rng_state().tolist(),
        "strategy": type(strategy).__name__,
    }
    (tmp / STATE_FILE).write_text(json.dumps(meta, default=float), encoding="utf-8")
    if extra:
        extra(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        if (out / name / STATE_FILE).is_file():
            return out / name
    return None


def _random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def checkpoint_state(ckpt: Path) -> FederationState:
    """The round state of a checkpoint folder (`find_checkpoint`), nothing restored."""
    return FederationState(**json.loads((ckpt / STATE_FILE).read_text("utf-8"))["state"])


def read_checkpoint(
    ckpt: Path, strategy: Strategy
) -> tuple[FederationState, ArrayRecord, ArrayRecord]:
    meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    if meta["strategy"] != type(strategy).__name__:
        raise ConfigError(
            f"{ckpt} was written by strategy {meta['strategy']}, not {type(strategy).__name__}; "
            "resume with the run's own config"
        )
    state = FederationState(**meta["state"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    if (ckpt / "strategy.safetensors").is_file():
        load_strategy_state(strategy, load_file(str(ckpt / "strategy.safetensors")))
    arrays = encode_state(load_file(str(ckpt / "global.safetensors")))
    best = encode_state(load_file(str(ckpt / "best.safetensors")))
    return state, arrays, best


# --- the round loop --------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"  # pragma: no cover


@dataclass
class Outcome:
    state: FederationState
    best: ArrayRecord
    test: Metrics
    personalized: list[dict[str, Any]]
    workspace: Workspace


def _site_name(msg: Message, fallback: int) -> str:
    if msg.has_content() and "site" in msg.content:
        return str(msg.content["site"]["name"])
    return f"node-{fallback}"


def _by_site(replies: list[Message], names: dict[int, str]) -> list[Message]:
    """The sites' good replies in the order of their names, as `query.federated_answers`
    reads them. Aggregation sums in this order, and float sums depend on it: in node
    order, a deployed federation (node ids drawn at random) would round differently
    from the same run in process, and from its own rerun; a robust rule's ties would
    go to other sites."""
    ok = [r for r in replies if not r.has_error()]
    return sorted(ok, key=lambda r: names.get(r.metadata.src_node_id)
                  or _site_name(r, r.metadata.src_node_id))  # fmt: skip


def _send(
    grid: Grid, messages: list[Message], state: FederationState, rnd: int, kind: str,
    transport: str, timeout: float, names: dict[int, str], timing: dict[str, Any] | None = None,
) -> list[Message]:  # fmt: skip
    """Send, receive, account every message in both directions (trained states stay
    as sent: `screen` checks and decodes them).
    A site that sent no reply in time gets an error reply here ("no reply in N s"), so
    that it is reported as failed like a site whose ClientApp raised. `timing` gets
    the seconds the push took and, by site, when its reply came (from the push's
    start)."""
    for m in messages:
        state.traffic.append({
            "round": rnd, "kind": kind, "direction": "down",
            "site": names.get(m.metadata.dst_node_id, f"node-{m.metadata.dst_node_id}"),
            "bytes": message_bytes(m), "payload_bytes": message_payload_bytes(m),
        })  # fmt: skip
    got = exchange(grid, messages, timeout)
    if got.ignored:
        log.warning("round %d: ignored %d stale or duplicate replies", rnd, got.ignored)
    replies = got.replies
    by_node = {m.metadata.dst_node_id: m for m in messages}
    for node in got.missing:
        reason = f"no reply in {timeout:g} s (site down or too slow: federated.timeout)"
        replies.append(Message(Error(code=NO_REPLY, reason=reason), reply_to=by_node[node]))
    arrived: dict[str, float] = {}
    for i, r in enumerate(replies):
        node = r.metadata.src_node_id
        name = names.get(node) or _site_name(r, node)
        names.setdefault(node, name)
        if i < len(got.arrived):
            arrived[name] = got.arrived[i]
        state.traffic.append({
            "round": rnd, "kind": kind, "direction": "up", "site": name,
            "bytes": message_bytes(r), "payload_bytes": message_payload_bytes(r),
            "error": r.error.reason if r.has_error() else "",
        })  # fmt: skip
    if timing is not None:
        timing |= {"push": got.pushed, "replies": arrived}
    return replies


def _record_failures(record: dict[str, Any], key: str, replies: list[Message],
                     names: dict[int, str], console: Console, what: str,
                     keep_empty: bool = True) -> dict[str, str]:  # fmt: skip
    """The sites whose replies are errors, by name, into `record[key]` (with the time
    in `record[key + "_at"]` when there are any), each said on the console."""
    failed = {names.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}"):
              str(r.error.reason) for r in replies if r.has_error()}  # fmt: skip
    if failed or keep_empty:
        record[key] = failed
    if failed:
        record[f"{key}_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for site, reason in failed.items():
            console.print(f"[yellow]round {record['round']}: site {escape(site)} {what}:[/] "
                          f"{escape(reason)}")  # fmt: skip
    return failed


def _set_payload(messages: list[Message], arrays: ArrayRecord, transport: str,
                 extra: dict[str, ArrayRecord] | None = None) -> None:  # fmt: skip
    """Put the global state (and `extra` states of the same layout: SCAFFOLD's control),
    encoded once in the transport type, into every message (Flower's strategies may
    share one content record among the messages)."""
    wire, layout = pack_record(encode_state(decode_state(arrays), transport))
    others = {k: pack_record(encode_state(decode_state(r), transport))
              for k, r in (extra or {}).items()}  # fmt: skip
    assert all(lay == layout for _, lay in others.values()), "extra states share the layout"
    for m in messages:
        m.content["arrays"] = wire
        for key, (packed, _) in others.items():
            m.content[key] = packed
        m.content.config_records["config"][LAYOUT] = layout
        m.content.config_records["config"]["transport"] = transport
        m.content.config_records["config"][VERSION_KEY] = fedtune.__version__


def run_server(
    grid: Grid,
    cfg: RunConfig,
    out: Path | None,
    console: Console | None = None,
    resume: Path | None = None,
    save_extra: Callable[[Path], None] | None = None,
    site_names: dict[int, str] | None = None,
) -> Outcome:
    """Run the federation of `cfg` over `grid`; with `out`, write checkpoints
    (every round), metrics.jsonl and the global model there. `resume` is a run
    directory whose checkpoint to continue from."""
    console = console or Console()
    fed = cfg.federated
    select_by = cfg.train.select_by
    check_select_by(select_by, cfg.data.task)  # before the model loads
    ws = workspace(cfg)
    model = ws.model
    strategy = build_strategy(fed, cfg.method.lr, cfg.method_name)
    has_val = bool(ws.splits.validation)
    check_select_by(select_by, cfg.data.task, has_validation=has_val)
    state = FederationState()
    # Flower's strategies sample sites with the global `random` module: seed it, so
    # that a run is reproducible (the checkpoint carries its state on from there).
    random.seed(cfg.seed)
    arrays = encode_state(ws.initial_state)
    best = arrays
    if resume is not None:
        ckpt = find_checkpoint(resume)
        if ckpt is None:
            raise ConfigError(f"{resume} holds no checkpoint to resume from")
        state, arrays, best = read_checkpoint(ckpt, strategy)
        if state.complete:
            raise ConfigError(f"{resume} is a finished run (all rounds done); nothing to resume")
        console.print(f"resuming after round {state.round} from {escape(str(ckpt))}")
        if isinstance(strategy, PrivateStrategy):
            strategy.restore = state.privacy
    if fed.attack != "none":
        console.print(f"[bold red]simulated attack:[/] the first {fed.attackers} site(s) send "
                      f"{fed.attack} updates (federated.attack)")  # fmt: skip
    if isinstance(strategy, PrivateStrategy):
        console.print(f"differential privacy ({fed.dp}-side clipping to {fed.dp_clip:g}): "
                      f"noise multiplier {strategy.noise_multiplier:.4g}, delta {fed.dp_delta:g}")
    limit_states = 2 if isinstance(strategy, Scaffold) else 1
    # SecAgg+: a site's weight is its number of examples, quantized relative to the largest.
    max_weight = float(max((len(s.train) for s in ws.partition.sites), default=1000))
    if fed.secagg:
        console.print("secure aggregation (SecAgg+): the server sees only the sum of the "
                      "sites' states")  # fmt: skip
    # node id -> site name: given in process, else learnt from the sites' replies
    names: dict[int, str] = dict(site_names or {})
    t_start = time.perf_counter() - state.seconds

    def evaluate_global(record: ArrayRecord, select: bool = True) -> Metrics | None:
        """The global model on the shared validation set; generation decodes it only
        where `train.select_by` needs its answers (not for round 0, never kept)."""
        if not has_val:
            return None
        model.load_trainable_state(decode_state(record))
        decode = select and select_by != "loss"
        return ws.evaluate("shared-val", ws.splits.validation, generate=decode)

    if state.round == 0 and not state.history:
        m0 = evaluate_global(arrays, select=False)
        rec0: dict[str, Any] = {"round": 0}
        if m0 is not None:
            rec0 |= {f"val_{k}": v for k, v in m0.summary().items()}
            console.print(f"  round   0{val_line(rec0)}")
        state.history.append(rec0)

    bad_rounds = 0
    if state.best_round:
        bad_rounds = state.round - state.best_round
    for rnd in range(state.round + 1, fed.rounds + 1):
        if state.stopped_early:
            break
        t_round = time.perf_counter()
        record: dict[str, Any]
        timing: dict[str, Any]
        if fed.secagg:
            arrays, record, timing = _secure_round(grid, rnd, arrays, fed, state, console,
                                                   max_weight)  # fmt: skip
            screened = Screened([])
        else:
            train_msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
            for msg in train_msgs:  # a site's share of a global objective (features: L2 weight)
                msg.content.config_records["config"]["sites-in-round"] = len(train_msgs)
            _set_payload(train_msgs, arrays, fed.transport,
                         strategy.train_payload() if isinstance(strategy, Scaffold) else None)
            # Where a round's time goes: the exchange (push, the sites' work, replies as
            # they came) and the server's own work (validation).
            timing = {}
            t_send = time.perf_counter()
            replies = _send(grid, train_msgs, state, rnd, "train", fed.transport, fed.timeout,
                            names, timing)  # fmt: skip
            timing["exchange"] = time.perf_counter() - t_send
            ok = _by_site(replies, names)
            record = {"round": rnd, "sampled": len(train_msgs)}
            failed = _record_failures(record, "failed", replies, names, console, "dropped out")
            screened = screen(ok, arrays, fed, names, size_limit(fed, arrays, limit_states))
            ok = screened.accepted
            record |= {"sites": len(ok), "rejected": screened.rejected, "clipped": screened.clipped,
                       "update_norms": screened.norms}  # fmt: skip
            for site, reason in screened.rejected.items():
                console.print(f"[yellow]round {rnd}: update of site {escape(site)} rejected:[/] "
                              f"{escape(reason)}")  # fmt: skip
            if len(ok) < max(1, fed.min_sites):
                record["abandoned"] = True
                problems = failed | screened.rejected
                console.print(
                    f"[yellow]round {rnd}: {len(ok)} of {len(train_msgs)} sites sent an accepted "
                    f"update, fewer than federated.min_sites = {fed.min_sites}; round abandoned, "
                    f"global state unchanged[/] {escape(str(problems))}"
                )
                if not ok and replies and len(problems) == len(replies) and rnd == 1:
                    raise ConfigError(f"every site failed in round 1: {problems}")
            else:
                new_arrays, train_metrics = strategy.aggregate_train(rnd, ok)
                if new_arrays is None:
                    record["abandoned"] = True
                    why = ("differential privacy aggregates a round only when every sampled site's "
                           "update is accepted" if isinstance(strategy, PrivateStrategy)
                           else f"{fed.strategy} had too few updates to aggregate")  # fmt: skip
                    console.print(f"[yellow]round {rnd}: round abandoned, global state unchanged "
                                  f"({why})[/]")  # fmt: skip
                else:
                    # Flower's average is fp32 for fp32 states (numpy 2 keeps an fp32
                    # array times a Python float in fp32; a server optimizer's own arithmetic
                    # may leave float64); the global state is fp32 (as
                    # trained, sent and checkpointed), so a resumed run continues bit for
                    # bit. An fp32 sum rounds by its order: hence `_by_site`.
                    arrays = encode_state(decode_state(new_arrays))
                if train_metrics is not None:
                    record["train_loss"] = float(train_metrics["train_loss"])  # type: ignore[arg-type]
                if isinstance(strategy, PrivateStrategy):
                    record["epsilon"] = strategy.epsilon()
                    record["noise_multiplier"] = strategy.noise_multiplier
                    state.privacy = strategy.accountant_state()
                record["site_train_seconds"] = {
                    _site_name(r, r.metadata.src_node_id): metrics_of(r)["train_seconds"]
                    for r in ok
                }
                record["site_train_loss"] = {
                    _site_name(r, r.metadata.src_node_id): metrics_of(r)["train_loss"] for r in ok
                }
                record["site_examples"] = {
                    _site_name(r, r.metadata.src_node_id): int(metrics_of(r)["num-examples"])
                    for r in ok
                }
        t_val = time.perf_counter()
        m = evaluate_global(arrays)
        timing["validate"] = time.perf_counter() - t_val
        if m is not None:
            record |= {f"val_{k}": v for k, v in m.summary().items()}
            kept = Metrics(loss=state.best_val_loss, n=0, values={select_by: state.best_val_score})
            if selection_key(m, select_by) < selection_key(kept, select_by):
                state.best_round, best = rnd, arrays
                state.best_val_loss = m.loss
                state.best_val_score = m.summary().get(select_by, float("nan"))
                bad_rounds = 0
            else:
                bad_rounds += 1
        else:
            best, state.best_round = arrays, rnd
        if fed.validation == "site":
            eval_msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
            _set_payload(eval_msgs, arrays, fed.transport)
            ereplies = _send(grid, eval_msgs, state, rnd, "evaluate", fed.transport,
                             fed.timeout, names)  # fmt: skip
            eok = _by_site(ereplies, names)
            _record_failures(record, "failed_evaluate", ereplies, names, console,
                             "did not evaluate", keep_empty=False)  # fmt: skip
            agg = strategy.aggregate_evaluate(rnd, eok)
            if agg is not None:
                record |= {
                    f"site_{k}": float(v)  # type: ignore[arg-type]
                    for k, v in agg.items()
                    if k.startswith("val_")
                }
            record["site_val_loss_by_site"] = {
                _site_name(r, r.metadata.src_node_id): metrics_of(r)["val_loss"] for r in eok
            }
        down = sum(
            t["bytes"] for t in state.traffic if t["round"] == rnd and t["direction"] == "down"
        )
        up = sum(t["bytes"] for t in state.traffic if t["round"] == rnd and t["direction"] == "up")
        record |= {"bytes_down": down, "bytes_up": up, "seconds": time.perf_counter() - t_round,
                   "timing": timing}
        state.history.append(record)
        state.round = rnd
        state.seconds = time.perf_counter() - t_start
        if fed.patience and bad_rounds >= fed.patience:
            state.stopped_early = True
        val = val_line(record)
        site_val = (
            f"  site val loss {record['site_val_loss']:.4f}" if "site_val_loss" in record else ""
        )
        if "epsilon" in record:
            site_val += f"  epsilon {record['epsilon']:.3g}"
        if screened.rejected:
            site_val += f"  rejected {len(screened.rejected)}"
        console.print(
            f"  round {rnd:>3}/{fed.rounds}  sites {record['sites']}/{record['sampled']}  "
            f"train loss {record.get('train_loss', float('nan')):.4f}{val}{site_val}  "
            f"down {_fmt_bytes(down)} up {_fmt_bytes(up)}  {record['seconds']:.1f} s"
        )
        if out is not None:
            append_jsonl(out / METRICS_FILE, {"event": "round", **record})
            write_checkpoint(out, state, arrays, best, strategy, save_extra)
    if state.stopped_early:
        console.print(
            f"  stopped after round {state.round}: no better validation {select_by} for "
            f"{fed.patience} rounds (best: round {state.best_round})"
        )

    # The global model: the round with the best shared validation score (the lowest
    # loss, or train.select_by's metric; as the centralized loop restores its best
    # epoch), else the last round.
    chosen = best if has_val else arrays
    model.load_trainable_state(decode_state(chosen))
    test = ws.evaluate("test", ws.splits.test)
    personalized: list[dict[str, Any]] = []
    if fed.personalize_epochs > 0:
        personalized = _personalize(grid, cfg, chosen, state, names)
        model.load_trainable_state(decode_state(chosen))
    if out is not None:
        if (out / MODEL_DIR).exists():
            shutil.rmtree(out / MODEL_DIR)
        model.save(out / MODEL_DIR)
    state.complete = True
    state.seconds = time.perf_counter() - t_start
    if out is not None:
        write_checkpoint(out, state, arrays, best, strategy, save_extra)
    return Outcome(state, chosen, test, personalized, ws)


def _secure_round(
    grid: Grid, rnd: int, arrays: ArrayRecord, fed: FederatedConfig, state: FederationState,
    console: Console, max_weight: float,
) -> tuple[ArrayRecord, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """One training round by SecAgg+ (`fedtune.federated.secagg`): the new global state
    (unchanged if the round failed), the round's record and its timing."""
    config: dict[str, Any] = {"server-round": rnd, "transport": "fp32",
                              VERSION_KEY: fedtune.__version__}  # fmt: skip
    if fed.strategy == "fedprox":
        config["proximal-mu"] = fed.proximal_mu
    t0 = time.perf_counter()
    res = secure_round(grid, rnd, arrays, config, fed, max_weight)
    timing = {"exchange": time.perf_counter() - t0}
    record: dict[str, Any] = {"round": rnd, "sampled": res["sampled"], "sites": res["sites"],
                              "secagg": True, "failed": {}, "rejected": {}}  # fmt: skip
    for way in ("down", "up"):
        state.traffic.append({"round": rnd, "kind": "train", "direction": way,
                              "site": "all sites (SecAgg+, every stage)",
                              "bytes": res[f"bytes_{way}"],
                              "payload_bytes": res[f"payload_{way}"]})  # fmt: skip
    if res["arrays"] is None:
        record["abandoned"] = True
        console.print(f"[yellow]round {rnd}: secure aggregation did not complete "
                      f"({res['sites']} of {res['sampled']} sites); global state "
                      "unchanged[/]")  # fmt: skip
        return arrays, record, timing
    record["train_loss"] = res["train_loss"]
    return encode_state(decode_state(res["arrays"])), record, timing


def _personalize(
    grid: Grid, cfg: RunConfig, arrays: ArrayRecord, state: FederationState, names: dict[int, str]
) -> list[dict[str, Any]]:
    fed = cfg.federated
    wire, layout = pack_record(encode_state(decode_state(arrays), fed.transport))
    msgs = [
        Message(
            RecordDict(
                {
                    "arrays": wire,
                    "config": ConfigRecord(
                        {"epochs": fed.personalize_epochs, "transport": fed.transport,
                         VERSION_KEY: fedtune.__version__, LAYOUT: layout}
                    ),
                }
            ),
            dst_node_id=node,
            message_type=f"{MessageType.QUERY}.personalize",
        )
        for node in grid.get_node_ids()
    ]
    replies = _send(grid, msgs, state, state.round + 1, "personalize", fed.transport,
                    fed.timeout, names)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for r in replies:
        if r.has_error():
            node = r.metadata.src_node_id
            rows.append({"site": names.get(node, f"node-{node}"), "error": r.error.reason})
            continue
        rows.append({"site": _site_name(r, 0), **metrics_of(r)})
    return sorted(rows, key=lambda row: row["site"])
