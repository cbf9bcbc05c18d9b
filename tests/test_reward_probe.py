"""benchmarks/reward_probe.py: the Bradley-Terry linear probe and the script end to end."""

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
SCRIPT, reward_probe = benchmark_script("reward_probe")


def test_probe_finds_a_planted_preference_and_not_a_missing_one() -> None:
    rng = np.random.default_rng(0)
    direction = np.zeros(16)
    direction[3] = 1.0
    # Chosen answers sit further along feature 3 than their rejected twins.
    rejected = rng.normal(size=(400, 16))
    chosen = rejected + rng.normal(size=(400, 16)) * 0.3 + 0.5 * direction
    scaler, w = reward_probe.fit_probe(chosen[:300], rejected[:300], c=1.0)
    assert np.argmax(np.abs(w)) == 3 and w[3] > 0
    assert reward_probe.pair_accuracy(scaler, w, chosen[300:], rejected[300:]) > 0.9
    # The same pairs swapped: the probe learns the opposite reward.
    scaler, w = reward_probe.fit_probe(rejected[:300], chosen[:300], c=1.0)
    assert reward_probe.pair_accuracy(scaler, w, chosen[300:], rejected[300:]) < 0.1
    # No preference in the features: held-out accuracy near chance.
    noise = rng.normal(size=(400, 16))
    scaler, w = reward_probe.fit_probe(noise[:300], rejected[:300], c=1.0)
    assert 0.3 < reward_probe.pair_accuracy(scaler, w, noise[300:], rejected[300:]) < 0.7


def test_probe_reads_where_a_reward_head_reads_and_the_length_rule() -> None:
    # transformers' sequence-classification heads read the last token that is not the
    # pad token: with pad = end token (SmolLM2), the last response token before it.
    assert reward_probe.read_positions([[5, 6, 7, 2], [5, 6, 7]], pad_id=2) == [2, 2]
    assert reward_probe.read_positions([[5, 6, 7, 2]], pad_id=0) == [3]
    assert reward_probe.read_positions([[5, 6, 7, 2]], pad_id=None) == [3]
    lengths = np.array([[5, 3, 4, 4], [4, 4, 4, 2]])  # longer, shorter, tie, longer
    assert reward_probe.length_rule(lengths) == (1 + 0 + 0.5 + 1) / 4


def test_script_reads_the_reward_models_split_and_resumes(
    tiny_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    rows = [{"prompt": f"Is {i % 7} a good number? ({i})", "chosen": f"yes {i % 7} profit rose",
             "rejected": f"no loss fell {i % 7}"} for i in range(60)]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    config = tmp_path / "pref.toml"
    config.write_text(f'[data]\ntask = "preference"\nsource = "file"\npath = "{data}"\n'
                      'test_size = 0.2\nval_size = 0.1\n[model]\nmax_length = 24\n'
                      '[method]\nname = "reward"\n')  # fmt: skip
    out = tmp_path / "probe"
    argv = [sys.executable, str(SCRIPT), "--out", str(out), "--model", tiny_models["llama"],
            "--config", str(config)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    # The pairs a reward run of this config trains and is tested on.
    from fedtune.config import load_config
    from fedtune.data.splits import make_splits

    splits = make_splits(load_config(str(config), [f"model.name={tiny_models['llama']}"]).data)
    assert (len(splits.train), len(splits.test)) == (42, 12)
    assert "42 training pairs, 12 test pairs" in first.stdout
    assert "train: 84/84 sequences" in first.stderr
    [cache] = out.glob("features-*.npz")
    feats = reward_probe._load(cache)
    assert feats["train"]["last"].shape[:2] == (2, 42)
    assert feats["test"]["mean"].shape[:2] == (2, 12)
    # The tiny model has 2 layers, so half and three quarters of the way are one depth.
    assert feats["depths"] == [1, 2]
    table = [line for line in first.stdout.splitlines() if line.startswith("| last")
             or line.startswith("| mean")]  # fmt: skip
    assert len(table) == 2 * 2 * 6 and sum("chosen by CV" in line for line in table) == 1
    [saved] = out.glob("probe-*.json")
    summary = json.loads(saved.read_text())
    assert summary["chosen"]["cv"] == max(r["cv"] for r in summary["rows"])
    # The planted preference ("yes ... rose" chosen over "no ... fell") is found.
    assert summary["chosen"]["test"] >= 0.9
    # A second call reads the features back: no forward pass, the same table.
    code, out_again, err = script_main(monkeypatch, capsys, SCRIPT, *argv[2:])
    assert code == 0 and "sequences" not in err
    assert [x for x in out_again.splitlines() if x.startswith("|")] == [
        x for x in first.stdout.splitlines() if x.startswith("|")
    ]
    # Another split is another cache entry, never the stale features.
    code, out_other, err = script_main(monkeypatch, capsys, SCRIPT, *argv[2:], "--set",
                                       "data.test_size=0.3")  # fmt: skip
    assert code == 0 and "sequences" in err
    assert "18 test pairs" in out_other and len(list(out.glob("features-*.npz"))) == 2


def test_batched_features_equal_one_at_a_time(tiny_models: dict[str, str],
                                              tmp_path: Path) -> None:  # fmt: skip
    """Padding a batch changes nothing a probe reads (right padding, positions kept)."""
    rows = [{"prompt": f"Q{i} " + "word " * (i % 5), "chosen": "yes " * (1 + i % 3),
             "rejected": f"no {i}"} for i in range(24)]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    config = tmp_path / "pref.toml"
    config.write_text(f'[data]\ntask = "preference"\nsource = "file"\npath = "{data}"\n'
                      'test_size = 0.25\nval_size = 0.0\n[method]\nname = "reward"\n')  # fmt: skip
    overrides = [f"model.name={tiny_models['llama']}"]
    one = reward_probe.extract(overrides, str(config), batch_size=1)
    many = reward_probe.extract(overrides, str(config), batch_size=16)
    for split in ("train", "test"):
        for pool in ("last", "mean"):
            np.testing.assert_allclose(one[split][pool], many[split][pool], atol=1e-4)
