"""fedtune's Flower apps: one `ClientApp` (a site) and one `ServerApp` (the
aggregator) that federate every trainable method. Only the method's trainable
state crosses the wire; the frozen base model never does.

The same objects run in three places:
- in process (`fedtune federate`, `fedtune compare`, `fedtune demo`): the
  `InProcessGrid` calls the ClientApp directly, one site after another;
- under Flower's simulation engine: `flwr run .` (pyproject's `[tool.flwr.app]`);
- under Flower's deployment engine (SuperLink + one SuperNode per site).

Each process keeps one `Workspace` (base model, splits, encoded features), so a
process serving many sites, or many rounds, loads the base model once.

Run config keys (Flower `run_config`): `fedtune-config` (the RunConfig as JSON,
set by the in-process runner) or `config` (path of a TOML file) plus `set`
(`;`-separated `key=value` overrides); `output-dir` and `resume` for the server.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import fedtune
from fedtune.adapted import AdaptedModel
from fedtune.classify import Feature
from fedtune.config import FLOWER_CONFIG_KEY, FederatedConfig, RunConfig, TrainConfig, load_config
from fedtune.data import Example, Splits, make_splits
from fedtune.data.sources import check_labels, load_examples
from fedtune.data.splits import deduplicate
from fedtune.errors import ConfigError, DataError
from fedtune.evaluate import Metrics, evaluate_features
from fedtune.federated.attacks import attack_message, attack_state, attacks, flipped
from fedtune.federated.partition import Partition, Site, make_site, partition_examples
from fedtune.federated.privacy import CLIPPING_NORM, UNIT_WEIGHT, clip_update
from fedtune.federated.scaffold import CONTROL, correction, site_controls, update_site_control
from fedtune.federated.secagg import fitins_as_message, is_legacy_fit, reply_as_fitres, secagg_mod
from fedtune.federated.wire import (
    LAYOUT,
    arrays_of,
    config_of,
    decode_state,
    encode_state,
    load_session,
    pack_record,
    save_session,
)
from fedtune.methods import is_frozen
from fedtune.methods.features import Features
from fedtune.methods.frozen import EmbeddingMethod, FrozenMethod, QueryFederated, frozen_class
from fedtune.methods.icl import release_shared_lm
from fedtune.train import TrainSession, train

CONFIG_KEY = FLOWER_CONFIG_KEY
VERSION_KEY = "fedtune-version"
"""Config key of every message the server sends: its fedtune version. Under Flower's
Deployment Engine (runtime dependency installation off) every party runs the fedtune
installed in its own environment, so a site checks that it runs the same one."""


def check_version(conf: dict[str, Any]) -> None:
    """Refuse a message from a server running another fedtune version."""
    theirs = str(conf.get(VERSION_KEY, "") or "")
    if theirs and theirs != fedtune.__version__:
        raise ConfigError(
            f"this site runs fedtune {fedtune.__version__}, the server {theirs}: install "
            "the same fedtune version at every party (pip install fedtune==" + theirs + ")"
        )


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """The RunConfig a Flower run_config describes (see the module docstring)."""
    if run_config.get(CONFIG_KEY):
        return RunConfig.from_dict(json.loads(str(run_config[CONFIG_KEY])))
    path = str(run_config.get("config", "") or "") or None
    overrides = [s for s in shlex.split(str(run_config.get("set", "")).replace(";", " ")) if s]
    return load_config(path, overrides)


# --- what one process keeps: base model, data, encoded features ----------------


@dataclass
class Workspace:
    cfg: RunConfig
    splits: Splits
    partition: Partition
    model: AdaptedModel | FrozenMethod[Any]
    """A trained method's model, the `features` method (frozen embeddings + a
    logistic regression whose weights are the exchanged state), or a method that
    federates by query (`QueryFederated`: knn, icl; the server's unfitted copy, each
    site's fitted one is in `site_methods`)."""
    initial_state: dict[str, torch.Tensor]
    """The trainable state right after `build` (seeded): round 0's global state."""
    _features: dict[str, list[Feature]] = field(default_factory=dict)
    _embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    site_methods: dict[int, QueryFederated] = field(default_factory=dict)
    """Methods federated by query: each site's own copy, fitted on its own data."""
    site_notes_sent: dict[int, int] = field(default_factory=dict)
    """How many of each site method's notes went to the server already."""

    def site_method(self, pid: int, site: Site, directory: str = "") -> QueryFederated:
        """This site's copy of a method federated by query, fitted on first use on the
        site's own training examples (its files, e.g. an index, in `directory` when
        given, else a temporary folder)."""
        if pid not in self.site_methods:
            method = _federable_frozen(self.cfg, self.splits.labels)
            assert isinstance(method, QueryFederated)
            # Prompt variants are chosen on the site's validation set, else on the shared
            # one, like the centralized run's.
            method.fit(site.train, Path(directory) if directory else None,
                       site.validation or self.splits.validation or None)  # fmt: skip
            self.site_methods[pid] = method
        return self.site_methods[pid]

    def embeddings(self, key: str, examples: list[Example]) -> np.ndarray:
        """`features` method: the frozen embeddings of `examples` [N, D], kept per key."""
        assert isinstance(self.model, EmbeddingMethod)
        if key not in self._embeddings:
            self._embeddings[key] = self.model.embed([e.text for e in examples])
        return self._embeddings[key]

    def evaluate(self, key: str, examples: list[Example], generate: bool = True) -> Metrics:
        """The current model on labelled examples (encoded once per key). Generation
        decodes answers only when `generate` (the test set, not every round's check)."""
        if isinstance(self.model, Features):
            x = self.embeddings(key, examples)
            return self.model.metrics(self.model.scores_of(x), self.model.label_ids(examples))
        if not isinstance(self.model, AdaptedModel):
            raise ConfigError(f"{self.cfg.method_name} federates by query: it has no global "
                              "model to evaluate")  # fmt: skip
        return evaluate_features(self.model, self.features(key, examples),
                                 self.cfg.train.eval_batch_size, generate=generate,
                                 bf16=self.cfg.train.bf16)  # fmt: skip

    def features(self, key: str, examples: list[Example]) -> list[Feature]:
        assert isinstance(self.model, AdaptedModel)
        if key not in self._features:
            self._features[key] = self.model.formulation.encode_examples(examples)
        return self._features[key]


_WORKSPACE: dict[str, Workspace] = {}


def _workspace_key(cfg: RunConfig) -> str:
    fed = cfg.federated
    part = (fed.sites, fed.partition, fed.alpha, fed.sizes, fed.min_site_size, fed.validation,
            fed.site_val_size)  # fmt: skip
    d = cfg.to_dict()
    return json.dumps([d[k] for k in ("data", "model", "method", "seed")] + [part])


def workspace(cfg: RunConfig, splits: Splits | None = None) -> Workspace:
    """This process's workspace for `cfg` (built on first use; one at a time, so
    that a comparison of several methods does not keep every model in memory)."""
    if cfg.federated.attack == "labelflip" and cfg.data.task != "classification":
        raise ConfigError(
            "federated.attack = 'labelflip' flips class labels; a generation task has none "
            "(its categories do not change what is learnt): use a state attack such as "
            "'signflip' or 'scale'"
        )
    key = _workspace_key(cfg)
    ws = _WORKSPACE.get(key)
    if ws is None:
        _WORKSPACE.clear()
        release_shared_lm()  # the last workspace's ICL model, if any
        splits = splits or make_splits(cfg.data)
        if cfg.federated.partition == "own":
            # Sites bring their own data: the server holds validation and test only.
            _require_labels(cfg)
            notes = (*splits.notes, "sites train on their own data; the training share "
                     "of the server's data is unused")  # fmt: skip
            splits = Splits([], splits.validation, splits.test, splits.labels, notes)
            partition = Partition([])
        else:
            partition = partition_examples(splits.train, splits.labels, cfg.federated,
                                           cfg.seed)  # fmt: skip
        model = _model(cfg, splits.labels)
        ws = Workspace(cfg, splits, partition, model, model.trainable_state())
        _WORKSPACE[key] = ws
    return ws


def query_refusal(cfg: RunConfig) -> str:
    """Why the run's method, which federates by query, cannot here ('' when it can or
    does not federate by query): a remote backend."""
    cls = frozen_class(cfg.method_name, cfg.data.task)
    if cls is None or not issubclass(cls, QueryFederated):
        return ""
    if getattr(cfg.method, "backend", "local") == "remote":
        # A site would send its demonstrations (its training texts) and the key in the
        # environment variable the run config names to the endpoint the run config
        # names: the server's choice, not the site's.
        return ('federated icl runs the LM at each site: method.backend = "remote" would '
                "send a site's demonstrations to an endpoint the run's config names; use "
                'method.backend = "local" (or run remote icl centralized or local-only)')
    return ""


def _federable_frozen(cfg: RunConfig, labels: tuple[str, ...]) -> FrozenMethod[Any]:
    from fedtune.regimes import build_frozen

    method = build_frozen(cfg, labels)
    if isinstance(method, QueryFederated):
        if why := query_refusal(cfg):
            raise ConfigError(why)
        return method
    if not isinstance(method, Features):
        raise ConfigError(
            f"method {cfg.method_name} does not federate on data.task = {cfg.data.task}: "
            "it has neither weights to average nor answers to combine by query; run it "
            "centralized or local-only (knn and icl federate by query)"
        )
    method.init_state(method.embedder.dim)  # zeros [K, D], [K]
    return method


def _require_labels(cfg: RunConfig) -> None:
    if not cfg.data.labels:
        raise ConfigError(
            "federated.partition = 'own' (sites read their own data) needs data.labels in "
            "the run config, so that the server and every site use one label order"
            + (" (generation: the categories, e.g. data.labels = [\"all\"] when the data "
               "names none)" if cfg.data.task == "generation" else "")
        )


_SITE_WORKSPACES: dict[tuple[str, str, str], Workspace] = {}


def site_workspace(cfg: RunConfig, data_path: str, name: str) -> Workspace:
    """The workspace of a site that reads its own data file (partition `own`): the
    file is loaded with the run's `[data]` settings, de-duplicated and checked against
    `data.labels`; its Site holds it all (less a validation share with `validation =
    "site"`). Kept per (run, file) while the process serves that run config."""
    key = (_workspace_key(cfg), data_path, name)
    ws = _SITE_WORKSPACES.get(key)
    if ws is None:
        # One run's sites at a time (a long-lived site worker serves run after run):
        # entries of another run config are dropped, with their models.
        for old in [k for k in _SITE_WORKSPACES if k[0] != key[0]]:
            del _SITE_WORKSPACES[old]
        _require_labels(cfg)
        labels = tuple(cfg.data.labels)
        examples, notes = deduplicate(load_examples(replace(cfg.data, path=data_path)))
        if not examples:
            raise DataError(f"{data_path}: site {name} has no examples")
        check_labels(examples, labels)
        site = make_site(name, examples, cfg.federated, cfg.seed, notes)
        splits = Splits(site.train, [], [], labels, tuple(notes))
        model = _model(cfg, labels)
        ws = Workspace(cfg, splits, Partition([site], tuple(notes)), model,
                       model.trainable_state())  # fmt: skip
        _SITE_WORKSPACES[key] = ws
    return ws


def _model(cfg: RunConfig, labels: tuple[str, ...]) -> AdaptedModel | FrozenMethod[Any]:
    if is_frozen(cfg.method_name):
        return _federable_frozen(cfg, labels)
    model = AdaptedModel.build(cfg.model, cfg.method, labels, seed=cfg.seed,
                               task=cfg.data.task)  # fmt: skip
    model.to(cfg.train.device)
    return model


def clear_workspace() -> None:
    _WORKSPACE.clear()
    _SITE_WORKSPACES.clear()
    release_shared_lm()


def local_steps(cfg: RunConfig, n_train: int) -> int:
    """Optimizer steps a site takes per round."""
    fed, t = cfg.federated, site_train_config(cfg)
    if fed.local_steps > 0:
        return fed.local_steps
    if fed.local_epochs <= 0:
        raise ConfigError("federated.local_epochs must be > 0 (or federated.local_steps > 0)")
    return max(1, math.ceil(fed.local_epochs * math.ceil(n_train / t.batch_size) / t.grad_accum))


def site_train_config(cfg: RunConfig) -> TrainConfig:
    """The training loop's config at a site: the run's `[train]`, with the site's own
    batch size (`federated.local_batch_size`), no early stopping and no selection
    (sites have no validation set inside the loop: the server evaluates and selects
    rounds, by `train.select_by`)."""
    batch = cfg.federated.local_batch_size or cfg.train.batch_size
    return replace(cfg.train, patience=0, batch_size=batch, select_by="loss")


# --- the ClientApp ---------------------------------------------------------------

client_app = ClientApp()


def _site(context: Context) -> tuple[RunConfig, Workspace, int, Site]:
    cfg = config_from_run_config(dict(context.run_config))
    pid = int(context.node_config.get("partition-id", 0))
    if cfg.federated.partition == "own":  # the site's own file, named in its node config
        path = str(context.node_config.get("data-path", "") or "")
        if not path and pid < len(cfg.federated.site_paths):
            path = cfg.federated.site_paths[pid]
        if not path:
            raise ConfigError(
                f"federated.partition = 'own': site {pid} has no data file; start its "
                "SuperNode with --node-config \"partition-id=N data-path=/abs/site.csv\""
            )
        name = str(context.node_config.get("site-name", "") or Path(path).stem)
        ws = site_workspace(cfg, path, name)
        return cfg, ws, 0, ws.partition.sites[0]
    ws = workspace(cfg)
    if not 0 <= pid < len(ws.partition.sites):
        raise ConfigError(
            f"node partition-id {pid} but the data has {len(ws.partition.sites)} sites; "
            "set federated.sites to the number of SuperNodes / simulated nodes"
        )
    return cfg, ws, pid, ws.partition.sites[pid]


@client_app.train(mods=[secagg_mod])
def site_train(msg: Message, context: Context) -> Message:
    """One round at one site: load the global state, train locally, send back the
    trainable state and the number of examples it was trained on. Under SecAgg+
    (`federated.secagg`) Flower's mod runs the protocol and calls this with the
    collect stage's FitIns; the reply is the FitRes it masks."""
    if is_legacy_fit(msg):
        inner = fitins_as_message(msg)
        return reply_as_fitres(site_train(inner, context), msg, str(config_of(inner)[LAYOUT]))
    cfg, ws, pid, site = _site(context)
    fed, model = cfg.federated, ws.model
    if not isinstance(model, AdaptedModel | Features):
        raise ConfigError(f"{cfg.method_name} is not trained in rounds; it federates by "
                          "query (query.answer)")  # fmt: skip
    conf = config_of(msg)
    check_version(conf)
    transport = str(conf.get("transport", "fp32"))
    server_round = int(conf.get("server-round", 1))
    global_state = decode_state(arrays_of(msg), transport)
    model.load_trainable_state(global_state)
    controls = None
    if CONTROL in msg.content.array_records:  # SCAFFOLD (build_strategy refused frozen methods)
        controls = site_controls(decode_state(arrays_of(msg, CONTROL), transport), context.state)
    attacker = attacks(fed, pid)
    key = f"train-{pid}"
    if attacker and fed.attack == "labelflip":
        site, key = flipped(site, ws.splits.labels), f"train-{pid}-flipped"
    clip = float(conf.get(CLIPPING_NORM, 0))
    if isinstance(model, Features):
        sites = int(conf.get("sites-in-round", 1))
        return _reply_train(msg, ws, site, transport, *_features_update(ws, pid, site, sites, key),
                            fed=fed, start=global_state, clip=clip, attacker=attacker)  # fmt: skip
    feats = ws.features(key, site.train)
    tcfg = site_train_config(cfg)
    steps = local_steps(cfg, len(feats))
    session = None
    if fed.site_state == "keep":
        saved = load_session(context.state)
        if saved is not None:
            session = TrainSession.from_state(model, tcfg, cfg.method.lr, *saved)
        else:  # one schedule over the whole federation
            # Every site uses the run's seed: sites holding the same data then make
            # the same update (their data, not their seeds, tell them apart).
            session = TrainSession.new(model, len(feats), tcfg, cfg.method.lr, cfg.seed,
                                       total_steps=steps * fed.rounds)  # fmt: skip
    else:  # fresh optimizer and schedule each round; new batch order and dropout
        seed = cfg.seed + 1000 * server_round
        session = TrainSession.new(model, len(feats), tcfg, cfg.method.lr, seed, total_steps=steps)
    mu = float(conf.get("proximal-mu", 0.0))
    result = train(
        model, feats, None, tcfg, cfg.method.lr, session=session, steps=steps,
        proximal=(mu, global_state) if mu > 0 else None,
        correction=correction(*controls) if controls else None,
        description=f"{site.name} round {server_round}",
    )  # fmt: skip
    if fed.site_state == "keep":
        save_session(context.state, *session.to_state())
    extra = {}
    if controls:
        extra[CONTROL] = update_site_control(context.state, global_state, model.trainable_state(),
                                             *controls, result.lr_sum)  # fmt: skip
    train_loss = result.history[-1]["train_loss"] if result.history else float("nan")
    return _reply_train(msg, ws, site, transport, float(train_loss), result.train_seconds,
                        result.steps, extra, fed=fed, start=global_state, clip=clip,
                        attacker=attacker)  # fmt: skip


def _features_update(ws: Workspace, pid: int, site: Site, sites: int = 1,
                     key: str = "") -> tuple[float, float, int]:  # fmt: skip
    """`features`: L-BFGS on the site's frozen embeddings from the global weights;
    `sites` is the number of sites training this round (see Features.local_update)."""
    assert isinstance(ws.model, Features)
    t0 = time.perf_counter()
    x = ws.embeddings(key or f"train-{pid}", site.train)
    loss = ws.model.local_update(x, ws.model.label_ids(site.train), sites)
    return loss, time.perf_counter() - t0, ws.model.config.local_iters


def _reply_train(msg: Message, ws: Workspace, site: Site, transport: str, train_loss: float,
                 seconds: float, steps: int,
                 extra: dict[str, dict[str, torch.Tensor]] | None = None, *,
                 fed: FederatedConfig, start: dict[str, torch.Tensor], clip: float = 0.0,
                 attacker: bool = False) -> Message:  # fmt: skip
    """The site's trained state, plus `extra` states of the same layout (SCAFFOLD's
    control update), each in the transport type. With `clip` (client-side DP: the
    round's clipping norm) the update from `start` is clipped before it leaves;
    an `attacker` (a simulated misbehaving site) sends what `federated.attack` says."""
    trained = ws.model.trainable_state()
    if clip > 0:
        clip_update(trained, start, clip)
    if attacker:
        trained = attack_state(fed, trained, start)
    wire, layout = pack_record(encode_state(trained, transport))
    content = RecordDict(
        {
            "arrays": wire,
            "metrics": MetricRecord(
                {
                    "num-examples": len(site.train),
                    UNIT_WEIGHT: 1,
                    "train_loss": train_loss,
                    "train_seconds": seconds,
                    "steps": steps,
                }
            ),
            "site": ConfigRecord({"name": site.name, LAYOUT: layout}),
        }
    )
    for key, state in (extra or {}).items():
        content[key], _ = pack_record(encode_state({k: state[k] for k in trained}, transport))
    if attacker:
        attack_message(fed, content)
    return Message(content, reply_to=msg)


def _evaluate_on(ws: Workspace, key: str, examples: list[Example],
                 generate: bool = True) -> dict[str, float]:  # fmt: skip
    """`val_*` metrics; generation decodes only when `generate` (personalization's
    before/after, not every round's check)."""
    m = ws.evaluate(key, examples, generate=generate)
    return {f"val_{k}": v for k, v in m.summary().items()}


@client_app.evaluate()
def site_evaluate(msg: Message, context: Context) -> Message:
    """The global model on this site's own validation set."""
    _, ws, pid, site = _site(context)
    conf = config_of(msg)
    check_version(conf)
    if isinstance(ws.model, QueryFederated):
        raise ConfigError(f"{ws.cfg.method_name} has no global model to evaluate at the sites")
    ws.model.load_trainable_state(decode_state(arrays_of(msg), str(conf.get("transport", "fp32"))))
    if not site.validation:
        raise ConfigError(f"{site.name} has no validation set; set federated.validation = 'site'")
    metrics = _evaluate_on(ws, f"val-{pid}", site.validation, generate=False)
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": len(site.validation), **metrics}),
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content, reply_to=msg)


