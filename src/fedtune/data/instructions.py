"""Loaders for the generation task: instruction (+ optional context) -> response.

One column mapping serves every layout people publish instruction data in:
- Alpaca (`instruction`, `input`, `output`), Dolly (`instruction`, `context`,
  `response`, `category`), any table with `data.*_column` naming its columns;
- chat-style `messages` ([{role, content}, ...]): the last assistant turn is the
  response, the user turn before it the instruction, earlier turns (and a system
  message) the context;
- TAT-QA (`data.source = "tatqa"`): each question over a report's table and
  paragraphs becomes one closed-QA example; its category is the answer type (span,
  multi-span, arithmetic, count) and its group the report, so that splits never put
  one table in two sets.

Files are JSON (an array or JSON lines), JSONL, CSV/TSV or Parquet. Every user-caused
problem is a `DataError` naming the file, the record and the fix, like the
classification loaders (fedtune.data.sources).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedtune.config import DataConfig
from fedtune.data.sources import Example, cell_text, checked_table, decode_bytes, read_bytes
from fedtune.errors import DataError

DEFAULT_CATEGORY = "all"
"""The category of examples whose data names none."""

# Column names tried in order when `data.<x>_column` is empty.
_GUESS = {
    "instruction": ("instruction", "question", "prompt", "text"),
    "context": ("context", "input"),
    "response": ("response", "output", "answer", "target"),
    "category": ("category",),
    # The preference task (fedtune.data.preferences).
    "prompt": ("prompt", "instruction", "question"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
}

TATQA_FILES = ("tatqa_dataset_train.json", "tatqa_dataset_dev.json", "tatqa_dataset_test_gold.json")


def load_instructions(cfg: DataConfig) -> list[Example]:
    """The generation examples named by a `[data]` config."""
    if cfg.task != "generation":
        raise DataError(
            f"data.source={cfg.source} holds question-answer pairs, not labelled texts; "
            "set data.task=generation"
        )
    if cfg.source == "tatqa":
        return load_tatqa(cfg.path or None, cfg)
    table = table_rows(cfg)
    if table is not None:
        return records_to_examples(*table, cfg)
    raise DataError(
        f"data.source={cfg.source!r} has no generation examples; use file, hf or tatqa "
        "with data.task=generation"
    )


# --- reading records ------------------------------------------------------------------


def table_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], str, str] | None:
    """(rows, name, where) of a `file` or `hf` source (None for other sources): the
    tables both the generation and the preference loaders map columns of."""
    if cfg.source == "file":
        if not cfg.path:
            raise DataError("data.source=file needs data.path (.json/.jsonl/.csv/.tsv/.parquet)")
        p = Path(cfg.path).expanduser()
        return read_records(p, cfg.encoding), p.name, str(p)
    if cfg.source == "hf":
        return _hf_records(cfg), f"hf:{cfg.name}", f"hf:{cfg.name}"
    return None


def dataset_files(path: str | Path | None, source: str, folder: str, what: str,
                  wanted: Callable[[Path], bool], none: str) -> tuple[Path, list[Path]]:
    """(the location, its data files in name order) of a published dataset: `path` (a file,
    or a folder whose `wanted` files are read) or $FEDTUNE_DATA_DIR/`folder`."""
    import os

    if path:
        p = Path(path).expanduser()
    elif os.environ.get("FEDTUNE_DATA_DIR"):
        p = Path(os.environ["FEDTUNE_DATA_DIR"]) / folder
    else:
        raise DataError(f"data.source={source} needs data.path ({what} or its folder) or "
                        f"FEDTUNE_DATA_DIR holding {folder}/")  # fmt: skip
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if wanted(f))
        if not files:
            raise DataError(f"{p}: holds {none}; pass {what}")
        return p, files
    if p.is_file():
        return p, [p]
    raise DataError(f"{p}: no such file or folder; pass {what} or its folder")


def read_records(p: Path, encoding: str = "auto") -> list[dict[str, Any]]:
    """The rows of a table file as dicts (nested values such as `messages` kept)."""
    import pandas as pd

    p = checked_table(p)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        try:
            return [dict(r) for r in pd.read_parquet(p).to_dict("records")]
        except Exception as e:  # pyarrow errors: a malformed user file
            raise DataError(f"{p}: cannot parse as parquet ({e}); fix the file") from e
    text = decode_bytes(read_bytes(p), encoding, str(p))
    if not text.strip():
        raise DataError(f"{p}: empty dataset (the file is empty); check the file")
    if suffix in (".csv", ".tsv"):
        try:
            df = pd.read_csv(io.StringIO(text), sep="\t" if suffix == ".tsv" else ",",
                             dtype=str, keep_default_na=False)  # fmt: skip
        except Exception as e:
            raise DataError(f"{p}: cannot parse as {suffix[1:]} ({e}); fix the file") from e
        return [dict(r) for r in df.to_dict("records")]
    if text.lstrip().startswith("["):  # one JSON array (Alpaca's and Dolly's .json files)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {e.lineno}: not valid JSON ({e.msg}); fix the file") from e
    else:  # JSON lines
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{p}: line {lineno}: not valid JSON ({e.msg}); each line must be one "
                    "JSON object"
                ) from e
    bad = next((i for i, r in enumerate(rows, start=1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{p}: record {bad} is not a JSON object; each record must be one")
    return rows


def _hf_records(cfg: DataConfig) -> list[dict[str, Any]]:
    import datasets

    if not cfg.name:
        raise DataError("data.source=hf needs a dataset id in data.name")
    try:
        ds = datasets.load_dataset(cfg.name, cfg.subset or None, split=cfg.hf_split)
    except Exception as e:  # unknown id, offline, bad split: all are fixed by the user
        raise DataError(
            f"hf:{cfg.name}: cannot load split {cfg.hf_split!r} ({type(e).__name__}: {e}); "
            "check data.name, data.subset, data.hf_split and the network"
        ) from e
    return [dict(r) for r in ds]


# --- the column mapping ------------------------------------------------------------


def _column(columns: Iterable[str], configured: str, role: str, key: str, where: str,
            required: bool) -> str:  # fmt: skip
    cols = list(columns)
    if configured:
        if configured not in cols:
            raise DataError(
                f"{where}: unknown column {configured!r}; available columns: "
                f"{', '.join(cols) or '(none)'}; set {key}"
            )
        return configured
    for cand in _GUESS.get(role, ()):
        if cand in cols:
            return cand
    if required:
        raise DataError(
            f"{where}: no {role} column (looked for {', '.join(_GUESS[role])}); available "
            f"columns: {', '.join(cols) or '(none)'}; set {key}"
        )
    return ""


def records_to_examples(
    rows: list[dict[str, Any]], name: str, where: str, cfg: DataConfig
) -> list[Example]:
    """Rows -> examples through the column mapping (or the `messages` chat layout)."""
    if not rows:
        raise DataError(f"{where}: empty dataset (no records); check the file")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    chat = "messages" in cols and not cfg.instruction_column
    if chat:
        ins = ctx = resp = ""
    else:
        ins = _column(cols, cfg.instruction_column, "instruction", "data.instruction_column",
                      where, required=True)  # fmt: skip
        ctx = _column(cols, cfg.context_column, "context", "data.context_column", where, False)
        resp = _column(cols, cfg.response_column, "response", "data.response_column", where,
                       required=True)  # fmt: skip
    cat = _column(cols, cfg.category_column, "category", "data.category_column", where, False)
    for col, key in ((cfg.site_column, "data.site_column"),
                     (cfg.group_column, "data.group_column")):  # fmt: skip
        if col:
            _column(cols, col, key.split("_")[0], key, where, required=True)
    out: list[Example] = []
    for i, row in enumerate(rows, start=1):
        unit = f"{where}: record {i}"
        if chat:
            text, context, response = _from_messages(row.get("messages"), unit)
        else:
            text, context = cell_text(row.get(ins)), cell_text(row.get(ctx)) if ctx else ""
            response = _answer_text(row.get(resp))
            if not text:
                raise DataError(f"{unit}: empty instruction in column {ins!r}; fix or remove it")
            if not response:
                raise DataError(f"{unit}: empty response in column {resp!r}; fix or remove it")
        site = cell_text(row.get(cfg.site_column)) if cfg.site_column else ""
        if cfg.site_column and not site:
            raise DataError(f"{unit}: empty site in column {cfg.site_column!r}; fill it or "
                            "remove the record")
        out.append(Example(
            text, (cell_text(row.get(cat)) if cat else "") or DEFAULT_CATEGORY, f"{name}:{i}",
            site, context, response,
            cell_text(row.get(cfg.group_column)) if cfg.group_column else "",
        ))  # fmt: skip
    return out


def _answer_text(value: Any) -> str:
    """A response cell as text; a list (multi-span answers) is joined with ', '."""
    if isinstance(value, list | tuple):
        return ", ".join(_answer_text(v) for v in value if _answer_text(v))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return cell_text(value)


def _from_messages(messages: Any, unit: str) -> tuple[str, str, str]:
    """(instruction, context, response) of one chat: the last assistant turn answers
    the user turn before it; a system message and earlier turns are the context."""
    if hasattr(messages, "tolist"):  # parquet hands over numpy arrays
        messages = messages.tolist()
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise DataError(
            f"{unit}: `messages` must be a list of {{role, content}} objects; fix the record"
        )
    turns = [(str(m["role"]), cell_text(m["content"])) for m in messages]
    last = max((i for i, (r, _) in enumerate(turns) if r == "assistant"), default=-1)
    if last < 1 or turns[last - 1][0] != "user" or not turns[last][1]:
        raise DataError(
            f"{unit}: `messages` needs a user turn followed by a non-empty assistant turn "
            "(the response to train on); fix the record"
        )
    earlier = "\n".join(f"{r}: {c}" for r, c in turns[: last - 1] if c)
    return turns[last - 1][1], earlier, turns[last][1]


# --- TAT-QA ---------------------------------------------------------------------------


def load_tatqa(path: str | Path | None, cfg: DataConfig) -> list[Example]:
    """TAT-QA questions as closed-QA examples. `path`: one of its JSON files or a folder
    holding them (default $FEDTUNE_DATA_DIR/tatqa), all files read in name order.

    The context is the table as pipe-separated rows, then the paragraphs in order. The
    response is the gold answer: spans joined with ', ', numbers as written (the
    answer's `scale`, e.g. million, is in the record, not in the response)."""
    p, files = dataset_files(path, "tatqa", "tatqa", "a TAT-QA JSON file",
                             lambda f: f.name in TATQA_FILES,
                             f"none of {', '.join(TATQA_FILES)}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for f in files:
        rows += _tatqa_rows(f)
    flat = DataConfig(**{**config_fields(cfg), "instruction_column": "question",
                         "context_column": "context", "response_column": "answer",
                         "category_column": cfg.category_column or "answer_type",
                         "group_column": cfg.group_column or "report"})  # fmt: skip
    return records_to_examples(rows, "tatqa", str(p), flat)


def config_fields(cfg: DataConfig) -> dict[str, Any]:
    """A data config as keyword arguments (to copy it with other column names)."""
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _tatqa_rows(f: Path) -> list[dict[str, Any]]:
    try:
        reports = json.loads(decode_bytes(read_bytes(f), "utf-8", str(f)))
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: line {e.lineno}: not valid JSON ({e.msg}); download it again") from e
    rows = []
    for r, report in enumerate(reports, start=1):
        try:
            table = report["table"]
            context = "\n".join(
                ["Table:"] + [" | ".join(cell_text(c) for c in row) for row in table["table"]]
                + [""] + [p["text"] for p in sorted(report["paragraphs"], key=lambda p: p["order"])]
            )  # fmt: skip
            for q in report["questions"]:
                rows.append({
                    "question": q["question"], "context": context, "answer": q["answer"],
                    "answer_type": q["answer_type"], "answer_from": q["answer_from"],
                    "scale": q.get("scale", ""), "report": table.get("uid", f"{f.name}#{r}"),
                    "uid": q.get("uid", ""),
                })  # fmt: skip
        except (KeyError, TypeError) as e:
            raise DataError(
                f"{f}: report {r}: not in TAT-QA's layout (missing {e}); pass an unmodified "
                "tatqa_dataset_*.json"
            ) from e
    return rows
