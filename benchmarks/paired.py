"""Compare saved runs paired, example by example, on their shared test set.

    python benchmarks/paired.py REFERENCE_RUN OTHER_RUN [OTHER_RUN ...]

Each run's per-example test scores (the primary metric of each test example: 1/0 for
accuracy, the answer's ROUGE-L for generation, 1/0 per preference pair) come from its
summary (`test_scores`, kept since 2026-12-05) or, for older runs, from testing its
saved model again on the test split its config.json rebuilds. Then, for each OTHER_RUN:
the gap to REFERENCE_RUN in points with its paired 95% bootstrap interval
(`fedtune.federated.compare.paired_gap`, the one `fedtune compare` reports) and how
much of the gap each category of test example (class, answer type, HH subset) makes,
so a gap carried by a handful of examples shows as such.

The runs must share a test set (same data and split settings); this is checked.

    python benchmarks/paired.py --held-out 600 --save SCORES.json REFERENCE_RUN OTHER_RUN...

`--held-out N` also tests every run's saved model on N more examples that none of the
runs trained, validated or was tested on: taken (seeded) from the training pool that
`data.limit` left unused, leaving out every group (TAT-QA: every report's table) any of
the runs saw in any split, so no context is shared. A test set of 102 questions gives a
paired interval ~12 ROUGE-L points wide; N more questions narrow it by about
sqrt(102 / (102 + N)). The gap is given on the held-out examples and on them together
with the test set. `--save` keeps each example's score as each run's are done (a long
job resumes; a larger N later tests only the examples it adds).

Where the examples have groups (`data.group_column`; TAT-QA: the report each question
is about) every gap also gets the interval that resamples whole groups
(`paired_gap(..., groups)`): questions about one report can succeed or fail together
(TAT-QA's 102 test questions are 17 reports).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.data.sources import Example


def _summary(run: Path) -> dict[str, Any]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def _config(run: Path) -> Any:
    from fedtune.config import RunConfig

    return RunConfig.from_dict(json.loads((run / "config.json").read_text()))


def _text(e: Example) -> str:
    return e.text + "\n" + e.context


def _test(run: Path, examples: list[Example]) -> list[float]:
    """Per-example primary scores of the run's saved model on `examples`."""
    from fedtune.adapted import AdaptedModel
    from fedtune.evaluate import evaluate_features

    cfg = _config(run)
    model = AdaptedModel.load(run / "model")
    print(f"{run.name}: testing the saved model ({len(examples)} examples)", file=sys.stderr)
    metrics = evaluate_features(model, model.formulation.encode_examples(examples),
                                cfg.train.eval_batch_size, bf16=cfg.train.bf16)  # fmt: skip
    print(f"{run.name}: {metrics.primary} {metrics.score:.4f}", file=sys.stderr)
    return metrics.per_example


Scored = tuple[list[float], list[str], list[str]]
"""Per-example primary scores, each example's category, each example's group."""


def scores(run: Path, save: Path | None = None) -> tuple[Scored, list[str]]:
    """The run's test scores (kept in its summary, else its saved model tested again,
    kept in `save`) with the test examples' categories and groups; and their texts."""
    from fedtune.data import example_groups, make_splits

    test = make_splits(_config(run).data).test
    meta = [e.label for e in test], example_groups(test)
    summary = _summary(run)  # read once: the kept scores, or the score to check against
    if summary.get("test_scores"):
        return (summary["test_scores"], *meta), [_text(e) for e in test]
    print(f"{run.name}: no test scores in its summary: testing the saved model again "
          "(or reading them from --save)", file=sys.stderr)  # fmt: skip
    per_example = _scores_on(run, test, save)
    print(f"{run.name}: its summary says {summary.get('primary', '')} "
          f"{summary.get(summary.get('primary', ''), float('nan'))}", file=sys.stderr)  # fmt: skip
    return (per_example, *meta), [_text(e) for e in test]


def held_out(runs: list[Path], n: int, seed: int = 0) -> list[Example]:
    """`n` examples of the reference run's data that no run saw: the training pool with
    `data.limit` lifted, less every example any run trained on and every group (shared
    context) any run trained, validated or was tested on. Seeded, in data order."""
    from dataclasses import replace

    from fedtune.data import make_splits

    ref = _config(runs[0]).data
    pool = make_splits(replace(ref, limit=0, limit_skip=0)).train
    seen_texts: set[str] = set()
    seen_groups: set[str] = set()
    for run in runs:
        splits = make_splits(_config(run).data)
        for e in (*splits.train, *splits.validation, *splits.test):
            seen_texts.add(_text(e))
            if e.group:
                seen_groups.add(e.group)
    fresh = [e for e in pool if _text(e) not in seen_texts and e.group not in seen_groups]
    if len(fresh) < n:
        sys.exit(f"--held-out {n}: only {len(fresh)} examples of {runs[0]}'s data are unseen "
                 "by every run; ask for fewer")  # fmt: skip
    keep = sorted(np.random.default_rng(seed).permutation(len(fresh))[:n])
    return [fresh[i] for i in keep]


