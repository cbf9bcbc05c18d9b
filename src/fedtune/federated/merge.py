"""Comparisons run apart, merged into the report one `fedtune compare` would write.

On a small machine each regime of a long comparison is its own process (`--regimes
federated`, then `--regimes centralized`, ...), and `benchmarks/seeds_parallel.py` runs
every (method, seed, regime) as its own job; later a centralized run may be added with
other evaluation settings. Each of those folders is a comparison of its own, with a
report of one regime: the source post's two figures need the regimes together.

`merge_comparisons` reads the finished comparison folders (the `seed-*` folders of a
`--seeds` comparison; or single runs inside a comparison, to take only those), checks
that their runs can be compared (the same data settings, so the same test examples,
and the same training budget), and writes one
report per seed with figures (a) and (b), the table and the two findings with their
paired intervals; with several seeds, the report over seeds (mean ± sd, paired gaps)
on top. The runs are not copied: the report links to them where they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

from fedtune.config import RunConfig
from fedtune.errors import ConfigError
from fedtune.federated.compare import val_curve, write_regimes_report, write_seeds_report
from fedtune.regimes import describe_data
from fedtune.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    PLAN_FILE,
    REPORT_FILE,
    read_jsonl,
    staged_run_dir,
    write_json,
)

COMPARISON_FILE = "comparison.json"
REGIME_ORDER = {"centralized": 0, "local": 1, "federated": 2}
# Settings a comparison gives its runs itself (the budget as epochs, the sites' batch).
_DERIVED = {"name", "output_dir", "seed", "train.epochs", "train.max_steps", "train.batch_size"}


def comparison_folders(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """(comparison folder, run name or None for all its runs) for each of `paths`: a
    folder `fedtune compare` wrote, the `seed-*` folders of a `--seeds` comparison, or
    one run inside a comparison (to take that run only). Anything else is an error that
    says what to pass instead."""
    found: list[tuple[Path, str | None]] = []
    for p in paths:
        if p.name.startswith(".") and p.name.endswith(".partial"):
            raise ConfigError(f"{p} is an unfinished comparison: finish it with `fedtune "
                              f"compare --resume {p.parent / p.name[1:-len('.partial')]}` "
                              "first, or leave it out")  # fmt: skip
        if not p.is_dir():
            raise ConfigError(f"{p}: no such folder; pass folders `fedtune compare` wrote")
        seeds = sorted((d for d in p.glob("seed-*") if (d / COMPARISON_FILE).is_file()),
                       key=lambda d: d.name)  # fmt: skip
        if (p / COMPARISON_FILE).is_file():
            found.append((p, None))
        elif seeds:
            found.extend((d, None) for d in seeds)
        elif (p / METRICS_FILE).is_file() and (p.parent / COMPARISON_FILE).is_file():
            names = [r["name"] for r in
                     json.loads((p.parent / COMPARISON_FILE).read_text("utf-8"))]  # fmt: skip
            if p.name not in names:
                raise ConfigError(f"{p} is not among the runs {p.parent / COMPARISON_FILE} "
                                  f"lists ({', '.join(names)})")  # fmt: skip
            found.append((p.parent, p.name))
        else:
            raise ConfigError(f"{p} holds no finished comparison (no {COMPARISON_FILE}); "
                              "pass folders `fedtune compare` wrote, or runs inside them")
    twice = {str(f / (n or "")) for f, n in found if found.count((f, n)) > 1}
    if twice:
        raise ConfigError(f"given twice: {', '.join(sorted(twice))}")
    return found


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _budget(config: dict[str, Any], regime: str) -> float:
    """Epochs of training a run was given: rounds x local epochs for a federated run,
    `train.epochs` for the others (which `fedtune compare` set to that product)."""
    if regime == "federated":
        return float(config["federated"]["rounds"]) * float(config["federated"]["local_epochs"])
    return float(config["train"]["epochs"])


def _read(folder: Path, name: str | None, out: Path) -> list[dict[str, Any]]:
    """A comparison's rows (only the run `name` when given), each with its run's
    per-example test scores, config and validation curve, and a link from `out` to the
    run's report."""
    rows = json.loads((folder / COMPARISON_FILE).read_text("utf-8"))
    plan = folder / PLAN_FILE
    asked = json.loads(plan.read_text("utf-8"))["config"] if plan.is_file() else None
    read = []
    for r in rows:
        if name is not None and r["name"] != name:
            continue
        run = folder / r["name"]
        records = read_jsonl(run / METRICS_FILE)
        if not records or not (run / CONFIG_FILE).is_file():
            raise ConfigError(f"{run}: the run of {r['regime']} {r['site']} that "
                              f"{folder / COMPARISON_FILE} lists is missing or incomplete "
                              "(moved or deleted?)")  # fmt: skip
        summary = records[-1]
        config = json.loads((run / CONFIG_FILE).read_text("utf-8"))
        read.append({
            **r,
            "test_scores": summary.get("test_scores") or [],
            "test_groups": summary.get("test_groups") or [],
            "link": os.path.relpath(run / REPORT_FILE, out),
            "_folder": folder, "_run": run, "_config": config, "_asked": asked or config,
            "_curve": val_curve(run),
        })  # fmt: skip
    return read