@client_app.query("personalize")
def site_personalize(msg: Message, context: Context) -> Message:
    """Fine-tune the global model on this site's data and report both on the
    site's validation set. The personalized state stays at the site (written to
    the node's `output-dir` when it has one); only metrics leave."""
    cfg, ws, pid, site = _site(context)
    conf = config_of(msg)
    check_version(conf)
    epochs = float(conf["epochs"])
    model = ws.model
    model.load_trainable_state(decode_state(arrays_of(msg), str(conf.get("transport", "fp32"))))
    if not site.validation:
        raise ConfigError(
            "personalization is evaluated on each site's own validation set: set "
            "federated.validation = 'site'"
        )
    before = _evaluate_on(ws, f"val-{pid}", site.validation)
    if isinstance(model, Features):  # a site's own L-BFGS run from the global weights
        _features_update(ws, pid, site)
    elif isinstance(model, AdaptedModel):
        tcfg = replace(site_train_config(cfg), epochs=epochs, max_steps=0)
        feats = ws.features(f"train-{pid}", site.train)
        train(model, feats, None, tcfg, cfg.method.lr, seed=cfg.seed + pid,
              description=f"{site.name} personalize")  # fmt: skip
    after = _evaluate_on(ws, f"val-{pid}", site.validation)
    out = str(context.node_config.get("output-dir", "") or "")
    if out:
        model.save(Path(out) / "model")
    metrics = {f"global_{k}": v for k, v in before.items()}
    metrics |= {f"personal_{k}": v for k, v in after.items()}
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": len(site.validation), **metrics}),
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content, reply_to=msg)


