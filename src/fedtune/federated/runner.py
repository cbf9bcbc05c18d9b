"""A federation on one machine: fedtune's ServerApp and ClientApp over the
in-process grid, with a run directory, checkpoints and `--resume`.

Run directory: config.json, labels.json, sites.json, metrics.jsonl (one line per
round, then the test result), checkpoint/ (after every round: global and best
state, strategy state, RNG, history, each site's loop state), model/ (the global
model, loads like a centralized run's), sites/<site>/model (personalized models),
report.md with its plots. An interrupted run keeps its directory: continue it with
`fedtune federate --resume RUN_DIR`.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from rich.console import Console
from rich.markup import escape

from fedtune.config import RunConfig
from fedtune.data import Splits
from fedtune.errors import ConfigError
from fedtune.evaluate import test_line
from fedtune.federated.apps import CONFIG_KEY, client_app, site_train_config, workspace
from fedtune.federated.grid import InProcessGrid
from fedtune.federated.partition import Site, describe_partition
from fedtune.federated.server import (
    Outcome,
    build_strategy,
    checkpoint_state,
    find_checkpoint,
    run_server,
)
from fedtune.federated.wire import recorddict_bytes, recorddict_from_bytes
from fedtune.runs import (
    CONFIG_FILE,
    LABELS_FILE,
    METRICS_FILE,
    append_jsonl,
    final_run_dir,
    write_json,
)

FIRST_NODE_ID = 1000


def make_contexts(
    cfg: RunConfig, n_sites: int, site_names: list[str], out: Path | None
) -> dict[int, Context]:
    run_config = {CONFIG_KEY: json.dumps(cfg.to_dict())}
    contexts = {}
    for i in range(n_sites):
        node_config: dict[str, Any] = {"partition-id": i, "num-partitions": n_sites}
        if cfg.federated.partition == "own":  # as a SuperNode's --node-config would say
            node_config["data-path"] = str(Path(cfg.federated.site_paths[i]).resolve())
            node_config["site-name"] = site_names[i]
        if out is not None:
            node_config["output-dir"] = str(out / "sites" / site_names[i])
        contexts[FIRST_NODE_ID + i] = Context(
            run_id=_run_id(cfg), node_id=FIRST_NODE_ID + i, node_config=node_config,
            state=RecordDict(), run_config=dict(run_config),
        )  # fmt: skip
    return contexts


def _run_id(cfg: RunConfig) -> int:
    return zlib.crc32(cfg.to_json().encode()) or 1


def run_federated(
    cfg: RunConfig,
    console: Console | None = None,
    splits: Splits | None = None,
    shown_as: Path | None = None,
    resume: str | Path | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Federate `cfg.method` across `cfg.federated.sites` sites in this process.
    Returns the run summary (also the last line of metrics.jsonl)."""
    console = console or Console()
    from fedtune.federated.query import federates_by_query, refuse_resume

    if federates_by_query(cfg) and resume is None:
        from fedtune.federated.query import run_federated_by_query

        return run_federated_by_query(cfg, console, splits, shown_as)
    t_start = time.perf_counter()
    out: Path | None
    if resume is not None:
        out = Path(resume)
        if (out / CONFIG_FILE).is_file():
            cfg = RunConfig.from_dict(json.loads((out / CONFIG_FILE).read_text("utf-8")))
            refuse_resume(cfg)
        if not (out / CONFIG_FILE).is_file() or find_checkpoint(out) is None:
            raise ConfigError(
                f"{out} is not an interrupted federated run (needs {CONFIG_FILE} and a "
                "checkpoint); pass the run directory printed when the run started"
            )
    else:
        out = final_run_dir(cfg) if write else None
    # Everything a user can get wrong is checked before anything is written.
    build_strategy(cfg.federated, cfg.method.lr, cfg.method_name)
    ws = workspace(cfg, splits)
    sites = ws.partition.sites
    names = [s.name for s in sites] or own_site_names(cfg)
    n_train = ws.model.trainable_parameters()
    console.print(
        f"[bold]{cfg.method_name}[/], federated ({cfg.federated.strategy}, "
        f"{cfg.federated.rounds} rounds, {cfg.federated.transport} transport): "
        f"{n_train:,} trainable parameters, {len(names)} sites, "
        f"{len(ws.splits.validation)} shared validation / {len(ws.splits.test)} test examples"
    )
    for line in describe_partition(ws.partition, ws.splits.labels):
        console.print(f"  {line}")
    contexts = make_contexts(cfg, len(names), names, out)
    if resume is not None and out is not None:
        ckpt = find_checkpoint(out)
        assert ckpt is not None
        before = checkpoint_state(ckpt)
        t_start -= before.seconds  # the wall time counts the rounds run before, too
        for node, ctx in contexts.items():
            f = ckpt / "sites" / f"{node}.bin"
            if f.is_file():
                ctx.state = recorddict_from_bytes(f.read_bytes())
    elif out is not None:
        prepare_run_dir(cfg, out, ws.splits.labels, sites)
        console.print(f"  run directory: {escape(str(shown_as or out))}")

    def save_sites(ckpt: Path) -> None:
        (ckpt / "sites").mkdir()
        for node, ctx in contexts.items():
            (ckpt / "sites" / f"{node}.bin").write_bytes(recorddict_bytes(ctx.state))

    grid = InProcessGrid(client_app, contexts, _run_id(cfg))
    try:
        outcome = run_server(grid, cfg, out, console, resume=out if resume else None,
                             save_extra=save_sites,
                             site_names={n: names[i] for i, n in enumerate(contexts)})  # fmt: skip
    except (KeyboardInterrupt, SystemExit):
        if out is not None and shown_as is None:  # in a comparison, it says how to go on
            console.print(
                f"[yellow]interrupted; continue with: fedtune federate --resume {escape(str(out))}"
            )
        raise
    summary = finish_run(cfg, outcome, time.perf_counter() - t_start, out, console, shown_as)
    return summary


