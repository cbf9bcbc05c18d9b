"""Centralized vs local-only vs federated: the source post's experiment.

All regimes use the same split and the same method and training budget:
centralized trains on the union of the sites' data for `rounds x local_epochs`
epochs; each local-only site trains on its own data for as many epochs; the
federation runs `rounds` rounds of `local_epochs` at every site. Everyone is
validated on the shared validation set and tested on the held-out test set.

The report reproduces the post's two figures — (a) validation loss of centralized
vs federated training over epochs/rounds, (b) each local-only site vs the
federated global model — and a table with accuracy, macro-F1, weighted F1,
trainable parameters, bytes per site per round and in total, and wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape

from fedtune.config import REGIMES, FederatedConfig, RunConfig
from fedtune.data import Splits, make_splits
from fedtune.errors import ConfigError
from fedtune.evaluate import LABEL, metric_names
from fedtune.federated.apps import query_refusal
from fedtune.federated.partition import partition_examples
from fedtune.federated.runner import run_federated
from fedtune.federated.server import (
    CHECKPOINT_DIR,
    STATE_FILE,
    build_strategy,
    checkpoint_state,
    find_checkpoint,
)
from fedtune.regimes import describe_data, method_configs, run_centralized
from fedtune.report import _pct, personalized_table
from fedtune.runs import (
    COMPARISON_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    PLAN_FILE,
    REPORT_FILE,
    final_of_staging,
    final_run_dir,
    read_jsonl,
    staged_run_dir,
    staging_dir,
    write_json,
)


def epochs_budget(fed: FederatedConfig) -> float:
    """The federated run's training budget in epochs of a site's data (rounds x local
    epochs): what centralized and local-only runs get in `fedtune compare`."""
    if fed.local_steps:
        raise ConfigError(
            "compare needs the budget in epochs: set federated.local_epochs and leave "
            "federated.local_steps = 0"
        )
    return fed.rounds * fed.local_epochs


def val_curve(
    run_dir: Path,
    config: dict[str, Any] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> list[tuple[float, float]]:
    """(epochs of training, validation loss) of a saved run, read from its metrics.jsonl.

    A centralized or local-only run gives one point per evaluation at its epoch; a
    federated run one per round at `round x federated.local_epochs` (from its
    config.json; round 0, before any training, left out), so runs of one budget end at
    the same x. A round logged twice (a run resumed from the checkpoint before it)
    counts once, its last record. `config` and `records`: the run's config.json and
    metrics.jsonl when the caller has read them already.
    """
    if config is None:
        config = json.loads((run_dir / CONFIG_FILE).read_text("utf-8"))
    local_epochs = float(config["federated"]["local_epochs"])
    evals: list[tuple[float, float]] = []
    rounds: dict[int, float] = {}
    for r in read_jsonl(run_dir / METRICS_FILE) if records is None else records:
        if "val_loss" not in r:
            continue
        if r.get("event") == "eval":
            evals.append((float(r["epoch"]), float(r["val_loss"])))
        elif r.get("event") == "round" and r.get("round", 0) > 0:
            rounds[int(r["round"])] = float(r["val_loss"])
    return evals + [(n * local_epochs, loss) for n, loss in sorted(rounds.items())]


def run_regimes(
    cfg: RunConfig,
    methods: list[str] | None = None,
    regimes: tuple[str, ...] = REGIMES,
    console: Console | None = None,
    method_overrides: dict[str, dict[str, Any]] | None = None,
    train_overrides: dict[str, dict[str, Any]] | None = None,
    federated_overrides: dict[str, dict[str, Any]] | None = None,
    shown_as: Path | None = None,
    resume: bool = False,
) -> Path:
    """Run every regime for every method on one split; write one report.
    `shown_as`: where the run directory will end up, for messages (run_seeds).
    `resume`: continue the interrupted comparison `cfg.output_dir/cfg.name` (see
    `resume_comparison`): runs that finished are read back, an interrupted federated
    run continues from its last checkpoint, the rest run."""
    console = console or Console()
    unknown = sorted(set(regimes) - set(REGIMES))
    if unknown or not regimes:
        raise ConfigError(f"unknown regime(s) {unknown}; choose from {', '.join(REGIMES)}")
    out = final_run_dir(cfg, cfg.name or f"regimes-{time.strftime('%Y%m%d-%H%M%S')}")
    shown = shown_as or out
    methods = methods or [cfg.method_name]
    method_cfgs = method_configs(cfg, methods, method_overrides)
    epochs_budget(cfg.federated)
    build_strategy(cfg.federated, cfg.method.lr, cfg.method_name)
    splits = make_splits(cfg.data)
    partition = partition_examples(splits.train, splits.labels, cfg.federated, cfg.seed)
    pooled = Splits(partition.pooled_train, splits.validation, splits.test, splits.labels,
                    splits.notes + partition.notes)  # fmt: skip
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    plan = {"kind": "regimes", "config": _plan_config(cfg, out),
            "methods": methods, "regimes": list(regimes),
            "method_overrides": method_overrides, "train_overrides": train_overrides,
            "federated_overrides": federated_overrides}  # fmt: skip
    with _interruptible(out, shown_as, resume, plan, console) as staging:
        for mcfg in method_cfgs:
            mname = dataclasses.replace(cfg, method=mcfg).method_name
            fcfg = dataclasses.replace(cfg.federated, **(federated_overrides or {}).get(mname, {}))
            tcfg = dataclasses.replace(
                cfg.train, epochs=epochs_budget(fcfg), max_steps=0,
                **(train_overrides or {}).get(mname, {}),
            )  # fmt: skip
            base = dataclasses.replace(cfg, method=mcfg, train=tcfg, federated=fcfg,
                                       output_dir=str(staging))  # fmt: skip
            curves[mname] = {}
            runs: list[tuple[Splits, str, str]] = []  # (data, regime, site)
            if "centralized" in regimes:
                runs.append((pooled, "centralized", "all"))
            if "local" in regimes:
                for st in partition.sites:
                    own = Splits(st.train, splits.validation, splits.test, splits.labels)
                    runs.append((own, "local", st.name))
            # A local-only site is a federation's site without the federation: it trains
            # at the sites' batch size (federated.local_batch_size), so both take the
            # same optimizer steps on the same data.
            site_train = dataclasses.replace(tcfg, batch_size=fcfg.local_batch_size
                                             or tcfg.batch_size)  # fmt: skip
            for data, regime, site in runs:
                # Centralized = one model on the pooled data; local = one per site.
                what = "pooled data" if site == "all" else f"{site}, local only"
                console.rule(f"{mname}: {regime}, {what} ({len(data.train)} examples)")
                name = f"{mname}-{regime}" + ("" if site == "all" else f"-{site}")
                run_cfg = dataclasses.replace(base, name=name)
                if regime == "local":
                    run_cfg = dataclasses.replace(run_cfg, train=site_train)
                r = _finished(staging / name, console) if resume else None
                r = r or run_centralized(run_cfg, console, data, shown_as=shown / name)
                if regime == "local":
                    r = {**r, "site_batch_size": site_train.batch_size}
                rows.append({**r, "regime": regime, "site": site})
                key = regime if site == "all" else f"local {site}"
                curves[mname][key] = val_curve(staging / name)
            refused = query_refusal(base) if "federated" in regimes else ""
            if refused:
                console.print(f"[yellow]{mname}: no federated run: {escape(refused)}[/]")
            elif "federated" in regimes:
                console.rule(f"{mname}: federated ({len(partition.sites)} sites)")
                name = f"{mname}-federated"
                r = _finished(staging / name, console) if resume else None
                ckpt = find_checkpoint(staging / name) if resume and r is None else None
                if ckpt is not None:  # _finished left only a resumable one
                    console.print(f"  continuing from its checkpoint ({ckpt.name})")
                    r = run_federated(base, console, splits, shown_as=shown / name,
                                      resume=staging / name)  # fmt: skip
                elif r is None:
                    # Interrupted before its first checkpoint: start it again.
                    shutil.rmtree(staging / name, ignore_errors=True)
                    r = run_federated(dataclasses.replace(base, name=name), console, splits,
                                      shown_as=shown / name)  # fmt: skip
                rows.append({**r, "regime": "federated", "site": "all"})
                curves[mname]["federated"] = val_curve(staging / name)
        title = f"Centralized vs local vs federated on {describe_data(cfg)}"
        write_regimes_report(staging, rows, curves, title, cfg)
        write_json(staging / COMPARISON_FILE, comparison_rows(rows))
        summary = findings(rows, metric_names(rows)[0])
        if summary:  # the post's two findings, also on the terminal
            console.print(Markdown("\n".join(summary)))
    console.print(f"[bold]comparison report:[/] {shown / 'report.md'}")
    return out


def comparison_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of comparison.json: each run's summary without the bulky fields (its
    report, confusion matrix, history and per-example scores stay in its own folder)."""
    bulky = ("report", "confusion", "run_dir", "history", "test_scores", "test_groups")
    return [{k: v for k, v in r.items() if k not in bulky} for r in rows]


