"""Loaders that turn a data source into a flat list of labelled `Example`s.

Every loader returns examples in source order and never writes to disk (apart from
huggingface_hub's own download cache), so splitting can be reproduced exactly from the
source. Every user-caused problem is a `DataError` that names the file (and line or row)
and says how to fix it, because a traceback from pandas or zipfile tells a user little.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import DataConfig
from fedtune.errors import DataError

FPB_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
"""Financial PhraseBank label order; its index is the class id everywhere in fedtune."""

FPB_HUB_REPO = "takala/financial_phrasebank"
FPB_HUB_FILE = "data/FinancialPhraseBank-v1.0.zip"
FPB_ZIP_NAME = "FinancialPhraseBank-v1.0.zip"
FPB_ZIP_DIR = "FinancialPhraseBank-v1.0"
TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".jsonl", ".json", ".parquet")

_AGREEMENT_FILES = {"50": "50Agree", "66": "66Agree", "75": "75Agree", "all": "AllAgree"}
_FPB_FILE_RE = re.compile(r"^Sentences_(50|66|75|All)Agree\.txt$", re.IGNORECASE)
_C1 = re.compile("[\u0080-\u009f]")


@dataclass(frozen=True)
class Example:
    """One example. `origin` lets every later error or report point at its source.

    Classification: `text` and its `label`. Generation: `text` is the instruction (or
    question), `context` the optional passage it is about, `response` the target, and
    `label` the example's category ('' -> "all"): the stratum that splits stratify by,
    partitions skew by and reports break metrics down by, as a class label is for
    classification. Preference: as generation, with `response` the chosen answer and
    `rejected` the other."""

    text: str
    label: str
    origin: str = ""
    site: str = ""
    """The site the row belongs to, from `data.site_column` (federated `column` partitioning)."""
    context: str = ""
    response: str = ""
    group: str = ""
    """Examples sharing a group stay in one split (`data.group_column`)."""
    rejected: str = ""
    """Preference: the response judged worse (`response` is the chosen one)."""


# --- decoding ----------------------------------------------------------------------


def decode_bytes(data: bytes, encoding: str, where: str) -> str:
    """Decode a whole file. `auto` tries strict UTF-8 first, because FPB's AllAgree file
    is UTF-8 while the others are Latin-1; Latin-1 never fails, so a result holding C1
    control characters (never present in real text) is taken as a wrong guess instead."""
    if encoding.lower() == "auto":
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        bad = _C1.search(text)
        if bad:
            line = text.count("\n", 0, bad.start()) + 1
            raise DataError(
                f"{where}: line {line}: undecodable bytes (neither UTF-8 nor Latin-1 text); "
                "set data.encoding to the file's encoding, e.g. data.encoding=cp1252"
            )
        return text
    try:
        return data.decode(encoding)
    except LookupError as e:
        raise DataError(
            f"data.encoding={encoding!r} is not a known encoding; use e.g. utf-8, latin-1 or auto"
        ) from e
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{where}: line {line}: undecodable bytes for encoding {encoding!r} ({e.reason}); "
            "set data.encoding to the file's real encoding, or data.encoding=auto"
        ) from e


# --- Financial PhraseBank ------------------------------------------------------------


def parse_fpb(text: str, where: str, name: str) -> list[Example]:
    """Parse `sentence@label` lines. The label follows the LAST `@` because sentences may
    contain `@` themselves. `name` is the file's base name used in each origin, so the
    same file read from a folder or from the zip gives identical examples."""
    out: list[Example] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        sentence, sep, label = line.rpartition("@")
        if not sep:
            raise DataError(
                f"{where}: line {lineno}: no '@' separator; each line must be "
                "'sentence@label' — fix or remove the line"
            )
        sentence, label = sentence.strip(), label.strip()
        if label not in FPB_LABELS:
            raise DataError(
                f"{where}: line {lineno}: unknown label {label!r}; Financial PhraseBank "
                f"labels are {', '.join(FPB_LABELS)} — fix the line, or load the file as a "
                "table with data.source=file"
            )
        if not sentence:
            raise DataError(f"{where}: line {lineno}: empty sentence before '@'; fix the line")
        out.append(Example(sentence, label, f"{name}:{lineno}"))
    if not out:
        raise DataError(f"{where}: empty dataset (no 'sentence@label' lines); check the file")
    return out


def fpb_file_agreement(path: str | Path) -> str | None:
    """The agreement level encoded in a `Sentences_*Agree.txt` name, else None."""
    m = _FPB_FILE_RE.match(Path(path).name)
    return None if m is None else m.group(1).lower()


def load_fpb(
    path: str | Path | None = None, agreement: str = "all", encoding: str = "auto"
) -> list[Example]:
    """Financial PhraseBank from a Sentences_*.txt file (its name decides the agreement),
    the published zip, a folder holding either, or by default $FEDTUNE_DATA_DIR or the
    Hub. Reading the zip in memory keeps the published artefact the single source."""
    if agreement not in _AGREEMENT_FILES:
        raise DataError(f"data.agreement={agreement!r} is not one of {', '.join(_AGREEMENT_FILES)}")
    member = f"Sentences_{_AGREEMENT_FILES[agreement]}.txt"
    p = Path(path).expanduser() if path else _default_fpb_location()
    if p.is_dir():
        p = _find_in_dir(p, member)
    if not p.is_file():
        raise DataError(
            f"{p}: no such file or folder; pass data.path as a Sentences_*.txt file, "
            f"{FPB_ZIP_NAME} or a folder holding either"
        )
    if p.suffix.lower() == ".zip":
        return _load_fpb_zip(p, member, encoding)
    text = decode_bytes(read_bytes(p), encoding, str(p))
    return parse_fpb(text, str(p), p.name)


def read_bytes(p: Path) -> bytes:
    """The file's bytes; an unreadable file is a DataError that names it."""
    try:
        return p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read the file ({e.strerror}); check the path") from e


