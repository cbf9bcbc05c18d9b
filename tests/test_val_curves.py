"""benchmarks/val_curves.py: saved runs' validation-loss curves on one plot, a
federated run's rounds placed at round x local_epochs epochs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import val_curves


def _run(path: Path, local_epochs: float, rows: list[dict[str, object]]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"federated": {"local_epochs": local_epochs}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_put_rounds_and_epochs_on_one_axis(tmp_path: Path) -> None:
    fed = _run(tmp_path / "fed", 1 / 3, [
        {"event": "round", "round": 0, "val_loss": 6.0},  # before training: not plotted
        {"event": "round", "round": 1, "val_loss": 1.2},
        {"event": "round", "round": 3, "val_loss": 0.5},
        # round 3 again: the run was resumed from the checkpoint of round 2
        {"event": "round", "round": 3, "val_loss": 0.4},
        {"event": "test", "accuracy": 0.9},
    ])  # fmt: skip
    cen = _run(tmp_path / "cen", 1.0, [
        {"event": "eval", "epoch": 1.0, "step": 75, "val_loss": 0.3},
        {"event": "eval", "epoch": 1.5, "step": 112, "val_loss": 0.2},
    ])  # fmt: skip
    assert val_curves.curve(fed) == [(pytest.approx(1 / 3), 1.2), (pytest.approx(1.0), 0.4)]
    assert val_curves.curve(cen) == [(1.0, 0.3), (1.5, 0.2)]
    out = tmp_path / "figs" / "val.png"
    val_curves.main(["--out", str(out), "--title", "t", f"federated={fed}", f"centralized={cen}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="LABEL=RUN_DIR"):
        val_curves.main(["--out", str(tmp_path / "x.png"), str(tmp_path)])
    with pytest.raises(SystemExit, match="not a run folder"):
        val_curves.main(["--out", str(tmp_path / "x.png"), f"a={tmp_path}"])
    assert not (tmp_path / "x.png").exists()
