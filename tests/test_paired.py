"""benchmarks/paired.py: saved runs compared example by example on their shared test set;
runs saved before per-example scores were kept are tested again, to the same scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import script_main

from fedtune.config import load_config
from fedtune.federated.compare import paired_gap, run_regimes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paired.py"


def _script(*runs: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, runs)], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip


def _compare(tiny_models: dict[str, str], table: Path, tmp_path: Path, *extra: str) -> Path:
    """LoRA on the tiny BERT, centralized and at each site alone: saved runs to compare."""
    cfg = load_config(None, [
        "data.source=file", f"data.path={table}", f"model.name={tiny_models['bert']}",
        "train.progress=false", "train.batch_size=8", f"output_dir={tmp_path}",
        "method.name=lora", "method.lr=0.01", "federated.rounds=1", *extra,
    ])  # fmt: skip
    return run_regimes(cfg, ["lora"], ("centralized", "local"))


def test_paired_compares_saved_runs_and_retests_old_ones(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = _compare(tiny_models, table, tmp_path, "name=cmp")
    cen = out / "lora-centralized"
    fed = sorted(out.glob("lora-local-*"))[0]  # a model of another training set
    kept = {}
    for run in (cen, fed):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        kept[run.name] = json.loads(lines[-1])["test_scores"]
    # The site's run as saved before 2026-12-05: no per-example scores in its summary.
    lines = (fed / "metrics.jsonl").read_text().splitlines()
    old = {k: v for k, v in json.loads(lines[-1]).items() if k != "test_scores"}
    (fed / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(old)]) + "\n")

    res = _script(cen, fed)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{fed.name}: no test scores in its summary: testing the saved model" in res.stderr
    gap = paired_gap(kept[fed.name], kept[cen.name])
    assert gap is not None
    row = next(x for x in res.stdout.splitlines() if x.startswith(f"| {fed.name} |"))
    # The re-tested scores are the kept ones: the same gap and interval.
    assert row.startswith(f"| {fed.name} | {100 * np.mean(kept[fed.name]):.1f} "
                          f"| {100 * gap[0]:+.1f} | [{100 * gap[1]:+.1f}, {100 * gap[2]:+.1f}] |")
    # The categories' shares add up to the gap.
    shares = [float(p.strip().rsplit(" ", 1)[1]) for p in row.split("|")[5].split(",")]
    assert sum(shares) == pytest.approx(100 * gap[0], abs=0.1 * len(shares))

    code, _, err = script_main(monkeypatch, capsys, SCRIPT, cen)  # one run: nothing to compare
    assert code != 0 and "at least one other run" in err


def test_held_out_examples_are_unseen_and_their_scores_are_kept(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = _compare(tiny_models, table, tmp_path, "name=ho", "data.limit=30")
    cen, site = out / "lora-centralized", sorted(out.glob("lora-local-*"))[0]
    save = tmp_path / "held.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    argv = [sys.executable, str(SCRIPT), "--held-out", "12", "--save", str(save), str(cen),
            str(site)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "12 held-out examples: reference lora-centralized" in res.stdout
    assert "the test set and the held-out examples" in res.stdout
    assert res.stderr.count("testing the saved model (12 examples)") == 2

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import paired  # the script's own functions

    from fedtune.data import make_splits

    held = paired.held_out([cen, site], 12)
    splits = [make_splits(paired._config(r).data) for r in (cen, site)]
    seen = {paired._text(e) for s in splits for e in (*s.train, *s.validation, *s.test)}
    assert len(held) == 12 and not seen & {paired._text(e) for e in held}
    kept = json.loads(save.read_text())
    assert len(kept) == 2 and all(len(v) == 12 for v in kept.values())
    # Kept scores are each model's own on those examples, and a second call reuses them.
    for r in (cen, site):
        mine = kept[str(r.resolve())]
        assert [mine[paired._digest(e)] for e in held] == paired._test(r, held)
    code, out, err = script_main(monkeypatch, capsys, SCRIPT, *argv[2:])
    assert code == 0 and "testing the saved model (12" not in err
    assert out == res.stdout
    # A larger draw holds the smaller one: only the examples it adds are tested.
    bigger = {paired._digest(e) for e in paired.held_out([cen, site], 16)}
    assert {paired._digest(e) for e in held} <= bigger
    code, _, err = script_main(monkeypatch, capsys, SCRIPT, *argv[2:3], "16", *argv[4:])
    assert code == 0 and err.count("testing the saved model (4 examples)") == 2

    code, _, err = script_main(monkeypatch, capsys, SCRIPT, "--held-out", "500", cen, site)
    assert code != 0 and "ask for fewer" in err