def own_site_names(cfg: RunConfig) -> list[str]:
    """partition `own`, in process: the sites are `site_paths`, named by file stem."""
    paths = cfg.federated.site_paths
    if cfg.federated.partition != "own":
        return []
    if not paths:
        raise ConfigError("in process, federated.partition = 'own' needs federated.site_paths: "
                          "one data file per site")  # fmt: skip
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"federated.site_paths: no such file {missing[0]}")
    names = [Path(p).stem for p in paths]
    if len(set(names)) != len(names):
        raise ConfigError(f"federated.site_paths: two files share a name ({names}); the "
                          "file name (without suffix) names the site")  # fmt: skip
    return names


def prepare_run_dir(cfg: RunConfig, out: Path, labels: tuple[str, ...], sites: list[Site]) -> None:
    out.mkdir(parents=True)
    write_json(out / CONFIG_FILE, cfg.to_dict())
    write_json(out / LABELS_FILE, {"labels": list(labels)})
    # Sites with their own data (partition `own`) are unknown here: their sizes come
    # with their replies (metrics.jsonl, `site_examples`).
    write_json(out / "sites.json", [
        {"name": s.name, "train": len(s.train), "validation": len(s.validation)} for s in sites
    ])  # fmt: skip


def finish_run(
    cfg: RunConfig, outcome: Outcome, wall: float, out: Path | None, console: Console,
    shown_as: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The summary (last line of metrics.jsonl), the report and the final console line."""
    summary = summarize(cfg, outcome, wall, out, shown_as)
    if out is not None:
        append_jsonl(out / METRICS_FILE, summary)
        from fedtune.report import write_federated_report

        ws = outcome.workspace
        write_federated_report(out, summary, outcome.test, outcome.state.history, ws.splits.labels)
    t = outcome.test
    console.print(
        f"[bold green]test[/] {test_line(t)}  ({summary['wall_seconds']:.0f} s)"
        + (f" -> {escape(str(shown_as or out))}" if out is not None else "")
    )
    summary["run_dir"] = str(out) if out is not None else ""
    return summary


def summarize(
    cfg: RunConfig, outcome: Outcome, wall: float, out: Path | None, shown_as: Path | None
) -> dict[str, Any]:
    from fedtune.data import example_groups, examples_digest
    from fedtune.regimes import describe_data

    st, ws, test = outcome.state, outcome.workspace, outcome.test
    train_traffic = [t for t in st.traffic if t["kind"] == "train"]
    rounds_run = max(1, len({t["round"] for t in train_traffic}))
    sites = ws.partition.sites
    # Sites that bring their own data are known to the server by their replies only.
    site_names = [s.name for s in sites] or sorted(
        {t["site"] for t in train_traffic if t["direction"] == "up" and not t.get("error")}
    )
    examples: dict[str, int] = next(
        (r["site_examples"] for r in reversed(st.history) if "site_examples" in r), {}
    )
    n_sites = max(1, len(site_names))
    per_site_round = {
        d: sum(t["bytes"] for t in train_traffic if t["direction"] == d) / rounds_run / n_sites
        for d in ("down", "up")
    }
    n_train = ws.model.trainable_parameters()
    return {
        "event": "test",
        "regime": "federated",
        "name": (shown_as or out or Path(cfg.name or "federated")).name,
        "method": cfg.method_name,
        "model": cfg.model.name,
        "kind": ws.model.kind,
        "data": describe_data(cfg),
        "strategy": cfg.federated.strategy,
        "transport": cfg.federated.transport,
        "sites": site_names,
        "n_train": sum(len(s.train) for s in sites) or int(sum(examples.values())),
        "n_validation": len(ws.splits.validation),
        "n_test": len(ws.splits.test),
        "trainable_parameters": n_train,
        "base_parameters": ws.model.base_parameters,
        "trainable_percent": 100 * n_train / ws.model.base_parameters,
        "rounds": st.round,
        "site_batch_size": site_train_config(cfg).batch_size,
        "best_round": st.best_round,
        "best_val_loss": st.best_val_loss,
        "select_by": cfg.train.select_by,
        "best_val_score": st.best_val_score,
        "stopped_early": st.stopped_early,
        "bytes_down_per_site_round": per_site_round["down"],
        "bytes_up_per_site_round": per_site_round["up"],
        "payload_up_per_site_round": sum(
            t["payload_bytes"] for t in train_traffic if t["direction"] == "up"
        )
        / rounds_run
        / n_sites,
        "bytes_total": sum(t["bytes"] for t in st.traffic),
        "dropped": _dropped(st.history, outcome.personalized),
        "rejected": [{"round": r["round"], "site": site, "reason": reason}
                     for r in st.history for site, reason in (r.get("rejected") or {}).items()],
        "clipped": sum(len(r.get("clipped") or {}) for r in st.history),
        "defences": _defences(cfg),
        "privacy": _privacy(cfg, st.history),
        "personalized": outcome.personalized,
        **test.summary(),
        "task": cfg.data.task,
        "primary": test.primary,
        "report": test.report,
        "confusion": test.confusion,
        "samples": test.samples,
        "test_scores": test.per_example,
        "test_groups": example_groups(ws.splits.test),
        "test_digest": examples_digest(ws.splits.test),
        "notes": list(ws.splits.notes) + list(ws.partition.notes),
        "wall_seconds": wall,
        "history": st.history,
    }


def _dropped(history: list[dict[str, Any]], personalized: list[dict[str, Any]],
             ) -> list[dict[str, Any]]:  # fmt: skip
    """Every site that failed a phase: training or site evaluation in a round, or the
    personalization after the rounds."""
    out = []
    for r in history:
        for phase, key in (("train", "failed"), ("evaluate", "failed_evaluate")):
            for site, reason in (r.get(key) or {}).items():
                at = r.get(f"{key}_at", "")
                out.append({"round": r["round"], "phase": phase, "site": site,
                            "reason": reason, "at": at})  # fmt: skip
    out += [{"round": "after", "phase": "personalize", "site": p["site"],
             "reason": p["error"], "at": ""} for p in personalized if p.get("error")]  # fmt: skip
    return out


def _defences(cfg: RunConfig) -> dict[str, Any]:
    """What protected this run's aggregate (docs/privacy.md), for the summary and report."""
    fed = cfg.federated
    out: dict[str, Any] = {
        "validation": "size, layout, finite values and example count of every update",
        "update_norm": fed.update_norm, "update_norm_action": fed.update_norm_action,
        "strategy": fed.strategy, "dp": fed.dp, "attack": fed.attack, "secagg": fed.secagg,
    }  # fmt: skip
    if fed.strategy in ("krum", "multikrum", "bulyan"):
        out["malicious"] = fed.malicious
    if fed.attack != "none":
        out |= {"attackers": fed.attackers, "attack_scale": fed.attack_scale}
    return out


def _privacy(cfg: RunConfig, history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """With federated.dp: the mechanism and the epsilon spent (the last round's)."""
    fed = cfg.federated
    if fed.dp == "off":
        return None
    spent = [r for r in history if "epsilon" in r]
    return {
        "clipping": fed.dp, "clip": fed.dp_clip, "delta": fed.dp_delta,
        "noise_multiplier": next((r["noise_multiplier"] for r in spent), fed.dp_noise),
        "epsilon": spent[-1]["epsilon"] if spent else 0.0,
        "target_epsilon": fed.dp_epsilon if fed.dp_noise <= 0 else None,
        "accounting": "RDP (dp-accounting via Flower), add/remove one site, no "
                      "amplification by sampling",
    }  # fmt: skip