@client_app.query("answer")
def site_answer(msg: Message, context: Context) -> Message:
    """A method federated by query (knn, icl): this site's answers to the server's
    queries, from its own copy fitted on its own data (fedtune.federated.query). Only
    the answers leave the site: never a training text or an embedding of one as such
    (a generated answer may quote a demonstration or a document)."""
    from fedtune.federated.query import payload_of, payload_records

    _, ws, pid, site = _site(context)
    if not isinstance(ws.model, QueryFederated):
        raise ConfigError(f"the run's method {ws.cfg.method_name} does not federate by query")
    check_version(config_of(msg))
    # What the site fitted lives in the node's output-dir when it has one (in process:
    # the run's sites/<site>/), else in a temporary folder for the life of the process.
    method = ws.site_method(pid, site, str(context.node_config.get("output-dir", "") or ""))
    answers = method.answer_queries(payload_of(msg.content))
    content = RecordDict(
        {
            **payload_records(answers),
            "metrics": MetricRecord({"num-examples": len(site.train)}),
            "site": ConfigRecord({"name": site.name}),
        }
    )
    # What the run's report should say (e.g. prompts that dropped demonstrations to fit
    # the context): the notes since the last reply; counts, never examples.
    assert isinstance(method, FrozenMethod)
    new = method.notes[ws.site_notes_sent.get(pid, 0) :]
    ws.site_notes_sent[pid] = len(method.notes)
    if new:
        content["notes"] = ConfigRecord({"notes": list(new)})
    return Message(content, reply_to=msg)