def _plan_config(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """The config as `--resume` needs it: data files as absolute paths, so that a
    comparison resumed from another directory reads the same files."""
    data = cfg.data
    if cfg.data.path and cfg.data.source in ("fpb", "file"):
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    fed = dataclasses.replace(cfg.federated, site_paths=tuple(
        str(Path(p).resolve()) for p in cfg.federated.site_paths
    ))  # fmt: skip
    return dataclasses.replace(cfg, name=out.name, data=data, federated=fed).to_dict()


@contextlib.contextmanager
def _interruptible(out: Path, shown_as: Path | None, resume: bool, plan: dict[str, Any],
                   console: Console) -> Iterator[Path]:  # fmt: skip
    """The comparison's staging folder, which an interruption or a failure keeps
    (with the plan and the runs finished so far) for `fedtune compare --resume`, and
    removes when nothing had finished. Only the outermost comparison (`shown_as` None)
    decides and tells the user how to continue."""
    with staged_run_dir(out, resumable=True, resume=resume) as staging:
        if not resume:  # written whole, then renamed: a kept folder never has half a plan
            write_json(staging / f"{PLAN_FILE}.tmp", plan)
            (staging / f"{PLAN_FILE}.tmp").replace(staging / PLAN_FILE)
        try:
            yield staging
        except BaseException as e:
            if shown_as is None:
                what = "interrupted" if isinstance(e, KeyboardInterrupt | SystemExit) else "failed"
                if resume or _resumable(staging):
                    console.print(f"[yellow]{what}; the finished runs are kept. Continue "
                                  f"with: fedtune compare --resume {out}")  # fmt: skip
                else:  # e.g. a model not installed: nothing to continue, nothing left behind
                    shutil.rmtree(staging, ignore_errors=True)
                    console.print(f"[yellow]{what} before any run finished; nothing kept")
            raise


def _resumable(staging: Path) -> bool:
    """Whether a stopped comparison has anything `--resume` would keep: a finished
    run (its report, the last file it writes) or a federated checkpoint, at any depth
    (a --seeds comparison nests one comparison a seed)."""
    patterns = (REPORT_FILE, f"{CHECKPOINT_DIR}*/{STATE_FILE}")
    return any(next(staging.rglob(p), None) is not None for p in patterns)


def _finished(run_dir: Path, console: Console) -> dict[str, Any] | None:
    """The summary of a run that finished before the comparison was interrupted
    (the last line of its metrics.jsonl), else None; an unfinished one is removed
    unless it is a federated run with a checkpoint (the caller resumes it)."""
    records = read_jsonl(run_dir / METRICS_FILE)
    # The report is the last file a run writes, after its summary line.
    if records and records[-1].get("event") == "test" and (run_dir / REPORT_FILE).is_file():
        console.print(f"[dim]{run_dir.name}: finished before the interruption; kept[/]")
        return {**records[-1], "run_dir": str(run_dir)}
    ckpt = find_checkpoint(run_dir)
    if run_dir.exists() and (ckpt is None or checkpoint_state(ckpt).complete):
        shutil.rmtree(run_dir)  # cut short before its first round, or while writing its report
    return None


def resume_comparison(path: str | Path, console: Console | None = None) -> Path:
    """Continue an interrupted `fedtune compare` (with or without `--seeds`) in its
    staging folder, as it was asked for: the same config, methods, regimes, overrides
    and seeds (from its compare.json). Finished runs are not run again."""
    p = Path(path)
    p = final_of_staging(p) or p
    staging = staging_dir(p)
    if p.exists() and not staging.exists():
        raise ConfigError(f"{p} is a finished comparison: nothing to resume")
    if not (staging / PLAN_FILE).is_file():
        raise ConfigError(
            f"{p}: no interrupted comparison there (looked for {staging / PLAN_FILE}); pass "
            "the folder that `fedtune compare` printed when it was interrupted"
        )
    if p.exists():
        raise ConfigError(f"{p} exists and {staging} too: remove one of them; a finished "
                          "comparison and an interrupted one cannot share a name")  # fmt: skip
    try:
        plan = json.loads((staging / PLAN_FILE).read_text("utf-8"))
        cfg = RunConfig.from_dict(plan["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{staging / PLAN_FILE} cannot be read ({e}): this comparison "
                          f"cannot be resumed; remove {staging} and start it again") from None
    cfg = dataclasses.replace(cfg, name=p.name, output_dir=str(p.parent))
    console = console or Console()
    console.print(f"[bold]resuming[/] {p}")
    overrides = {k: plan[k] for k in ("method_overrides", "train_overrides",
                                      "federated_overrides")}  # fmt: skip
    if plan["kind"] == "seeds":
        return run_seeds(cfg, plan["seeds"], plan["methods"], tuple(plan["regimes"]), console,
                         resume=True, **overrides)  # fmt: skip
    return run_regimes(cfg, plan["methods"], tuple(plan["regimes"]), console, resume=True,
                       **overrides)  # fmt: skip


def run_seeds(
    cfg: RunConfig,
    seeds: list[int],
    methods: list[str] | None = None,
    regimes: tuple[str, ...] = REGIMES,
    console: Console | None = None,
    resume: bool = False,
    **overrides: Any,
) -> Path:
    """The comparison once per seed, then a report of mean and standard deviation.

    The seed drives model initialisation, data order and the partition into sites;
    the train/validation/test split stays `data.split_seed`, so every seed is tested
    on the same sentences. One run shows a gap between regimes; several show whether
    it is larger than the seed-to-seed spread (soft prompts on 113 validation
    sentences differ by several points between seeds). Each seed's full comparison
    is kept in `seed-<s>/`."""
    console = console or Console()
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds needs at least two different seeds, got {seeds}")
    out = final_run_dir(cfg, cfg.name or f"seeds-{time.strftime('%Y%m%d-%H%M%S')}")
    plan = {"kind": "seeds", "config": _plan_config(cfg, out),
            "seeds": seeds, "methods": methods, "regimes": list(regimes),
            **{k: overrides.get(k) for k in ("method_overrides", "train_overrides",
                                              "federated_overrides")}}  # fmt: skip
    with _interruptible(out, None, resume, plan, console) as staging:
        per_seed: dict[int, list[dict[str, Any]]] = {}
        for i, seed in enumerate(seeds, 1):
            console.rule(f"[bold]seed {seed} ({i} of {len(seeds)})")
            seed_cfg = dataclasses.replace(cfg, seed=seed, name=f"seed-{seed}",
                                           output_dir=str(staging))  # fmt: skip
            d = staging / f"seed-{seed}"
            if not (d / COMPARISON_FILE).is_file():
                d = run_regimes(seed_cfg, methods, regimes, console,
                                shown_as=out / f"seed-{seed}",
                                resume=resume and staging_dir(d).is_dir(), **overrides)  # fmt: skip
            else:
                console.print(f"[dim]seed {seed}: finished before the interruption; kept[/]")
            per_seed[seed] = json.loads((d / COMPARISON_FILE).read_text("utf-8"))
        write_seeds_report(staging, per_seed,
                           f"Centralized vs local vs federated on {describe_data(cfg)}, "
                           f"{len(seeds)} seeds")  # fmt: skip
    console.print(f"[bold]comparison report over seeds:[/] {out / 'report.md'}")
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def write_seeds_report(out: Path, per_seed: dict[int, list[dict[str, Any]]],
                       title: str) -> Path:  # fmt: skip
    """Mean ± sample standard deviation over seeds of every (method, regime, site),
    the per-seed gaps federated − centralized and federated − best local site (paired:
    same seed, same partition), and a plot of every seed's accuracy."""
    seeds = list(per_seed)
    groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for seed, rows in per_seed.items():
        for r in rows:
            groups.setdefault((r["method"], r["regime"], r["site"]), {})[seed] = r
    names = metric_names([r for rows in per_seed.values() for r in rows])
    top = names[0]
    label = LABEL
    lines = [
        f"# {title}", "",
        f"Seeds {', '.join(map(str, seeds))}: each changes model initialisation, data "
        "order and the partition into sites; every seed is tested on the same held-out "
        "examples. Metrics in points, mean ± sample standard deviation over "
        "seeds. Each seed's own report: " + ", ".join(f"[seed {s}](seed-{s}/report.md)"
                                                      for s in seeds) + ".", "",
        "| method | regime | site | seeds | " + " | ".join(label[k] for k in names)
        + f" | min–max {label[top]} |",
        "|---" * (len(names) + 5) + "|",  # one per column, or the table does not render
    ]  # fmt: skip
    for (method, regime, site), by_seed in groups.items():
        acc = [r[top] for r in by_seed.values()]
        lines.append(
            f"| {method} | {regime} | {site} | {len(by_seed)} | "
            + " | ".join(_pm([r[k] for r in by_seed.values()]) for k in names)
            + f" | {100 * min(acc):.1f}–{100 * max(acc):.1f} |"
        )
    gap_lines = []
    for method in dict.fromkeys(m for m, _, _ in groups):
        fed = groups.get((method, "federated", "all"), {})
        cen = groups.get((method, "centralized", "all"), {})
        local = {s: [g[s][top] for (m, reg, _), g in groups.items()
                     if m == method and reg == "local" and s in g] for s in seeds}  # fmt: skip
        vs_c = [fed[s][top] - cen[s][top] for s in seeds if s in fed and s in cen]
        vs_l = [fed[s][top] - max(local[s]) for s in seeds if s in fed and local[s]]
        if vs_c or vs_l:
            gap_lines.append(f"| {method} | {_pm(vs_c) if vs_c else '-'} "
                             f"| {_pm(vs_l) if vs_l else '-'} |")  # fmt: skip
    if gap_lines:
        lines += ["", f"Paired gaps (same seed), {label[top]} points:", "",
                  "| method | federated − centralized | federated − best local-only site |",
                  "|---|---|---|", *gap_lines]  # fmt: skip
    _plot_seeds(groups, out / "seeds.png", top, label[top])
    lines += ["", f"![test {label[top]} of every seed](seeds.png)", ""]
    write_json(out / "seeds.json", [
        {"method": m, "regime": reg, "site": site, "seed": s,
         **{k: r[k] for k in names}}
        for (m, reg, site), g in groups.items() for s, r in g.items()
    ])  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot_seeds(groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]],
                path: Path, key: str = "accuracy", name: str = "accuracy") -> None:  # fmt: skip
    methods = list(dict.fromkeys(m for m, _, _ in groups))
    widest = max(sum(1 for k in groups if k[0] == m) for m in methods)
    width = max(4.5, 1.2 + 0.8 * widest)
    fig, axes = plt.subplots(1, len(methods), figsize=(width * len(methods), 4.2),
                             squeeze=False)  # fmt: skip
    for ax, m in zip(axes[0], methods, strict=True):
        keys = [k for k in groups if k[0] == m]
        for x, k in enumerate(keys):
            acc = [r[key] for r in groups[k].values()]
            mean, std = _mean_std(acc)
            ax.scatter([x] * len(acc), acc, s=18, alpha=0.6, color="tab:gray")
            ax.errorbar([x], [mean], yerr=[std], fmt="o", capsize=4,
                        color="tab:orange" if k[1] == "federated" else "tab:blue")  # fmt: skip
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k[1] if k[2] == "all" else f"local {k[2]}" for k in keys], rotation=30,
                           fontsize=8)  # fmt: skip
        ax.set_title(m)
        ax.set_ylabel(f"test {name} (mean ± sd; dots: seeds)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(curves: dict[str, dict[str, list[tuple[float, float]]]], keep: str, path: Path,
          title: str) -> None:  # fmt: skip
    methods = list(curves)
    fig, axes = plt.subplots(1, len(methods), figsize=(5.6 * len(methods), 4.2), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        for label, pts in curves[m].items():
            if not pts or (not label.startswith(keep) and label != "federated"):
                continue
            style = "s-" if label == "federated" else ("o-" if label == "centralized" else ".--")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(m)
        ax.set_xlabel("epochs of training (federated: rounds x local epochs)")
        ax.set_ylabel("validation loss (shared set)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a figure's regime may not have run
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ranking(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Methods ranked by the task's primary test metric per regime, and the
    cost-versus-quality plot."""
    first, second = metric_names(rows)[:2]
    pooled = [r for r in rows if r["regime"] in ("centralized", "federated")]
    pooled.sort(key=lambda r: (r["regime"], -r[first]))
    lines = ["## Ranking: quality versus cost", "",
             "Local-only rows are left out (one per site, each on a third of the data).", "",
             f"| rank | regime | method | {LABEL.get(first, first)} | {LABEL[second]} "
             "| trainable params | bytes total | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rank, last = 0, ""
    for r in pooled:
        rank = 1 if r["regime"] != last else rank + 1
        last = r["regime"]
        total = f"{r['bytes_total'] / 1e6:.2f} MB" if r["regime"] == "federated" else "-"
        lines.append(f"| {rank} | {r['regime']} | {r['method']} | {_pct(r[first])} "
                     f"| {_pct(r[second])} | {r['trainable_parameters']:,} | {total} "
                     f"| {r['wall_seconds']:.1f} |")  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    markers = {"centralized": "o", "federated": "s"}
    for r in pooled:
        for ax, x in ((axes[0], r["wall_seconds"]),
                      (axes[1], r.get("bytes_total", 0) / 1e6 if r["regime"] == "federated"
                       else None)):  # fmt: skip
            if x is None:
                continue
            ax.scatter(max(x, 1e-3), r[first], marker=markers[r["regime"]], s=45,
                       color="tab:blue" if r["regime"] == "centralized" else "tab:orange")
            ax.annotate(r["method"], (max(x, 1e-3), r[first]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)  # fmt: skip
    axes[0].set_xlabel("wall time, s (log)")
    name = LABEL.get(first, first)
    axes[0].set_title(f"{name} vs compute (o centralized, s federated)")
    axes[1].set_xlabel("bytes communicated in total, MB (log)")
    axes[1].set_title(f"federated: {name} vs communication")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel(f"test {name}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ranking.png", dpi=110)
    plt.close(fig)
    return [*lines, "", "![quality versus cost](ranking.png)", ""]


def _samples_side_by_side(rows: list[dict[str, Any]]) -> list[str]:
    """Generation: the first test answers of every regime next to the reference, one
    table per method (every run is tested on the same examples in the same order)."""
    from fedtune.report import table_cell

    lines: list[str] = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method and r.get("samples")]
        if not runs:
            continue
        heads = [r["regime"] if r["regime"] != "local" else f"local {r['site']}" for r in runs]
        lines += [f"## Generated answers side by side: {method}", "",
                  "| instruction | reference | " + " | ".join(heads) + " |",
                  "|---" * (len(runs) + 2) + "|"]  # fmt: skip
        for i, first in enumerate(runs[0]["samples"]):
            answers = [r["samples"][i]["prediction"] if i < len(r["samples"]) else ""
                       for r in runs]  # fmt: skip
            lines.append(f"| {table_cell(first['instruction'], 200)} "
                         f"| {table_cell(first['reference'], 200)} | "
                         + " | ".join(table_cell(a, 200) for a in answers) + " |")  # fmt: skip
        lines.append("")
    return lines


PROPORTIONS = ("accuracy", "pair_accuracy")
"""Metrics that are a share of test examples: a binomial standard error applies."""


def paired_gap(
    a: list[float], b: list[float], groups: list[str] | None = None, resamples: int = 5000,
    seed: int = 0,
) -> tuple[float, float, float] | None:
    """mean(a) - mean(b) of two models' per-example scores on the same test examples,
    and its 95% paired bootstrap interval (scipy's, percentile: the test examples are
    resampled, both models' scores of an example move together, so what the two get
    right alike cancels). With `groups` (each example's group, e.g. the report a TAT-QA
    question is about), whole groups are resampled instead (a cluster bootstrap of the
    ratio sum of differences / number of examples): questions about one report are not
    independent, and resampling them one by one understates the spread when reports
    differ (on TAT-QA's test set the two came out close: docs/federated.md). The
    caller vouches that both are of the same examples in the same order (one
    comparison's shared test set); None when the scores are missing (summaries
    written before per-example scores were kept) or differ in length."""
    if not a or len(a) != len(b):
        return None
    from scipy.stats import bootstrap

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    gap = float(np.mean(x - y))
    if groups and len(groups) == len(a) and 1 < len(set(groups)) < len(a):
        names = sorted(set(groups))
        index = {g: i for i, g in enumerate(names)}
        at = np.array([index[g] for g in groups])
        sums = np.bincount(at, weights=x - y, minlength=len(names))
        sizes = np.bincount(at, minlength=len(names)).astype(float)
        ci = bootstrap((sums, sizes), lambda s, n, axis=-1: s.sum(axis) / n.sum(axis),
                       paired=True, vectorized=True, n_resamples=resamples, batch=1000,
                       method="percentile", rng=seed).confidence_interval  # fmt: skip
    else:
        ci = bootstrap((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis), paired=True,
                       vectorized=True, n_resamples=resamples, batch=1000,
                       method="percentile", rng=seed).confidence_interval  # fmt: skip
    return gap, float(ci.low), float(ci.high)


def _gap(fed: dict[str, Any], other: dict[str, Any], top: str) -> str:
    """`+1.5` points, with `[-0.3, +3.2]` (the paired 95% interval) when both runs kept
    their per-example test scores."""
    text = f"{100 * (fed[top] - other[top]):+.1f}"
    gap = paired_gap(fed.get("test_scores") or [], other.get("test_scores") or [],
                     fed.get("test_groups"))  # fmt: skip
    if gap is not None:
        text += f" [{100 * gap[1]:+.1f}, {100 * gap[2]:+.1f}]"
    return text


Row = dict[str, Any]


def _by_regime(rows: list[Row], trained: bool = False) -> Iterator[
        tuple[str, Row | None, Row | None, list[Row]]]:  # fmt: skip
    """Per method, in the rows' order: (method, its federated row, its centralized row,
    its local-only rows); `trained`: frozen methods' rows left out."""
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows
                if r["method"] == method and not (trained and r.get("kind") == "frozen")]
        yield (method, next((r for r in runs if r["regime"] == "federated"), None),
               next((r for r in runs if r["regime"] == "centralized"), None),
               [r for r in runs if r["regime"] == "local"])  # fmt: skip


def _loss_findings(rows: list[dict[str, Any]]) -> list[str]:
    """The findings as the source post reads them, off its validation-loss curves: the
    loss on the shared validation set of the model each run kept (by default its
    lowest: `train.select_by`), federated against centralized and every local-only
    site. Trained methods only: a frozen method has no curve and keeps no model by its
    loss. Empty when no method has a federated loss and another regime's."""

    def loss(r: dict[str, Any] | None) -> float | None:
        v = (r or {}).get("best_val_loss")
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    lines = []
    for method, fed_row, cen_row, local in _by_regime(rows, trained=True):
        fed, cen = loss(fed_row), loss(cen_row)
        sites = [(r["site"], v) for r in local if (v := loss(r)) is not None]
        if fed is None or (cen is None and not sites):
            continue
        said = []
        if cen is not None:
            ratio = f" ({fed / cen:.2f}x)" if cen > 0 else ""
            side = "below" if fed < cen else "above" if fed > cen else "level with"
            said.append(f"{side} centralized{ratio}")
        if sites:
            above = [name for name, v in sites if v <= fed]
            said.append("below every local-only site" if not above
                        else f"not below {', '.join(above)}")  # fmt: skip
        low = min(sites, key=lambda x: x[1]) if sites else None
        lines.append(f"| {method} | {fed:.4f} | {'-' if cen is None else f'{cen:.4f}'} | "
                     + (f"{low[1]:.4f} ({low[0]})" if low else "-")
                     + f" | {'; '.join(said)} |")  # fmt: skip
    if not lines:
        return []
    return [
        "The post reads both findings off validation-loss curves (figures (a) and (b)): "
        "the loss on the shared validation set of the model each run kept (its lowest "
        "unless `train.select_by` chose by a metric; federated: the best round's global "
        "model).", "",
        "| method | federated | centralized | lowest local-only site | reading |",
        "|---|---|---|---|---|", *lines, "",
        "On the test set, which chose no model:", "",
    ]  # fmt: skip


def findings(rows: list[dict[str, Any]], top: str) -> list[str]:
    """The source post's two findings, read off one comparison, per method: federated
    against centralized training, and against the best local-only site, in points of
    the task's first metric (positive: federated higher), each with its paired 95%
    bootstrap interval over the test examples (`paired_gap`). For a share of test
    examples, also the binomial standard error of one run's score on this test set.
    Empty when no method ran federated and another regime."""
    lines = []
    for method, fed, cen, local in _by_regime(rows):
        if fed is None or (cen is None and not local):
            continue
        vs_c = _gap(fed, cen, top) if cen else "-"
        best = max(local, key=lambda r: r[top]) if local else None
        vs_l = f"{_gap(fed, best, top)} ({best['site']})" if best else "-"
        se = "-"
        if top in PROPORTIONS and fed.get("n_test"):
            p = fed[top]
            se = f"{100 * (p * (1 - p) / fed['n_test']) ** 0.5:.1f}"
        lines.append(f"| {method} | {vs_c} | {vs_l} | {se} |")
    if not lines:
        return []
    groups = next((r.get("test_groups") for r in rows if r.get("test_groups")), None)
    over = (f"the test examples, resampled as {len(set(groups))} whole groups "
            "(`data.group_column`)" if groups else "the test examples")
    return [
        "## The source post's two findings", "",
        *_loss_findings(rows),
        f"Federated ≈ centralized, and federated above every site trained alone: test "
        f"{LABEL[top]} of the federated model minus each, in points (positive: federated "
        f"higher), with [the 95% interval] of a paired bootstrap over {over}: "
        "how much the gap could move on other test examples of this kind; an interval "
        "that holds 0 is no difference this test set can show. It does not hold the "
        "spread of training (seed, data order): `fedtune compare --seeds 1,2,3` gives "
        "means and paired gaps over seeds.", "",
        "| method | federated − centralized | federated − best local-only site "
        "| one run's standard error |",
        "|---|---|---|---|", *lines, "",
    ]  # fmt: skip


def _epochs(x: float) -> str:
    """Whole epochs as such; a fractional budget (rounds x 1/3 epoch) or a model chosen
    between epochs (`train.eval_every`) to one decimal."""
    return f"{x:.0f}" if abs(x - round(x)) < 1e-3 else f"{x:.1f}"


def write_regimes_report(out: Path, rows: list[dict[str, Any]],
                         curves: dict[str, dict[str, list[tuple[float, float]]]], title: str,
                         cfg: RunConfig) -> Path:  # fmt: skip
    _plot(curves, "centralized", out / "fig_a_centralized_vs_federated.png",
          "(a) centralized vs federated")  # fmt: skip
    _plot(curves, "local", out / "fig_b_local_vs_federated.png",
          "(b) each local-only site vs the federated global model")  # fmt: skip
    fed = cfg.federated
    names = metric_names(rows)
    header = ["method", "regime", "site", "train examples", "trained (best)",
              *(LABEL[k] for k in names), "trainable params", "bytes/site/round down / up",
              "bytes total", "wall time (s)", "run"]  # fmt: skip
    lines = [
        f"# {title}",
        "",
        "Same split, method and budget for every regime: federated runs `rounds` x "
        f"{fed.local_epochs:g} local epochs ({fed.strategy}, {fed.transport} transport, "
        f"partition `{fed.partition}`), centralized training and each local-only site as "
        f"many epochs; batch size {cfg.train.batch_size} (a different batch at the sites, "
        "federated and local-only alike, is noted). Validation: the shared set; test: the "
        "held-out set. `trained (best)`: epochs or rounds run, and the one with the "
        + ("lowest validation loss" if cfg.train.select_by == "loss"
           else f"highest validation {cfg.train.select_by} (`train.select_by`)")
        + " (the model that is tested).",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",  # one per column: a table only renders when they match
    ]
    for r in rows:
        if r["regime"] == "federated":
            traffic = (f"{r['bytes_down_per_site_round'] / 1e6:.3f} MB / "
                       f"{r['bytes_up_per_site_round'] / 1e6:.3f} MB")  # fmt: skip
            total = f"{r['bytes_total'] / 1e6:.2f} MB"
            trained = (f"{r['rounds']} rounds ({r['best_round']})" if r["strategy"] != "query"
                       else "by query")  # fmt: skip
            if r.get("site_batch_size", cfg.train.batch_size) != cfg.train.batch_size:
                trained += f", site batch {r['site_batch_size']}"
        elif r["kind"] == "frozen":
            traffic, total, trained = "-", "-", "fit"
        else:
            traffic, total = "-", "-"
            best = r["best_step"] / max(r["steps"], 1) * r["epochs"]
            trained = f"{_epochs(r['epochs'])} epochs ({_epochs(best)})"
            if r.get("site_batch_size", cfg.train.batch_size) != cfg.train.batch_size:
                trained += f", site batch {r['site_batch_size']}"
        lines.append(
            f"| {r['method']} | {r['regime']} | {r['site']} | {r['n_train']} | {trained} "
            + "".join(f"| {_pct(r[k])} " for k in names)
            + f"| {r['trainable_parameters']:,} | {traffic} | {total} | {r['wall_seconds']:.1f} "
            f"| [{r['name']}]({r.get('link') or r['name'] + '/report.md'}) |"
        )
    lines += [
        "",
        "![(a) centralized vs federated](fig_a_centralized_vs_federated.png)",
        "",
        "![(b) local-only sites vs federated](fig_b_local_vs_federated.png)",
        "",
    ]
    lines += findings(rows, names[0])
    if len({r["method"] for r in rows}) > 1:
        lines += _ranking(rows, out)
    lines += _samples_side_by_side(rows)
    for r in rows:
        if r["regime"] == "federated" and r.get("personalized"):
            lines += [f"### {r['method']}", "", personalized_table(r["personalized"]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