def _check(rows: list[dict[str, Any]]) -> None:
    """One test set, one budget per method and seed, and each run once."""
    first = rows[0]
    for r in rows[1:]:
        if r["_config"]["data"] != first["_config"]["data"] or r["n_test"] != first["n_test"]:
            a, b = _flat(first["_config"]["data"]), _flat(r["_config"]["data"])
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            what = (", ".join(f"data.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
                    or f"{first['n_test']} vs {r['n_test']} test examples")  # fmt: skip
            raise ConfigError(f"{first['_folder']} and {r['_folder']} were not tested on the "
                              f"same examples ({what}): only runs of one split can be "
                              "compared")  # fmt: skip
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    budget: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        key = (r["_config"]["seed"], r["method"], r["regime"], r["site"])
        if key in seen:
            raise ConfigError(f"{seen[key]['_run']} and {r['_run']} are both {r['method']} "
                              f"{r['regime']} {r['site']} with seed {key[0]}: leave one out "
                              "(give the runs of a comparison you want one by one)")  # fmt: skip
        seen[key] = r
        group = (r["_config"]["seed"], r["method"])
        ref = budget.setdefault(group, r)
        x, y = _budget(ref["_config"], ref["regime"]), _budget(r["_config"], r["regime"])
        if abs(x - y) > 1e-6 * max(x, y, 1.0):
            raise ConfigError(f"{ref['_folder']} trained {r['method']} {x:g} epochs "
                              f"({ref['regime']}), {r['_folder']} {y:g} ({r['regime']}): "
                              "regimes are compared at one budget (federated.rounds x "
                              "federated.local_epochs); merge runs of the same budget")  # fmt: skip


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(rows, key=lambda r: (methods.index(r["method"]), REGIME_ORDER[r["regime"]],
                                       r["site"]))  # fmt: skip


def _differences(rows: list[dict[str, Any]], ref: dict[str, Any]) -> list[str]:
    """The merged folders, each with the settings it was asked for that differ from the
    reference's (the federated run's folder when there is one)."""
    base = _flat(ref["_asked"])
    lines = ["## Merged from", "",
             "Comparisons run apart and merged by `fedtune merge`; the settings each "
             f"was started with that differ from those of {ref['_folder']} (seed, name and "
             "output folder aside):", "",
             "| folder | runs | seed | settings that differ |", "|---|---|---|---|"]  # fmt: skip
    for folder in dict.fromkeys(r["_folder"] for r in rows):
        mine = [r for r in rows if r["_folder"] == folder]
        asked = _flat(mine[0]["_asked"])
        diff = [f"`{k}` {asked.get(k)!r} (vs {base.get(k)!r})"
                for k in sorted(asked.keys() | base.keys())
                if k not in _DERIVED and asked.get(k) != base.get(k)]  # fmt: skip
        runs = ", ".join(r["name"] for r in mine)
        lines.append(f"| {folder} | {runs} | {mine[0]['_config']['seed']} "
                     f"| {'; '.join(diff) or '-'} |")  # fmt: skip
    return [*lines, ""]


def _write_one(out: Path, rows: list[dict[str, Any]]) -> None:
    """One seed's regimes report (figures a and b, table, findings) in `out`."""
    rows = _ordered(rows)
    ref = next((r for r in rows if r["regime"] == "federated"), rows[0])
    cfg = RunConfig.from_dict(ref["_asked"])
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        key = r["regime"] if r["site"] == "all" else f"local {r['site']}"
        curves.setdefault(r["method"], {})[key] = r["_curve"]
    title = f"Centralized vs local vs federated on {describe_data(cfg)} (merged)"
    report = write_regimes_report(out, rows, curves, title, cfg)
    report.write_text(report.read_text() + "\n" + "\n".join(_differences(rows, ref)))
    write_json(out / COMPARISON_FILE, [
        {k: v for k, v in r.items()
         if not k.startswith("_") and k not in ("test_scores", "test_groups", "link")}
        for r in rows
    ])  # fmt: skip


def write_merged(folders: list[Path], out: Path) -> Path:
    """Merge finished comparison folders into `out` (an existing, empty or scratch
    folder; `merge_comparisons` is the all-or-nothing form): one seed gives one regimes
    report; several give `seed-<s>/` reports and the report over seeds. Returns the
    report's path."""
    rows = [r for f, name in comparison_folders(folders) for r in _read(f, name, out)]
    if not rows:
        raise ConfigError("the comparisons given hold no runs")
    _check(rows)
    seeds = sorted({r["_config"]["seed"] for r in rows})
    if len(seeds) == 1:
        _write_one(out, rows)
        return out / REPORT_FILE
    per_seed = {}
    for s in seeds:
        d = out / f"seed-{s}"
        d.mkdir(parents=True, exist_ok=True)
        mine = [{**r, "link": os.path.relpath(out / r["link"], d)}
                for r in rows if r["_config"]["seed"] == s]  # fmt: skip
        _write_one(d, mine)
        per_seed[s] = json.loads((d / COMPARISON_FILE).read_text("utf-8"))
    cfg = RunConfig.from_dict(rows[0]["_asked"])
    title = (f"Centralized vs local vs federated on {describe_data(cfg)}, {len(seeds)} seeds "
             "(merged)")
    return write_seeds_report(out, per_seed, title)


def merge_comparisons(folders: list[Path], out: Path, console: Console | None = None) -> Path:
    """`write_merged` into a new folder `out`, written whole or not at all."""
    console = console or Console()
    if out.exists():
        raise ConfigError(f"{out} already exists; give --out a new folder")
    comparison_folders(folders)  # fail on a bad input before anything is written
    with staged_run_dir(out) as staging:
        report = write_merged(folders, staging).read_text("utf-8")
        # Links were made relative to the staging folder, a sibling of `out`: the same.
    # The findings (one seed) or the table over seeds, also on the terminal.
    head = "## The source post's two findings"
    shown = head + report.split(head, 1)[1].split("\n## ", 1)[0] if head in report else report
    console.print(Markdown(shown.split("![", 1)[0]))
    console.print(f"[bold]merged report:[/] {out / REPORT_FILE}")
    return out