def _find_in_dir(folder: Path, member: str) -> Path:
    """Prefer the plain text file, then an extracted zip folder, then the zip itself."""
    for cand in (folder / member, folder / FPB_ZIP_DIR / member, folder / FPB_ZIP_NAME):
        if cand.is_file():
            return cand
    raise DataError(
        f"{folder}: holds neither {member} nor {FPB_ZIP_NAME}; put one of them there "
        "or pass its path as data.path"
    )


def _load_fpb_zip(p: Path, member: str, encoding: str) -> list[Example]:
    try:
        with zipfile.ZipFile(p) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == member]
            if not names:
                raise DataError(
                    f"{p}: the zip holds no {member}; pass the published "
                    f"{FPB_ZIP_NAME} or a Sentences_*.txt file as data.path"
                )
            name = sorted(names, key=len)[0]
            data = zf.read(name)
    except zipfile.BadZipFile as e:
        raise DataError(f"{p}: not a valid zip file ({e}); download it again") from e
    where = f"{p}!{name}"
    return parse_fpb(decode_bytes(data, encoding, where), where, member)


def _default_fpb_location() -> Path:
    """$FEDTUNE_DATA_DIR/financial_phrasebank if present, else the Hub download (cached
    by huggingface_hub, so only the first run needs the network)."""
    root = os.environ.get("FEDTUNE_DATA_DIR", "")
    if root and (Path(root) / "financial_phrasebank").is_dir():
        return Path(root) / "financial_phrasebank"
    import huggingface_hub

    try:
        local = huggingface_hub.hf_hub_download(
            repo_id=FPB_HUB_REPO, filename=FPB_HUB_FILE, repo_type="dataset"
        )
    except Exception as e:  # offline, HF_HUB_OFFLINE=1, Hub down: all mean the same here
        raise DataError(
            f"cannot get Financial PhraseBank: download of {FPB_HUB_REPO}/{FPB_HUB_FILE} "
            f"failed ({type(e).__name__}: {e}); set FEDTUNE_DATA_DIR to a folder holding "
            "financial_phrasebank/, or pass data.path (a Sentences_*.txt file, the zip or "
            "its folder)"
        ) from e
    return Path(local)


# --- tables --------------------------------------------------------------------------


def load_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "auto",
    site_column: str = "",
) -> list[Example]:
    """A CSV, TSV, JSON-lines or Parquet table chosen by suffix. All cells are read as
    strings so that texts like "NA" survive and labels 1 and "1" are the same label."""
    import pandas as pd

    p = checked_table(path)
    suffix = p.suffix.lower()
    # CSV/TSV rows are reported by line number (header = line 1), other formats by record.
    first_row = 2 if suffix in (".csv", ".tsv") else 1
    unit = "line" if suffix in (".csv", ".tsv") else "record"
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(p)
        else:
            text = decode_bytes(read_bytes(p), encoding, str(p))
            if not text.strip():
                raise DataError(f"{p}: empty dataset (the file is empty); check the file")
            if suffix in (".csv", ".tsv"):
                sep = "\t" if suffix == ".tsv" else ","
                df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
            else:
                df = pd.read_json(io.StringIO(text), lines=True, dtype=False)
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors: malformed user file
        raise DataError(f"{p}: cannot parse as {suffix[1:]} ({e}); fix the file") from e
    columns = [(text_column, "data.text_column"), (label_column, "data.label_column")]
    if site_column:
        columns.append((site_column, "data.site_column"))
    for col, key in columns:
        if col not in df.columns:
            avail = ", ".join(map(str, df.columns)) or "(none)"
            raise DataError(f"{p}: unknown column {col!r}; available columns: {avail}; set {key}")
    out: list[Example] = []
    for i, (t, lab) in enumerate(zip(df[text_column], df[label_column], strict=True)):
        row = i + first_row
        text_s, label_s = cell_text(t), cell_text(lab)
        if not text_s:
            raise DataError(f"{p}: {unit} {row}: empty text in column {text_column!r}")
        if not label_s:
            raise DataError(f"{p}: {unit} {row}: empty label in column {label_column!r}")
        site = cell_text(df[site_column].iloc[i]) if site_column else ""
        if site_column and not site:
            raise DataError(f"{p}: {unit} {row}: empty site in column {site_column!r}")
        out.append(Example(text_s, label_s, f"{p.name}:{row}", site))
    if not out:
        raise DataError(f"{p}: empty dataset (no rows); check the file")
    return out


