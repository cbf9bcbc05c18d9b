"""benchmarks/site_answers.py: rules for choosing among sites' generated answers, scored
on saved answers (a compare's local-only and federated runs), by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_script, script_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT, site_answers = benchmark_script("site_answers")

QUESTIONS = ["q1", "q2", "q3"]
REFERENCES = ["red apple", "blue sky", "green tea"]
# Per site, per question: two sites agree on q1 (and are right), all differ on q2, on
# q3 site b agrees with nobody and is right.
SITES = {"a": ["red apple", "a blue sky", "black coffee"],
         "b": ["red apple", "grey cloud", "green tea"],
         "c": ["yellow pear", "blue", "black coffee"]}  # fmt: skip


def _write(run: Path, predictions: list[str], sites: list[str] | None = None) -> None:
    from fedtune.generate import score_texts

    run.mkdir(parents=True)
    rows = []
    for i, (q, ref, pred) in enumerate(zip(QUESTIONS, REFERENCES, predictions, strict=True)):
        row = {"instruction": q, "reference": ref, "prediction": pred,
               **score_texts([pred], [ref])[0]}  # fmt: skip
        if sites:
            row["site"] = sites[i]
        rows.append(row)
    (run / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rules_on_answers_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from fedtune.generate import score_texts

    for name, preds in SITES.items():
        _write(tmp_path / f"icl-local-{name}", preds)
    # The federated run kept site c's answer on q1, a's on q2 and q3.
    _write(tmp_path / "icl-federated", ["yellow pear", "a blue sky", "black coffee"],
           ["c", "a", "a"])  # fmt: skip
    # Consensus: q1 -> a (agrees with b; ties go to the first site), q2 -> a ("a blue
    # sky" shares words with both others), q3 -> a (a and c agree; b is alone).
    assert site_answers.consensus([SITES[s] for s in "abc"]) == [0, 0, 0]
    r = site_answers.rules(tmp_path)
    rouge = {s: [score_texts([p], [ref])[0]["rougeL"]
                 for p, ref in zip(SITES[s], REFERENCES, strict=True)] for s in "abc"}
    assert r["surest site (the federated run)"] == pytest.approx(
        [rouge["c"][0], rouge["a"][1], rouge["a"][2]])
    assert r["a site at random (the sites' mean)"] == pytest.approx(
        np.mean([rouge[s] for s in "abc"], 0).tolist())
    assert r["consensus (highest mean ROUGE-L to the other sites)"] == pytest.approx(
        rouge["a"])
    assert r["oracle (the best site per question)"] == pytest.approx([1.0, rouge["a"][1], 1.0])
    code, out, _ = script_main(monkeypatch, capsys, SCRIPT, tmp_path)
    assert code == 0 and "3 questions" in out and "oracle" in out
    assert "consensus (highest mean ROUGE-L to the other sites)" in out
    # A site that answered other questions is refused, by name.
    (tmp_path / "icl-local-c" / "answers.jsonl").write_text(
        json.dumps({"instruction": "other", "reference": "x", "prediction": "x",
                    "rougeL": 1.0}) + "\n")  # fmt: skip
    with pytest.raises(SystemExit, match="icl-local-c answered other questions"):
        site_answers.rules(tmp_path)


def test_script_without_local_runs_names_the_fix(tmp_path: Path) -> None:
    _write(tmp_path / "icl-federated", ["x", "y", "z"], ["a", "a", "a"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert p.returncode != 0 and "run the local regime too" in p.stderr
