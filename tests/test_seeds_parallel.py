"""benchmarks/seeds_parallel.py: every (method, seed, regime) of a comparison as its own
process, merged into fedtune's seeds report; runs past the budget are stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "seeds_parallel.py"


def _run(tiny: dict[str, str], table: Path, out: Path, *extra: str) -> str:
    cfg = out.parent / "cfg.toml"
    cfg.write_text(f'[data]\nsource = "file"\npath = "{table}"\n\n[model]\nname = "{tiny["bert"]}"'
                   '\n\n[method]\nname = "lora"\nlr = 0.01\n\n[train]\nbatch_size = 8\n\n'
                   '[federated]\npartition = "column"\nrounds = 1\n')  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, str(SCRIPT), str(cfg), "--methods", "lora",
                          "--out", str(out), "--set", "data.site_column=site", *extra],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_parallel_seeds_merge_into_one_report(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "par"
    _run(tiny_models, table, out, "--seeds", "1,2", "--regimes", "federated,centralized",
         "--jobs", "2")  # fmt: skip
    jobs = (out / "jobs.md").read_text()
    for s in (1, 2):
        for r in ("federated", "centralized"):
            assert f"| {s} | lora | {r} | finished |" in jobs
            comp = json.loads((out / "runs" / f"s{s}-lora-{r}" / "comparison.json").read_text())
            assert [x["regime"] for x in comp] == [r]
            cfg = json.loads((out / "runs" / f"s{s}-lora-{r}" / f"lora-{r}" / "config.json")
                             .read_text())  # fmt: skip
            assert cfg["seed"] == s and cfg["train"]["threads"] == 1
    rows = json.loads((out / "seeds.json").read_text())
    assert sorted((r["seed"], r["regime"]) for r in rows) == [
        (1, "centralized"), (1, "federated"), (2, "centralized"), (2, "federated")]
    acc = {(r["seed"], r["regime"]): r["accuracy"] for r in rows}
    gaps = [acc[s, "federated"] - acc[s, "centralized"] for s in (1, 2)]
    for s in (1, 2):  # each seed's own report, with the post's figure (a)
        assert (out / f"seed-{s}" / "fig_a_centralized_vs_federated.png").is_file()
        assert "## The source post's two findings" in (out / f"seed-{s}" / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert f"| lora | {100 * np.mean(gaps):.1f} ± {100 * np.std(gaps, ddof=1):.1f} | - |" in report


def test_runs_past_the_budget_are_stopped_and_listed(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "late"
    stdout = _run(tiny_models, table, out, "--seeds", "1,2", "--regimes", "federated",
                  "--jobs", "1", "--budget", "1", "--set", "federated.rounds=200")  # fmt: skip
    jobs = (out / "jobs.md").read_text()
    assert "| 1 | lora | federated | stopped at the budget |" in jobs
    assert "| 2 | lora | federated | not started (budget) |" in jobs
    assert not (out / "report.md").exists() and "stopped at the budget" in stdout
