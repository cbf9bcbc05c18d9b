"""Predictions from a saved run: texts in, labels and per-label probabilities out; and
a saved run tested again on its own split (`fedtune evaluate`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedtune.adapted import AdaptedModel
from fedtune.errors import ConfigError, DataError
from fedtune.evaluate import Metrics
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
    from fedtune.data.sources import cell_text

    # Missing cells (None, NaN from a JSONL record without the field) are empty text.
    texts = [cell_text(v) if not isinstance(v, str) else v for v in df[column].tolist()]
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


SPLITS = ("test", "validation")
CHECKPOINTS = ("kept", "last")


@dataclass
class RunEvaluation:
    metrics: Metrics
    recorded: dict[str, Any]
    """The run's own test summary (the last line of its metrics.jsonl; {} if none)."""
    which: str
    """The model tested, in words: `the kept model (round 16)`."""


def evaluate_run(run_dir: str | Path, split: str = "test",
                 checkpoint: str = "kept") -> RunEvaluation:
    """Test a saved run again on the `split` its config.json rebuilds from the data.
    `checkpoint`: `kept` (the model the run saved: the best evaluation by
    `train.select_by`) or `last` (a federated run's last-round global model, which it
    checkpoints every round; other runs keep no last model), with the run's own test
    summary beside it, so a caller can set one against the other. Everything is
    checked before a model loads."""
    from fedtune.config import RunConfig
    from fedtune.data import make_splits
    from fedtune.evaluate import evaluate_features
    from fedtune.federated.server import CHECKPOINT_DIR
    from fedtune.runs import CONFIG_FILE, METRICS_FILE, find_model_dir, read_jsonl

    run = Path(run_dir)
    if (run / "fedtune.json").is_file() and (run.parent / CONFIG_FILE).is_file():
        run = run.parent  # the model/ folder of a run
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint {checkpoint!r}: use one of {', '.join(CHECKPOINTS)}")
    if not (run / CONFIG_FILE).is_file():
        inner = sorted(p.parent.name for p in run.glob(f"*/{CONFIG_FILE}"))
        hint = (f"it holds runs of a comparison: pass one of {', '.join(inner)}" if inner
                else "pass a folder made by `fedtune train`, `federate` or `compare`")
        raise ConfigError(f"{run} is not a run directory (no {CONFIG_FILE}); {hint}")
    model_dir = find_model_dir(run)
    last = run / CHECKPOINT_DIR / "global.safetensors"
    if checkpoint == "last" and (is_frozen_dir(model_dir) or not last.is_file()):
        raise ConfigError(
            f"{run} keeps no last-round model ({last} is missing): only federated runs of a "
            "trained method checkpoint their global model every round; a centralized or "
            "local run saves only the model it kept. Use --checkpoint kept"
        )
    cfg = RunConfig.from_dict(json.loads((run / CONFIG_FILE).read_text()))
    records = read_jsonl(run / METRICS_FILE)
    summary = records[-1] if records and records[-1].get("event") == "test" else {}
    splits = make_splits(cfg.data)
    examples = splits.test if split == "test" else splits.validation
    if not examples:
        raise ConfigError(f"{run}: its data has no {split} split (data.val_size = 0?)")
    key = "n_test" if split == "test" else "n_validation"
    if summary.get(key, len(examples)) != len(examples):
        raise DataError(
            f"{run}: the run had {summary[key]} {split} examples, its data now gives "
            f"{len(examples)}: the data ({cfg.data.source}, {cfg.data.path or 'default path'}) "
            "changed since the run; restore the file the run used"
        )
    rounds = [r["round"] for r in records if r.get("event") == "round"]
    if checkpoint == "last":
        which = f"the last round's model (round {max(rounds)})" if rounds else "the last model"
    elif "best_round" in summary:
        which = f"the kept model (round {summary['best_round']})"
    elif summary.get("best_step"):
        which = f"the kept model (step {summary['best_step']})"
    else:
        which = "the kept model"
    if is_frozen_dir(model_dir):
        return RunEvaluation(load_frozen(model_dir).evaluate(examples), summary, which)
    if checkpoint == "last":
        from safetensors.torch import load_file

        # The round's state is the trainable state the sites exchange (a P-tuning
        # encoder, not the virtual tokens a saved model keeps): built as the run built it.
        model = AdaptedModel.build(cfg.model, cfg.method, splits.labels, seed=cfg.seed,
                                   task=cfg.data.task)  # fmt: skip
        model.load_trainable_state(load_file(str(last)))
    else:
        model = AdaptedModel.load(model_dir)
    feats = model.formulation.encode_examples(examples)
    metrics = evaluate_features(model, feats, cfg.train.eval_batch_size, bf16=cfg.train.bf16)
    return RunEvaluation(metrics, summary, which)
