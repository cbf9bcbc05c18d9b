"""Splits: de-duplication, seeded stratified random splits without leakage, and the
FinGPT preset, whose test set must equal `datasets`' own train_test_split(seed=42) on
the raw Sentences_50Agree.txt. Real-data tests need FEDTUNE_DATA_DIR (else skipped).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from fedtune.config import DataConfig
from fedtune.data import (
    Example,
    Splits,
    deduplicate,
    fingpt_split,
    load_fpb,
    make_splits,
    split_examples,
)
from fedtune.data.splits import fingpt_test_indices, normalize_text
from fedtune.errors import DataError

LABELS = ("negative", "neutral", "positive")


def _data(counts: tuple[int, int, int] = (60, 150, 90)) -> list[Example]:
    """Unbalanced synthetic data set with unique texts, interleaved labels."""
    out = []
    for label, n in zip(LABELS, counts, strict=True):
        out += [Example(f"{label} sentence {i} .", label, f"syn:{label}{i}") for i in range(n)]
    random.Random(0).shuffle(out)
    return out


def _keys(examples: list[Example]) -> set[str]:
    return {normalize_text(e.text) for e in examples}


def _assert_disjoint(s: Splits) -> None:
    assert not _keys(s.train) & _keys(s.validation)
    assert not _keys(s.train) & _keys(s.test)
    assert not _keys(s.validation) & _keys(s.test)


# --- deduplicate ----------------------------------------------------------------------------


def test_deduplicate_keeps_first_and_collapses_whitespace() -> None:
    ex = [
        Example("A  b .", "neutral", "f:1"),
        Example("C .", "positive", "f:2"),
        Example(" A b . ", "neutral", "f:3"),
        Example("A\tb .", "neutral", "f:4"),
    ]
    kept, notes = deduplicate(ex)
    assert kept == [ex[0], ex[1]]
    assert notes == ["removed 2 duplicate sentences (same text and label)"]


def test_deduplicate_drops_all_copies_of_conflicting_labels() -> None:
    ex = [
        Example("Up .", "positive", "f:1"),
        Example("Flat .", "neutral", "f:2"),
        Example("Up .", "neutral", "f:3"),
        Example("Up .", "positive", "f:4"),
    ]
    kept, notes = deduplicate(ex)
    assert kept == [ex[1]]
    assert len(notes) == 1
    assert "dropped 1 sentences (3 copies)" in notes[0] and "f:1, f:3, f:4" in notes[0]
    assert deduplicate(ex[:2]) == (ex[:2], [])


# --- random split ---------------------------------------------------------------------------


def test_random_split_sizes_stratified_and_disjoint() -> None:
    data = [*_data(), Example("negative sentence 3 .", "negative", "dup")]
    s = split_examples(data, LABELS, test_size=0.2, val_size=0.1, seed=1)
    assert (len(s.test), len(s.validation), len(s.train)) == (60, 30, 210)
    assert s.labels == LABELS
    assert "removed 1 duplicate sentences" in s.notes[0]
    _assert_disjoint(s)
    assert _keys(s.train) | _keys(s.validation) | _keys(s.test) == _keys(data)
    for part, n in ((s.test, 60), (s.validation, 30), (s.train, 210)):
        got = Counter(e.label for e in part)
        for label, total in zip(LABELS, (60, 150, 90), strict=True):
            assert abs(got[label] - total * n / 300) <= 1


def test_random_split_is_deterministic_per_seed() -> None:
    data = _data()
    a = split_examples(data, LABELS, 0.2, 0.1, seed=7)
    b = split_examples(list(data), LABELS, 0.2, 0.1, seed=7)
    c = split_examples(data, LABELS, 0.2, 0.1, seed=8)
    assert a == b
    assert _keys(a.test) != _keys(c.test)


def test_limit_subsamples_train_only() -> None:
    data = _data()
    full = split_examples(data, LABELS, 0.2, 0.1, seed=3)
    small = split_examples(data, LABELS, 0.2, 0.1, seed=3, limit=30)
    assert len(small.train) == 30
    assert Counter(e.label for e in small.train) == {"negative": 6, "neutral": 15, "positive": 9}
    assert small.test == full.test and small.validation == full.validation
    assert _keys(small.train) <= _keys(full.train)
    assert split_examples(data, LABELS, 0.2, 0.1, seed=3, limit=10_000) == full


def test_limit_skip_keeps_examples_disjoint_from_a_limited_run() -> None:
    """`limit_skip = N` sets aside exactly what `limit = N` keeps: a second run (a judge)
    on the same split trains on other examples, still stratified."""
    data = _data()
    first = split_examples(data, LABELS, 0.2, 0.1, seed=3, limit=30)
    second = split_examples(data, LABELS, 0.2, 0.1, seed=3, limit=30, limit_skip=30)
    assert len(second.train) == 30 and not _keys(first.train) & _keys(second.train)
    assert second.test == first.test and second.validation == first.validation
    assert Counter(e.label for e in second.train) == {"negative": 6, "neutral": 15, "positive": 9}
    assert any("set aside the 30" in n for n in second.notes)
    with pytest.raises(DataError, match=r"limit_skip = 30 needs data\.limit > 0"):
        split_examples(data, LABELS, 0.2, 0.1, seed=3, limit_skip=30)
    with pytest.raises(DataError, match=r"exceed the \d+ training examples"):
        split_examples(data, LABELS, 0.2, 0.1, seed=3, limit=30, limit_skip=10_000)


def test_random_split_bad_inputs() -> None:
    data = _data((3, 3, 3))
    with pytest.raises(DataError, match=r"test_size=1\.5"):
        split_examples(data, LABELS, 1.5, 0.1, seed=0)
    with pytest.raises(DataError, match="nothing to train on"):
        split_examples(data, LABELS, 0.5, 0.5, seed=0)
    with pytest.raises(DataError, match=r"syn:x: label 'other' is not in data\.labels"):
        split_examples([*data, Example("odd", "other", "syn:x")], LABELS, 0.2, 0.1, seed=0)


def test_tiny_data_falls_back_to_plain_split_with_note() -> None:
    data = _data((1, 4, 4))
    s = split_examples(data, LABELS, 0.2, 0.0, seed=0)
    assert (len(s.test), len(s.validation), len(s.train)) == (2, 0, 7)
    assert any("too few examples per label to stratify" in n for n in s.notes)


# --- FinGPT preset --------------------------------------------------------------------------


def test_fingpt_split_matches_datasets_and_cleans_train() -> None:
    import datasets

    data = _data()
    raw = datasets.Dataset.from_dict({"text": [e.text for e in data]})
    ref = raw.train_test_split(test_size=0.25, seed=42)["test"]["text"]
    n = len(data)
    s = fingpt_split(data, LABELS, val_size=0.1, seed=0)
    assert [e.text for e in s.test] == ref
    assert any(f"input has {n} rows" in note for note in s.notes)
    _assert_disjoint(s)
    assert len(s.train) + len(s.validation) + len(s.test) == n
    assert len(s.validation) == 23  # ceil(0.1 * 225)


def test_fingpt_split_removes_leaking_and_duplicate_train_rows() -> None:
    data = _data((20, 40, 20))
    train_idx, test_idx = fingpt_test_indices(len(data))
    t0 = data[min(test_idx)]
    tr0 = data[min(train_idx)]
    # Replace two train rows: one copies a test sentence, one copies another train row.
    others = sorted(set(train_idx) - {min(train_idx)})
    data[others[0]] = Example(t0.text + "  ", t0.label, "leak")
    data[others[1]] = Example(tr0.text, tr0.label, "dup")
    s = fingpt_split(data, LABELS, val_size=0.1, seed=0)
    assert len(s.test) == 20
    assert any(
        "removed 1 of 60 train rows whose sentence is also in the test" in n for n in s.notes
    )
    assert any("removed 1 duplicate sentences" in n for n in s.notes)
    assert len(s.train) + len(s.validation) == 58
    _assert_disjoint(s)


def test_make_splits_fingpt_requires_fpb_50(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("text,label\na,x\n")
    for cfg in (
        DataConfig(source="file", path=str(f), split="fingpt", agreement="50"),
        DataConfig(source="fpb", agreement="all", split="fingpt"),
        DataConfig(source="fpb", agreement="66", split="fingpt", path=str(tmp_path)),
    ):
        with pytest.raises(DataError, match=r"data\.split=fingpt .* 50% agreement"):
            make_splits(cfg)
    # A Sentences_50Agree.txt path sets the agreement itself.
    txt = tmp_path / "Sentences_50Agree.txt"
    txt.write_text("".join(f"s{i} .@{LABELS[i % 3]}\n" for i in range(40)))
    s = make_splits(DataConfig(path=str(txt), split="fingpt"))
    assert len(s.test) == 10 and s.labels == LABELS


def test_make_splits_random_from_file(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text("".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(50)))
    s = make_splits(DataConfig(source="file", path=str(f), limit=10))
    assert s.labels == ("a", "b")
    assert (len(s.test), len(s.validation), len(s.train)) == (10, 5, 10)


# --- the real files --------------------------------------------------------------------------


def test_real_fingpt_split(fpb_dir: Path) -> None:
    import datasets

    raw = (fpb_dir / "Sentences_50Agree.txt").read_bytes().decode("latin-1")
    lines = [line.rsplit("@", 1) for line in raw.split("\n") if line.strip()]
    ds = datasets.Dataset.from_dict(
        {"sentence": [s for s, _ in lines], "label": [lab.strip() for _, lab in lines]}
    )
    ref = ds.train_test_split(seed=42)["test"]
    s = make_splits(DataConfig(path=str(fpb_dir), agreement="50", split="fingpt"))
    assert len(s.test) == 1212
    assert [e.text for e in s.test] == [t.strip() for t in ref["sentence"]]
    assert [e.label for e in s.test] == ref["label"]
    assert (len(s.train), len(s.validation)) == (3265, 363)
    assert not (_keys(s.train) | _keys(s.validation)) & _keys(s.test)
    assert len(_keys(s.test)) == 1210  # two duplicate pairs kept as published
    notes = " | ".join(s.notes)
    assert "2 duplicate rows inside test" in notes
    assert "removed 5 of 3634 train rows" in notes
    assert "removed 1 duplicate sentences" in notes


def test_real_allagree_random_split(fpb_dir: Path) -> None:
    ex = load_fpb(fpb_dir / "Sentences_AllAgree.txt")
    kept, notes = deduplicate(ex)
    assert (len(ex), len(kept)) == (2264, 2259)
    assert notes == ["removed 5 duplicate sentences (same text and label)"]
    s = make_splits(DataConfig(path=str(fpb_dir), agreement="all"))
    assert (len(s.train), len(s.validation), len(s.test)) == (1581, 226, 452)
    _assert_disjoint(s)
