"""Loaders: every bad input is a DataError naming file and line, nothing is written to
disk, encodings are detected, and the real Financial PhraseBank files load as published.
Real-data tests run only with FEDTUNE_DATA_DIR set (e.g. FEDTUNE_DATA_DIR=/work/shared/data).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from fedtune.config import DataConfig
from fedtune.data import (
    FPB_LABELS,
    Example,
    label_names,
    load_examples,
    load_fpb,
    load_table,
    sources,
)
from fedtune.errors import DataError

SRC = Path(__file__).resolve().parents[1] / "src"
LINES = "Nokia sells unit @ EUR 5m .@positive\n\n  Sales fell .@negative \nFlat year .@neutral\n"


def _tree(path: Path) -> set[Path]:
    return set(path.rglob("*"))


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _raises(
    match: str, before: set[Path], root: Path, fn: Callable[..., object], *args: object
) -> str:
    """Assert a DataError matching `match` and that the failed load wrote nothing."""
    with pytest.raises(DataError, match=match) as info:
        fn(*args)
    assert _tree(root) == before
    return str(info.value)


# --- Financial PhraseBank text ---------------------------------------------------------


def test_fpb_parses_last_at_strips_and_skips_blank_lines(tmp_path: Path) -> None:
    f = _write(tmp_path / "Sentences_AllAgree.txt", LINES)
    got = load_fpb(f)
    assert got == [
        Example("Nokia sells unit @ EUR 5m .", "positive", "Sentences_AllAgree.txt:1"),
        Example("Sales fell .", "negative", "Sentences_AllAgree.txt:3"),
        Example("Flat year .", "neutral", "Sentences_AllAgree.txt:4"),
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("Good .@positive\nno separator here\n", r"bad\.txt: line 2: no '@'"),
        ("Good .@positive\n\nBad .@happy\n", r"bad\.txt: line 3: unknown label 'happy'"),
        ("Good .@positive\n @neutral\n", r"bad\.txt: line 2: empty sentence"),
        ("\n  \n", r"bad\.txt: empty dataset"),
        ("", r"bad\.txt: empty dataset"),
    ],
)
def test_fpb_bad_lines_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    f = _write(tmp_path / "bad.txt", text)
    _raises(match, _tree(tmp_path), tmp_path, load_fpb, f)


def test_fpb_missing_path_and_folder(tmp_path: Path) -> None:
    before = _tree(tmp_path)
    msg = _raises("no such file or folder", before, tmp_path, load_fpb, tmp_path / "nope.txt")
    assert "nope.txt" in msg and "data.path" in msg
    msg = _raises("holds neither", before, tmp_path, load_fpb, tmp_path, "66")
    assert "Sentences_66Agree.txt" in msg and str(tmp_path) in msg
    _raises("data.agreement", before, tmp_path, load_fpb, tmp_path, "90")


def test_encoding_auto_detects_utf8_and_latin1(tmp_path: Path) -> None:
    text = "Café Oyj : net sales 5 m€ ; Ålands bank .@neutral\n"
    utf8 = load_fpb(_write(tmp_path / "u.txt", text, "utf-8"))
    latin = load_fpb(_write(tmp_path / "l.txt", text.replace("€", "EUR"), "latin-1"))
    assert utf8[0].text == "Café Oyj : net sales 5 m€ ; Ålands bank ."
    assert latin[0].text == "Café Oyj : net sales 5 mEUR ; Ålands bank ."
    bom = _write(tmp_path / "b.txt", "\ufeffA .@neutral\n", "utf-8")
    assert load_fpb(bom) == [Example("A .", "neutral", "b.txt:1")]


def test_undecodable_bytes_name_file_and_line(tmp_path: Path) -> None:
    # cp1252 smart quotes: not UTF-8, and C1 controls if read as Latin-1.
    f = _write(tmp_path / "q.txt", "Fine .@neutral\nHe said \u201cup\u201d .@positive\n", "cp1252")
    msg = _raises(r"q\.txt: line 2: undecodable bytes", _tree(tmp_path), tmp_path, load_fpb, f)
    assert "data.encoding" in msg
    assert load_fpb(f, encoding="cp1252")[1].text == "He said \u201cup\u201d ."


def test_explicit_encoding_failure_names_line_from_byte_offset(tmp_path: Path) -> None:
    f = _write(tmp_path / "l1.txt", "A .@neutral\nB .@neutral\nCafé .@positive\n", "latin-1")
    before = _tree(tmp_path)
    msg = _raises(
        r"l1\.txt: line 3: undecodable bytes", before, tmp_path, load_fpb, f, "all", "utf-8"
    )
    assert "'utf-8'" in msg
    _raises("not a known encoding", before, tmp_path, load_fpb, f, "all", "klingon")
    assert load_fpb(f, encoding="latin-1")[2].text == "Café ."


# --- zip, folders and the default location ---------------------------------------------


def test_zip_and_txt_and_folder_give_identical_examples(tmp_path: Path) -> None:
    text = "Kesko café up .@positive\nLoss widened .@negative\n"
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    txt = _write(txt_dir / "Sentences_75Agree.txt", text, "utf-8")
    z = _zip(
        tmp_path / "FinancialPhraseBank-v1.0.zip",
        {"FinancialPhraseBank-v1.0/Sentences_75Agree.txt": text.encode("latin-1")},
    )
    from_txt = load_fpb(txt)
    assert from_txt == load_fpb(z, "75") == load_fpb(txt_dir, "75") == load_fpb(tmp_path, "75")
    before = _tree(tmp_path)
    msg = _raises("holds no Sentences_50Agree.txt", before, tmp_path, load_fpb, z, "50")
    assert "FinancialPhraseBank-v1.0.zip" in msg
    bad = _write(tmp_path / "broken.zip", "not a zip")
    _raises(r"broken\.zip: not a valid zip", _tree(tmp_path), tmp_path, load_fpb, bad)


def test_zip_member_errors_name_member_and_line(tmp_path: Path) -> None:
    z = _zip(tmp_path / "f.zip", {"FinancialPhraseBank-v1.0/Sentences_AllAgree.txt": b"x\n"})
    msg = _raises("line 1: no '@'", _tree(tmp_path), tmp_path, load_fpb, z)
    assert "f.zip!FinancialPhraseBank-v1.0/Sentences_AllAgree.txt" in msg


def test_default_location_uses_fedtune_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "financial_phrasebank"
    folder.mkdir()
    _write(folder / "Sentences_AllAgree.txt", LINES)
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path))
    assert len(load_fpb()) == 3
    assert len(load_examples(DataConfig())) == 3


def test_default_location_downloads_zip_from_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    z = _zip(
        tmp_path / "FinancialPhraseBank-v1.0.zip",
        {
            "FinancialPhraseBank-v1.0/Sentences_50Agree.txt": LINES.encode("latin-1"),
        },
    )
    calls: list[dict[str, str]] = []

    def fake_download(**kwargs: str) -> str:
        calls.append(kwargs)
        return str(z)

    monkeypatch.delenv("FEDTUNE_DATA_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert [e.label for e in load_fpb(None, "50")] == ["positive", "negative", "neutral"]
    assert calls == [
        {
            "repo_id": "takala/financial_phrasebank",
            "filename": "data/FinancialPhraseBank-v1.0.zip",
            "repo_type": "dataset",
        }
    ]


def test_download_failure_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(**kwargs: str) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    msg = _raises("FEDTUNE_DATA_DIR", _tree(tmp_path), tmp_path, load_fpb, "")
    assert "data.path" in msg and "offline and not cached" in msg


def test_real_offline_mode_fails_with_data_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FEDTUNE_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(SRC))
    code = (
        "from fedtune.data import load_fpb\nfrom fedtune.errors import DataError\n"
        "try:\n    load_fpb()\nexcept DataError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "set FEDTUNE_DATA_DIR" in out.stdout and "data.path" in out.stdout


# --- tables ------------------------------------------------------------------------------


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"sentence": ["Up .", "NA", "Down ."], "y": [2, 1, 0], "x": [1, 2, 3]})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_table_loaders(tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"t{suffix}"
    df = _frame()
    if suffix == ".csv":
        df.to_csv(f, index=False)
    elif suffix == ".tsv":
        df.to_csv(f, sep="\t", index=False)
    elif suffix == ".parquet":
        df.to_parquet(f)
    else:
        df.to_json(f, orient="records", lines=True)
    got = load_table(f, "sentence", "y")
    assert [(e.text, e.label) for e in got] == [("Up .", "2"), ("NA", "1"), ("Down .", "0")]
    first = 2 if suffix in (".csv", ".tsv") else 1
    assert got[0].origin == f"t{suffix}:{first}"
    msg = _raises("unknown column 'text'", _tree(tmp_path), tmp_path, load_table, f)
    assert "sentence, y, x" in msg and "data.text_column" in msg


@pytest.mark.parametrize(
    ("suffix", "where"),
    [(".csv", "line 3"), (".tsv", "line 3"), (".jsonl", "record 2"), (".parquet", "record 2")],
)
def test_table_empty_text_names_row(tmp_path: Path, suffix: str, where: str) -> None:
    f = tmp_path / f"e{suffix}"
    df = pd.DataFrame({"text": ["ok", "  ", "fine"], "label": ["a", "b", "c"]})
    if suffix == ".parquet":
        df.to_parquet(f)
    elif suffix == ".jsonl":
        df.to_json(f, orient="records", lines=True)
    else:
        df.to_csv(f, sep="\t" if suffix == ".tsv" else ",", index=False)
    msg = _raises(f"{where}: empty text", _tree(tmp_path), tmp_path, load_table, f)
    assert f"e{suffix}" in msg


def test_table_bad_inputs(tmp_path: Path) -> None:
    before = _tree(tmp_path)
    msg = _raises("unsupported file type '.xlsx'", before, tmp_path, load_table, "d.xlsx")
    assert ".csv, .tsv, .jsonl, .json, .parquet" in msg
    _raises(r"nope\.csv: no such file", before, tmp_path, load_table, tmp_path / "nope.csv")
    for name, text in (("empty.csv", ""), ("header.csv", "text,label\n")):
        f = _write(tmp_path / name, text)
        _raises(f"{name}: empty dataset", _tree(tmp_path), tmp_path, load_table, f)
    f = _write(tmp_path / "c1.csv", "text,label\n\u201cquoted\u201d,a\n", "cp1252")
    _raises(r"c1\.csv: line 2: undecodable", _tree(tmp_path), tmp_path, load_table, f)
    f = _write(tmp_path / "nolabel.csv", "text,label\nok,\n")
    _raises("line 2: empty label", _tree(tmp_path), tmp_path, load_table, f)


def test_table_latin1_autodetected(tmp_path: Path) -> None:
    f = _write(tmp_path / "l.tsv", "text\tlabel\nCafé up\tpositive\n", "latin-1")
    assert load_table(f) == [Example("Café up", "positive", "l.tsv:2")]


# --- dispatch, labels, hf ------------------------------------------------------------------


def test_load_examples_and_label_names(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.csv", "text,label\nA,pos\nB,neg\nC,pos\n")
    cfg = DataConfig(source="file", path=str(f))
    ex = load_examples(cfg)
    assert label_names(ex, cfg) == ("neg", "pos")
    assert label_names(ex, DataConfig(source="file", labels=("pos", "neg"))) == ("pos", "neg")
    with pytest.raises(DataError, match=r"d\.csv:3: label 'neg' is not in data.labels"):
        label_names(ex, DataConfig(source="file", labels=("pos",)))
    with pytest.raises(DataError, match="repeats"):
        label_names(ex, DataConfig(source="file", labels=("pos", "neg", "pos")))
    with pytest.raises(DataError, match=r"needs data\.path"):
        load_examples(DataConfig(source="file"))
    fpb = [Example("x", "neutral")]
    assert label_names(fpb, DataConfig()) == FPB_LABELS


def test_load_hf_maps_classlabel_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    feats = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "neutral", "positive"]),
        }
    )
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [2, 0]}, features=feats)
    seen: list[tuple] = []

    def fake_load(name: str, subset: str | None, split: str) -> datasets.Dataset:
        seen.append((name, subset, split))
        if name == "missing/ds":
            raise FileNotFoundError("no such dataset")
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(source="hf", name="org/fpb", subset="s50", text_column="sentence")
    got = load_examples(cfg)
    assert got == [
        Example("a", "positive", "hf:org/fpb[0]"),
        Example("b", "negative", "hf:org/fpb[1]"),
    ]
    assert seen == [("org/fpb", "s50", "train")]
    with pytest.raises(
        DataError, match="unknown column 'text'; available columns: sentence, label"
    ):
        sources.load_hf("org/fpb")
    with pytest.raises(DataError, match=r"hf:missing/ds: cannot load.*no such dataset"):
        sources.load_hf("missing/ds")


# --- the real files --------------------------------------------------------------------------


def test_real_allagree_counts(fpb_dir: Path) -> None:
    ex = load_fpb(fpb_dir / "Sentences_AllAgree.txt")
    assert len(ex) == 2264
    assert len({e.text for e in ex}) == 2259
    assert Counter(e.label for e in ex) == {"negative": 303, "neutral": 1391, "positive": 570}


@pytest.mark.parametrize(
    ("agreement", "n"), [("50", 4846), ("66", 4217), ("75", 3453), ("all", 2264)]
)
def test_real_zip_equals_txt(fpb_dir: Path, agreement: str, n: int) -> None:
    name = {"all": "All"}.get(agreement, agreement)
    txt = load_fpb(fpb_dir / f"Sentences_{name}Agree.txt")
    assert len(txt) == n
    assert txt == load_fpb(fpb_dir / "FinancialPhraseBank-v1.0.zip", agreement)
    assert txt == load_fpb(fpb_dir, agreement)
