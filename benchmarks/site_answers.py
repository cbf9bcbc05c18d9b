"""How a federation by query could choose among its sites' generated answers.

    python benchmarks/site_answers.py COMPARE_DIR [--method icl]

COMPARE_DIR is a `fedtune compare` of a generation method federated by query (e.g.
`icl`) with its local-only regime: each site's answers are in
`<method>-local-<site>/answers.jsonl`, the federated run's (the answer of the surest
site, fedtune.methods.icl_generate.GenerationICL.combine_answers) in
`<method>-federated/answers.jsonl`. A site's federated answer is its local-only answer
(same demonstrations, same greedy decoding), so other rules can be scored on the same
answers without another LM pass:

- `surest site`: what the federated run kept (its own scores);
- `a site at random`: the sites' mean score, what picking a site blindly gets on average;
- `consensus`: per question, the answer with the highest mean ROUGE-L to the other
  sites' answers (minimum Bayes risk over the sites, as self-consistency votes over
  samples); ties to the site whose name sorts first;
- `oracle`: the best site's answer per question, by its score against the reference
  (no rule can know it).

Each rule's mean score (the runs' primary metric, ROUGE-L) and its gap to the surest
site with the paired 95% bootstrap interval (fedtune.federated.compare.paired_gap).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.federated.compare import paired_gap
from fedtune.generate import score_texts


def _answers(run: Path) -> list[dict[str, Any]]:
    path = run / "answers.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: COMPARE_DIR must hold a generation method's "
                         "federated and local-only runs "
                         "(fedtune compare --regimes local,federated)")  # fmt: skip
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def consensus(answers: list[list[str]]) -> list[int]:
    """Per question, the index of the site whose answer has the highest mean ROUGE-L to
    the other sites' answers (ties: the first site). `answers[s][q]`: site s, question q."""
    n_sites = len(answers)
    chosen = []
    for q in range(len(answers[0])):
        texts = [answers[s][q] for s in range(n_sites)]
        agree = [np.mean([score_texts([texts[i]], [texts[j]])[0]["rougeL"]
                          for j in range(n_sites) if j != i]) if n_sites > 1 else 0.0
                 for i in range(n_sites)]  # fmt: skip
        chosen.append(int(np.argmax(agree)))
    return chosen


def rules(compare_dir: Path, method: str = "icl") -> dict[str, list[float]]:
    """Each rule's per-question scores (see the module docstring)."""
    fed = _answers(compare_dir / f"{method}-federated")
    sites = sorted(p for p in compare_dir.glob(f"{method}-local-*") if p.is_dir())
    if not sites:
        raise SystemExit(f"no {method}-local-* runs in {compare_dir}: run the local regime too")
    local = [_answers(p) for p in sites]
    questions = [r["instruction"] for r in fed]
    for p, rows in zip(sites, local, strict=True):
        if [r["instruction"] for r in rows] != questions:
            raise SystemExit(f"{p.name} answered other questions than the federated run")
    key = "rougeL"
    per_site = np.array([[r[key] for r in rows] for rows in local])  # [S, Q]
    chosen = consensus([[r["prediction"] for r in rows] for rows in local])
    return {
        "surest site (the federated run)": [r[key] for r in fed],
        "a site at random (the sites' mean)": per_site.mean(0).tolist(),
        "consensus (highest mean ROUGE-L to the other sites)": [
            float(per_site[s, q]) for q, s in enumerate(chosen)],
        "oracle (the best site per question)": per_site.max(0).tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--method", default="icl")
    args = ap.parse_args()
    scores = rules(args.compare_dir, args.method)
    reference = scores["surest site (the federated run)"]
    print(f"{len(reference)} questions; ROUGE-L x 100; gap to the surest site with its "
          "paired 95% bootstrap interval")
    for name, s in scores.items():
        gap = paired_gap(s, reference)
        shown = "" if gap is None or s is reference else (
            f"  {100 * gap[0]:+.1f} [{100 * gap[1]:+.1f}, {100 * gap[2]:+.1f}]")
        print(f"{name:55s} {100 * np.mean(s):5.1f}{shown}")


if __name__ == "__main__":
    sys.exit(main())
