"""Predictions from a saved run: texts in, labels and per-label probabilities out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from fedtune.adapted import AdaptedModel
from fedtune.errors import DataError

_READERS = {
    ".csv": lambda p: pd.read_csv(p),
    ".tsv": lambda p: pd.read_csv(p, sep="\t"),
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": lambda p: pd.read_json(p, lines=True),
    ".parquet": lambda p: pd.read_parquet(p),
}


def read_texts(path: str | Path, column: str = "text") -> tuple[pd.DataFrame, list[str]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input file {p} does not exist")
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"{p}: unsupported file type; use one of {', '.join(_READERS)}")
    try:
        df = reader(p)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot be read as {p.suffix} ({e})") from e
    if column not in df.columns:
        raise DataError(
            f"{p}: no column {column!r}; available: {', '.join(map(str, df.columns))}. "
            "Choose one with --text-column"
        )
    texts = df[column].astype(str).tolist()
    if not texts:
        raise DataError(f"{p}: no rows to predict")
    return df, texts


def predict_table(model: AdaptedModel, texts: list[str], batch_size: int = 64) -> pd.DataFrame:
    scores = model.predict_scores(texts, batch_size)
    # Scores are log-probabilities (normalised over the labels for the encoder head,
    # over the vocabulary for the generative classifier): renormalise over labels.
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = pd.DataFrame({"text": texts, "label": [model.labels[i] for i in scores.argmax(-1)]})
    for k, name in enumerate(model.labels):
        out[f"p_{name}"] = probs[:, k].round(6)
    return out


def write_predictions(df: pd.DataFrame, output: str | Path) -> Path:
    """Write CSV/TSV/JSONL/Parquet by suffix, atomically (temp file, then rename)."""
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in _READERS:
        raise DataError(f"--output {out}: unsupported file type; use one of {', '.join(_READERS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if suffix in (".csv", ".tsv"):
            df.to_csv(tmp, index=False, sep="\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