# --- the ServerApp ---------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Under `flwr run`: the federation of the config named by the run config,
    written to `output-dir` (default: the config's output_dir/name), or continued
    from the run directory in `resume`. Sites keep their loop state in their
    `Context` for the life of a run; a resumed run restarts it at the sites."""
    import time

    from rich.console import Console

    from fedtune.federated.runner import finish_run, prepare_run_dir
    from fedtune.federated.server import run_server
    from fedtune.runs import final_run_dir

    t_start = time.perf_counter()
    if type(grid).__module__ == "flwr.superlink.grid.http_grid":  # the Deployment Engine
        from fedtune.federated.waits import shorten_pulls

        shorten_pulls(type(grid).__module__)  # the sites' replies
    console = Console()
    cfg = config_from_run_config(dict(context.run_config))
    resume = str(context.run_config.get("resume", "") or "")
    out_key = str(context.run_config.get("output-dir", "") or "")
    from fedtune.federated.query import federates_by_query, refuse_resume, run_federated_by_query

    if federates_by_query(cfg):  # not in rounds
        if resume:
            refuse_resume(cfg)
        run_federated_by_query(cfg, console, grid=grid, out=Path(out_key) if out_key else None)
        return
    if resume:
        out = Path(resume)
    else:
        out = Path(out_key) if out_key else final_run_dir(cfg)
        ws = workspace(cfg)
        prepare_run_dir(cfg, out, ws.splits.labels, ws.partition.sites)
    outcome = run_server(grid, cfg, out, console, resume=out if resume else None)
    finish_run(cfg, outcome, time.perf_counter() - t_start, out, console)
