"""Predictions from a saved run: texts in, labels and per-label probabilities out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedtune.adapted import AdaptedModel
from fedtune.errors import DataError
from fedtune.methods.frozen import FrozenMethod, is_frozen_dir, load_frozen

Predictor = AdaptedModel | FrozenMethod[Any]


def load_predictor(model_dir: Path) -> Predictor:
    """A saved model directory: a trained adapter/model or a frozen-model method."""
    return load_frozen(model_dir) if is_frozen_dir(model_dir) else AdaptedModel.load(model_dir)

# Cells read as text: "NA" or "null" in a news headline stays a word.
_READERS = {
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False),
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".json": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".parquet": lambda p: pd.read_parquet(p),
}


def check_output_path(output: str | Path) -> Path:
    out = Path(output)
    if out.suffix.lower() not in _READERS:
        raise DataError(f"--output {out}: unsupported file type; use one of {', '.join(_READERS)}")
    return out


def read_texts(path: str | Path, column: str = "text",
               allow_empty: bool = False) -> tuple[pd.DataFrame, list[str]]:  # fmt: skip
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
            "Choose one with --text-column (or --context-column)"
        )
    if df.empty:
        raise DataError(f"{p}: no rows to predict")
    from fedtune.data.sources import _cell

    # Missing cells (None, NaN from a JSONL record without the field) are empty text.
    texts = [_cell(v) if not isinstance(v, str) else v for v in df[column].tolist()]
    for i, t in enumerate(texts):
        if not t.strip() and not allow_empty:
            row = i + 2 if p.suffix.lower() in (".csv", ".tsv") else i + 1
            where = "line" if p.suffix.lower() in (".csv", ".tsv") else "record"
            raise DataError(f"{p}: {where} {row}: empty {column!r}; remove the row or fill it")
    return df, texts


def predict_table(
    model: Predictor,
    texts: list[str],
    batch_size: int = 64,
    source: pd.DataFrame | None = None,
    contexts: list[str] | None = None,
) -> pd.DataFrame:
    """Classification: `text`, `label` and one `p_<label>` column per label.
    Generation: `text` and the generated `answer` (to the text and its context, if
    given). With `source` (the input table), its other columns come first, so ids
    travel with predictions."""
    if model.task == "generation":
        if isinstance(model, AdaptedModel):
            answers = model.generate(texts, contexts, batch_size=min(batch_size, 16))
        else:
            from fedtune.data import Example

            ctx = contexts or [""] * len(texts)
            answers = model.answer([Example(t, "", context=c)  # type: ignore[attr-defined]
                                    for t, c in zip(texts, ctx, strict=True)])  # fmt: skip
        out = pd.DataFrame({"text": texts, "answer": answers})
        return _with_source(out, source)
    if isinstance(model, AdaptedModel):
        scores = model.predict_scores(texts, batch_size)
    else:
        scores = model.predict_scores(texts)
    # Scores are log-probabilities (normalised over the labels for the encoder head,
    # over the vocabulary for the generative classifier): renormalise over labels.
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    # A row where every label scores the same (a remote model's unparseable answer)
    # gets no label rather than the first one.
    undecided = np.ptp(scores, axis=-1) == 0
    labels = ["" if u else model.labels[i]
              for i, u in zip(scores.argmax(-1), undecided, strict=True)]  # fmt: skip
    out = pd.DataFrame({"text": texts, "label": labels})
    for k, name in enumerate(model.labels):
        out[f"p_{name}"] = probs[:, k].round(6)
    return _with_source(out, source)


def _with_source(out: pd.DataFrame, source: pd.DataFrame | None) -> pd.DataFrame:
    if source is not None:
        rest = source.drop(columns=[c for c in source.columns if c in out.columns])
        out = pd.concat([rest.reset_index(drop=True), out], axis=1)
    return out


def write_predictions(df: pd.DataFrame, output: str | Path) -> Path:
    """Write CSV/TSV/JSONL/Parquet by suffix, atomically (temp file, then rename)."""
    out = check_output_path(output)
    suffix = out.suffix.lower()
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
