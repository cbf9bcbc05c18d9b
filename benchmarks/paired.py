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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _summary(run: Path) -> dict[str, Any]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def scores(run: Path) -> tuple[list[float], list[str], list[str]]:
    """(per-example primary scores, each test example's category, its text)."""
    from fedtune.adapted import AdaptedModel
    from fedtune.config import RunConfig
    from fedtune.data import make_splits
    from fedtune.evaluate import evaluate_features

    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    test = make_splits(cfg.data).test
    cats, texts = [e.label for e in test], [e.text + "\n" + e.context for e in test]
    summary = _summary(run)  # read once: the kept scores, or the score to check against
    if summary.get("test_scores"):
        return summary["test_scores"], cats, texts
    model = AdaptedModel.load(run / "model")
    print(f"{run.name}: testing the saved model again ({len(test)} examples)", file=sys.stderr)
    metrics = evaluate_features(model, model.formulation.encode_examples(test),
                                cfg.train.eval_batch_size, bf16=cfg.train.bf16)  # fmt: skip
    print(f"{run.name}: {metrics.primary} {metrics.score:.4f} (its summary: "
          f"{summary.get(metrics.primary, float('nan')):.4f})", file=sys.stderr)  # fmt: skip
    return metrics.per_example, cats, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="the reference run, then the others")
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("give a reference run and at least one other run")
    from fedtune.federated.compare import paired_gap

    ref, _, ref_texts = scores(args.runs[0])
    n = len(ref)
    print(f"reference: {args.runs[0].name} (score {100 * np.mean(ref):.1f}, {n} test examples)\n")
    print("| run | score | gap | paired 95% interval | gap by category (points of the total) |")
    print("|---|---|---|---|---|")
    for run in args.runs[1:]:
        other, cats, texts = scores(run)
        if texts != ref_texts:
            sys.exit(f"{run} was tested on other examples than {args.runs[0]}: "
                     "compare runs of the same data and split settings")  # fmt: skip
        gap = paired_gap(other, ref)
        assert gap is not None  # same examples, checked above
        diff = np.asarray(other) - np.asarray(ref)
        by_cat = {c: 100 * diff[[i for i, k in enumerate(cats) if k == c]].sum() / n
                  for c in dict.fromkeys(cats)}  # fmt: skip
        parts = ", ".join(f"{c} ({cats.count(c)}) {v:+.1f}" for c, v in by_cat.items())
        print(f"| {run.name} | {100 * np.mean(other):.1f} | {100 * gap[0]:+.1f} "
              f"| [{100 * gap[1]:+.1f}, {100 * gap[2]:+.1f}] | {parts} |")  # fmt: skip


if __name__ == "__main__":
    main()