def checked_table(path: str | Path) -> Path:
    """`path` as a table file fedtune reads (by suffix), or a DataError saying why not."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{p}: unsupported file type {suffix or '(no suffix)'!r}; supported: "
            f"{', '.join(TABLE_SUFFIXES)}"
        )
    if not p.is_file():
        raise DataError(f"{p}: no such file; pass an existing table as data.path")
    return p


def cell_text(value: Any) -> str:
    """A table cell as stripped text; missing values (None, NaN, pd.NA) become ''."""
    import pandas as pd

    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return str(value).strip()


# --- Hugging Face datasets -----------------------------------------------------------


def load_hf(
    name: str,
    subset: str = "",
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
) -> list[Example]:
    """A split of a Hub dataset; integer ClassLabel labels become their names so that
    labels mean the same thing whichever source they came from."""
    import datasets

    if not name:
        raise DataError("data.source=hf needs a dataset id in data.name")
    try:
        ds = datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:  # unknown id, offline, bad split: all are fixed by the user
        raise DataError(
            f"hf:{name}: cannot load split {split!r}"
            f"{f' of subset {subset!r}' if subset else ''} ({type(e).__name__}: {e}); "
            "check data.name, data.subset, data.hf_split and the network"
        ) from e
    cols = list(ds.column_names)
    for col, key in ((text_column, "data.text_column"), (label_column, "data.label_column")):
        if col not in cols:
            raise DataError(
                f"hf:{name}: unknown column {col!r}; available columns: {', '.join(cols)}; "
                f"set {key}"
            )
    feature = ds.features[label_column]
    names: Sequence[str] | None = getattr(feature, "names", None)
    out: list[Example] = []
    for i, (t, lab) in enumerate(zip(ds[text_column], ds[label_column], strict=True)):
        origin = f"hf:{name}[{i}]"
        if names is not None and isinstance(lab, int):
            if not 0 <= lab < len(names):
                raise DataError(
                    f"{origin}: label id {lab} is not a class of {label_column!r} "
                    f"({', '.join(names)}); unlabelled splits cannot be used, pick another "
                    "data.hf_split"
                )
            label_s = names[lab]
        else:
            label_s = cell_text(lab)
        text_s = cell_text(t)
        if not text_s:
            raise DataError(f"{origin}: empty text in column {text_column!r}")
        if not label_s:
            raise DataError(f"{origin}: empty label in column {label_column!r}")
        out.append(Example(text_s, label_s, origin))
    if not out:
        raise DataError(f"hf:{name}: empty dataset (split {split!r} has no rows)")
    return out


# --- dispatch ------------------------------------------------------------------------


def load_examples(cfg: DataConfig) -> list[Example]:
    """The examples named by a `[data]` config."""
    if cfg.task == "preference" or cfg.source == "hh":
        from fedtune.data.preferences import load_preferences

        return load_preferences(cfg)
    if cfg.task == "generation" or cfg.source == "tatqa":
        from fedtune.data.instructions import load_instructions

        return load_instructions(cfg)
    if cfg.source == "fpb":
        return load_fpb(cfg.path or None, cfg.agreement, cfg.encoding)
    if cfg.source == "file":
        if not cfg.path:
            raise DataError("data.source=file needs data.path (a .csv/.tsv/.jsonl/.parquet)")
        return load_table(
            cfg.path, cfg.text_column, cfg.label_column, cfg.encoding, cfg.site_column
        )
    if cfg.source == "hf":
        return load_hf(cfg.name, cfg.subset, cfg.hf_split, cfg.text_column, cfg.label_column)
    raise DataError(f"data.source={cfg.source!r} is not one of fpb, file, hf")


def label_names(examples: Sequence[Example], cfg: DataConfig) -> tuple[str, ...]:
    """The label order (index = class id). Checked against the examples here, because a
    label missing from the list would otherwise surface as an index error in training."""
    if cfg.labels:
        labels = tuple(cfg.labels)
        if len(set(labels)) != len(labels):
            raise DataError(f"data.labels={list(labels)} repeats a label; list each once")
        check_labels(examples, labels)
        return labels
    if cfg.source == "fpb" and cfg.task == "classification":
        return FPB_LABELS
    return tuple(sorted({e.label for e in examples}))


def check_labels(examples: Sequence[Example], labels: Sequence[str]) -> None:
    """DataError for the first example whose label is not in `labels`."""
    known = set(labels)
    for e in examples:
        if e.label not in known:
            raise DataError(
                f"{e.origin or 'example'}: label {e.label!r} is not in data.labels "
                f"({', '.join(labels)}); add it to data.labels or fix the data"
            )
