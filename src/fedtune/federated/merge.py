"""Comparisons run apart, merged into the report one `fedtune compare` would write.

On a small machine each regime of a long comparison is its own process (`--regimes
federated`, then `--regimes centralized`, ...), and `benchmarks/seeds_parallel.py` runs
every (method, seed, regime) as its own job; later a centralized run may be added with
other evaluation settings. Each of those folders is a comparison of its own, with a
report of one regime: the source post's two figures need the regimes together.

`merge_comparisons` reads finished comparison folders (the `seed-*` folders of a
`--seeds` comparison; single runs inside a comparison, to take only those; a merged
folder, which lists where its runs are), checks that their runs can be compared, and
writes one report per seed with figures (a) and (b), the table and the two findings
with their paired intervals; with several seeds, the report over seeds (mean ± sd,
paired gaps) on top. Comparable means: tested on the same examples (the test split's
fingerprint, `test_digest`, or for runs older than it the same data settings), and per
seed and method the same model, method settings, partition into sites and budget.
The runs are not copied: the report links to them where they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

from fedtune.config import REGIMES, RunConfig
from fedtune.errors import ConfigError, FedtuneError
from fedtune.federated.compare import (
    comparison_rows,
    epochs_budget,
    val_curve,
    write_regimes_report,
    write_seeds_report,
)
from fedtune.regimes import describe_data
from fedtune.report import table_cell
from fedtune.runs import (
    COMPARISON_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_FILE,
    final_of_staging,
    read_jsonl,
    staged_run_dir,
    write_json,
)

PARTITION_KEYS = ("sites", "sizes", "partition", "alpha", "min_site_size", "site_paths")
"""federated.* settings that decide the sites' data, and so the centralized run's pool."""
_NOT_COMPARED = {"name", "output_dir", "seed", "train.epochs", "train.max_steps",
                 "data.path", "federated.site_paths"}  # fmt: skip
"""Settings a comparison sets per run (the budget in epochs), or checked apart (paths)."""


def comparison_folders(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """(comparison folder, run name or None for all its runs) for each of `paths`: a
    folder `fedtune compare` or `fedtune merge` wrote, the `seed-*` folders of one that
    ran several seeds, or one run inside a comparison (to take that run only). Anything
    else is an error that says what to pass instead."""
    found: list[tuple[Path, str | None]] = []
    for given in paths:
        p = Path(os.path.abspath(given))
        final = final_of_staging(p)
        if final is not None:
            raise ConfigError(f"{given} is an unfinished comparison: finish it with `fedtune "
                              f"compare --resume {final}` first, or leave it out")  # fmt: skip
        if not p.is_dir():
            raise ConfigError(f"{given}: no such folder; pass folders `fedtune compare` wrote")
        seeds = sorted(d for d in p.glob("seed-*") if (d / COMPARISON_FILE).is_file())
        if (p / COMPARISON_FILE).is_file():
            found.append((p, None))
        elif seeds:
            found.extend((d, None) for d in seeds)
        elif (p / METRICS_FILE).is_file() and (p.parent / COMPARISON_FILE).is_file():
            names = [r.get("name") for r in _load(p.parent / COMPARISON_FILE)]
            if p.name not in names:
                raise ConfigError(f"{given} is not among the runs {p.parent / COMPARISON_FILE} "
                                  f"lists ({', '.join(map(str, names))})")  # fmt: skip
            found.append((p.parent, p.name))
        else:
            raise ConfigError(f"{given} holds no finished comparison (no {COMPARISON_FILE}); "
                              "pass folders `fedtune compare` wrote, or runs inside them")
    whole = {f for f, n in found if n is None}
    twice = sorted({str(f / (n or "")) for f, n in found
                    if found.count((f, n)) > 1 or (n is not None and f in whole)})  # fmt: skip
    if twice:
        raise ConfigError(f"given twice (a folder, or a run and its comparison): "
                          f"{', '.join(twice)}")  # fmt: skip
    return found


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); leave its comparison out or "
                          "run it again") from None  # fmt: skip


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read(folder: Path, name: str | None) -> list[dict[str, Any]]:
    """A comparison's rows (only the run `name` when given), each with its run's
    per-example test scores, config and validation curve, and where the run is."""
    read = []
    for r in _load(folder / COMPARISON_FILE):
        if name is not None and r.get("name") != name:
            continue
        try:
            # A merged folder's rows say where their runs are; a comparison's are inside.
            run = Path(os.path.normpath(folder / r.get("run", r["name"])))
            regime, site = r["regime"], r["site"]
        except KeyError as e:
            raise ConfigError(f"{folder / COMPARISON_FILE}: a row has no {e}; it was not "
                              "written by `fedtune compare` or `fedtune merge`") from None
        records = read_jsonl(run / METRICS_FILE) if (run / METRICS_FILE).is_file() else []
        if not records or records[-1].get("event") != "test" or not (run / CONFIG_FILE).is_file():
            raise ConfigError(f"{run}: the {regime} run ({site}) that {folder / COMPARISON_FILE} "
                              "lists is missing or unfinished (moved or deleted?)")  # fmt: skip
        summary, config = records[-1], _load(run / CONFIG_FILE)
        try:
            cfg = RunConfig.from_dict(config)
        except FedtuneError as e:
            raise ConfigError(f"{run / CONFIG_FILE}: {e}") from None
        read.append({
            **{k: v for k, v in r.items() if k != "run"},
            "test_scores": summary.get("test_scores") or [],
            "test_groups": summary.get("test_groups") or [],
            "test_digest": summary.get("test_digest", ""),
            "_run": run, "_config": config, "_cfg": cfg, "_curve": val_curve(run, config, records),
        })  # fmt: skip
    return read


def _data_settings(row: dict[str, Any]) -> dict[str, Any]:
    """The data settings that decide the test split; a file by its name (the same file
    is often given relative in one run and absolute in another)."""
    data = dict(row["_config"]["data"])
    data["path"] = Path(data.get("path") or "").name
    return data


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = _flat(a), _flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _refuse(a: dict[str, Any], b: dict[str, Any], what: str, keys: list[str]) -> None:
    fa, fb = _flat(a["_config"]), _flat(b["_config"])
    shown = "; ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys[:5])
    raise ConfigError(f"{a['_run']} and {b['_run']} {what} ({shown}): merge runs that "
                      "differ only in how they were evaluated")  # fmt: skip


def _check(rows: list[dict[str, Any]]) -> None:
    """One test set; per seed and method one model, method, partition and budget; each
    run once; federated and centralized over the same pooled examples."""
    first = rows[0]
    for r in rows[1:]:
        if first["test_digest"] and r["test_digest"]:
            if r["test_digest"] != first["test_digest"]:
                raise ConfigError(f"{first['_run']} and {r['_run']} were tested on different "
                                  "examples (their test splits' fingerprints differ): only "
                                  "runs of one split can be compared")  # fmt: skip
        elif _data_settings(r) != _data_settings(first):
            keys = [f"data.{k}" for k in _differing(_data_settings(first), _data_settings(r))]
            _refuse(first, r, "were not tested on the same examples", keys)
        if r["n_test"] != first["n_test"]:
            raise ConfigError(f"{first['_run']} was tested on {first['n_test']} examples, "
                              f"{r['_run']} on {r['n_test']}: only runs of one split can be "
                              "compared")  # fmt: skip
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    ref: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        seed = r["_config"]["seed"]
        key = (seed, r["method"], r["regime"], r["site"])
        if key in seen:
            raise ConfigError(f"{seen[key]['_run']} and {r['_run']} are both {r['method']} "
                              f"{r['regime']} {r['site']} with seed {seed}: leave one out "
                              "(a comparison's runs can be given one by one)")  # fmt: skip
        seen[key] = r
        a = ref.setdefault((seed, r["method"]), r)
        for section, what in (("model", "ran different models"),
                              ("method", "ran the method with different settings")):  # fmt: skip
            if a["_config"][section] != r["_config"][section]:
                keys = [f"{section}.{k}" for k in
                        _differing(a["_config"][section], r["_config"][section])]  # fmt: skip
                _refuse(a, r, what, keys)
        fa, fr = (_partition(x) for x in (a, r))
        if fa != fr:
            _refuse(a, r, "split the data into sites differently",
                    [f"federated.{k}" for k in _differing(fa, fr)])  # fmt: skip
        if r["kind"] != "frozen":  # frozen methods train nothing: no budget to match
            x, y = _budget(a), _budget(r)
            if abs(x - y) > 1e-6 * max(x, y, 1.0):
                raise ConfigError(
                    f"{a['_run']} trained {r['method']} {x:g} epochs, {r['_run']} {y:g}: "
                    "regimes are compared at one budget (federated.rounds x "
                    "federated.local_epochs); merge runs of the same budget"
                )
    for seed, method in ref:
        pooled = {r["regime"]: r for r in rows if r["_config"]["seed"] == seed
                  and r["method"] == method and r["regime"] in ("centralized", "federated")}
        if len(pooled) == 2 and pooled["centralized"]["n_train"] != pooled["federated"]["n_train"]:
            c, f = pooled["centralized"], pooled["federated"]
            raise ConfigError(f"{c['_run']} trained on {c['n_train']} examples, {f['_run']}'s "
                              f"sites on {f['n_train']} together: centralized is the union of "
                              "the sites' data; merge runs of one partition")  # fmt: skip


def _partition(row: dict[str, Any]) -> dict[str, Any]:
    fed = row["_config"]["federated"]
    out = {k: fed.get(k) for k in PARTITION_KEYS}
    out["site_paths"] = [Path(p).name for p in fed.get("site_paths") or []]
    return out


def _budget(row: dict[str, Any]) -> float:
    """Epochs of training a run was given: rounds x local epochs for a federated run,
    `train.epochs` for the others (which `fedtune compare` set to that product)."""
    cfg: RunConfig = row["_cfg"]
    return epochs_budget(cfg.federated) if row["regime"] == "federated" else cfg.train.epochs


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(rows, key=lambda r: (methods.index(r["method"]), REGIMES.index(r["regime"]),
                                       r["site"]))  # fmt: skip


def _reference(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
    mine = [r for r in rows if r["method"] == method]
    return next((r for r in mine if r["regime"] == "federated"), mine[0])


def _differences(rows: list[dict[str, Any]]) -> list[str]:
    """Each merged run, with the settings of its config that differ from those of its
    method's reference run (the federated one when there is one). Model, method,
    partition and budget were checked equal; for a run that is not federated the
    federation's own settings do not apply, and a local-only site's batch is the
    sites' batch."""
    lines = ["## Merged from", "",
             "Runs of comparisons run apart, merged by `fedtune merge`. For each, the "
             "settings that differ from those of its method's federated run (model, "
             "method, partition into sites and budget are the same for all):", "",
             "| method | regime | site | run | settings that differ |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ref = _flat(_reference(rows, r["method"])["_config"])
        mine = _flat(r["_config"])
        skip = set(_NOT_COMPARED)
        if r["regime"] == "local":
            skip.add("train.batch_size")
        diff = [f"`{k}` {mine.get(k)!r} (vs {ref.get(k)!r})"
                for k in sorted(mine.keys() | ref.keys())
                if k not in skip and mine.get(k) != ref.get(k)
                and (r["regime"] == "federated" or not k.startswith("federated."))]  # fmt: skip
        lines.append(f"| {r['method']} | {r['regime']} | {r['site']} "
                     f"| {table_cell(str(r['_run']))} "
                     f"| {table_cell('; '.join(diff)) or '-'} |")  # fmt: skip
    return [*lines, ""]


def _write_one(out: Path, rows: list[dict[str, Any]]) -> None:
    """One seed's regimes report (figures a and b, table, findings) in `out`, and its
    comparison.json with where each run is (so a merged folder can be merged again)."""
    rows = [{**r, "run": os.path.relpath(r["_run"], out),
             "link": os.path.relpath(r["_run"] / REPORT_FILE, out)} for r in _ordered(rows)]
    cfg = _reference(rows, rows[0]["method"])["_cfg"]
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        key = r["regime"] if r["site"] == "all" else f"local {r['site']}"
        curves.setdefault(r["method"], {})[key] = r["_curve"]
    title = f"Centralized vs local vs federated on {describe_data(cfg)} (merged)"
    report = write_regimes_report(out, rows, curves, title, cfg)
    report.write_text(report.read_text() + "\n" + "\n".join(_differences(rows)))
    write_json(out / COMPARISON_FILE, comparison_rows(
        [{k: v for k, v in r.items() if not k.startswith("_") and k != "link"} for r in rows]))


def write_merged(folders: list[Path], out: Path) -> Path:
    """Merge finished comparison folders into `out` (an existing, empty or scratch
    folder; `merge_comparisons` is the all-or-nothing form): one seed gives one regimes
    report; several give `seed-<s>/` reports and the report over seeds. Returns the
    report's path."""
    rows = [r for f, name in comparison_folders(folders) for r in _read(f, name)]
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
        _write_one(d, [r for r in rows if r["_config"]["seed"] == s])
        per_seed[s] = _load(d / COMPARISON_FILE)
    cfg = rows[0]["_cfg"]
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
        # Paths to the runs are relative to the staging folder, a sibling of `out`: the
        # same from `out`.
        report = write_merged(folders, staging).read_text("utf-8")
    # The findings (one seed) or the table over seeds, also on the terminal.
    head = "## The source post's two findings"
    shown = head + report.split(head, 1)[1].split("\n## ", 1)[0] if head in report else report
    console.print(Markdown(shown.split("![", 1)[0]))
    console.print(f"[bold]merged report:[/] {out / REPORT_FILE}")
    return out