def _digest(e: Example) -> str:
    return hashlib.sha256(f"{_text(e)}\0{e.response}".encode()).hexdigest()[:20]


def _scores_on(run: Path, examples: list[Example], save: Path | None) -> list[float]:
    """The run's scores on `examples` from its saved model. With `save`, each example's
    score is kept there as soon as the run's batch is done (keyed by the run and the
    example), so a job that stops resumes, and a larger --held-out tests only the
    examples it adds (the draw is a seeded permutation: N examples are the first N of
    any larger draw)."""
    from fedtune.atomic import write_json_atomic

    name = str(run.resolve())
    kept = json.loads(save.read_text()) if save and save.exists() else {}
    mine: dict[str, float] = kept.get(name, {})
    keys = [_digest(e) for e in examples]
    todo = [e for e, k in zip(examples, keys, strict=True) if k not in mine]
    if todo:
        mine = {**mine, **dict(zip(map(_digest, todo), _test(run, todo), strict=True))}
        if save:
            kept = json.loads(save.read_text()) if save.exists() else {}
            write_json_atomic(save, {**kept, name: {**kept.get(name, {}), **mine}})
    return [mine[k] for k in keys]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="the reference run, then the others")
    ap.add_argument("--held-out", type=int, default=0, metavar="N",
                    help="also test every run on N examples no run saw (see above)")
    ap.add_argument("--save", type=Path, help="keep scores tested here (resumable)")
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("give a reference run and at least one other run")
    if args.held_out < 0:
        ap.error(f"--held-out {args.held_out}: give a number of examples >= 0")

    tested = [scores(run, args.save) for run in args.runs]
    ref_texts = tested[0][1]
    for run, (_, texts) in zip(args.runs[1:], tested[1:], strict=True):
        if texts != ref_texts:
            sys.exit(f"{run} was tested on other examples than {args.runs[0]}: "
                     "compare runs of the same data and split settings")  # fmt: skip
    tables = {"the test set": [t for t, _ in tested]}
    if args.held_out:
        from fedtune.data import example_groups

        extra = held_out(args.runs, args.held_out)
        meta = [e.label for e in extra], example_groups(extra)
        ex = [(_scores_on(run, extra, args.save), *meta) for run in args.runs]
        tables[f"{len(extra)} held-out examples"] = ex
        tables["the test set and the held-out examples"] = [
            (s + x, c + xc, g + xg)  # the held-out groups are none of the test set's
            for (s, c, g), (x, xc, xg) in zip(tables["the test set"], ex, strict=True)]
    for title, rows in tables.items():
        _table(title, args.runs, rows)


def _table(title: str, runs: list[Path], rows: list[Scored]) -> None:
    """The gaps to the reference: the paired interval over examples, and over whole
    groups (e.g. TAT-QA's reports) when the examples have them."""
    from fedtune.federated.compare import paired_gap

    ref, _, groups = rows[0]
    n = len(ref)
    print(f"\n{title}: reference {runs[0].name} (score {100 * np.mean(ref):.1f}, {n} examples"
          + (f" in {len(set(groups))} groups" if groups else "") + ")\n")
    print("| run | score | gap | paired 95% interval, examples resampled "
          + ("| groups resampled " if groups else "") + "| gap by category (points of the total) |")
    print("|---|---|---|---|" + ("---|" if groups else "") + "---|")
    for run, (other, cats, _) in zip(runs[1:], rows[1:], strict=True):
        gap = paired_gap(other, ref)
        assert gap is not None  # same examples, checked above
        cells = [f"[{100 * gap[1]:+.1f}, {100 * gap[2]:+.1f}]"]
        if groups:
            by_group = paired_gap(other, ref, groups)
            assert by_group is not None
            cells.append(f"[{100 * by_group[1]:+.1f}, {100 * by_group[2]:+.1f}]")
        diff = np.asarray(other) - np.asarray(ref)
        by_cat = {c: 100 * diff[[i for i, k in enumerate(cats) if k == c]].sum() / n
                  for c in dict.fromkeys(cats)}  # fmt: skip
        parts = ", ".join(f"{c} ({cats.count(c)}) {v:+.1f}" for c, v in by_cat.items())
        print(f"| {run.name} | {100 * np.mean(other):.1f} | {100 * gap[0]:+.1f} "
              f"| {' | '.join(cells)} | {parts} |")  # fmt: skip


if __name__ == "__main__":
    main()
