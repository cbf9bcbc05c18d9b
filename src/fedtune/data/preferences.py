"""Loaders for the preference task: (prompt, chosen response, rejected response), or
prompts alone for RL against a reward model (methods rloo and grpo).

Two layouts people publish preference pairs in, read through one column mapping:
- TRL's: a `prompt` column and `chosen` / `rejected` responses (strings, or chat
  `messages` lists whose last assistant turn is the response);
- Anthropic HH's: `chosen` and `rejected` are two whole transcripts
  ("\\n\\nHuman: ... \\n\\nAssistant: ...") that share every turn but the last
  Assistant reply. Each is cut at its last "\\n\\nAssistant:": the shared part is the
  prompt, the rest the response. `data.source = "hh"` reads the published
  `*.jsonl.gz` files of a folder (default $FEDTUNE_DATA_DIR/hh-rlhf), each file's
  subset (helpful-base, harmless-base...) as the category and the site.

- Prompts alone: a prompt column (`prompt`, or data.instruction_column) and no response
  columns; each example's `response` and `rejected` stay empty.

A prompt becomes `Example.text` (the last user turn) and `Example.context` (the earlier
turns, "Human: ..." / "Assistant: ..." lines), the shape generation prompts already
have, so the chat template renders both tasks alike. Pairs whose two responses are the
same teach nothing and are dropped (HH has 36); pairs sharing a prompt share a group,
so that no prompt sits in both train and test.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from fedtune.config import DataConfig
from fedtune.data.instructions import (
    DEFAULT_CATEGORY,
    _column,
    config_fields,
    dataset_files,
    table_rows,
)
from fedtune.data.sources import Example, cell_text, decode_bytes
from fedtune.errors import DataError

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


def load_preferences(cfg: DataConfig) -> list[Example]:
    """The preference pairs named by a `[data]` config."""
    if cfg.task != "preference":
        raise DataError(
            f"data.source={cfg.source} holds preference pairs (prompt, chosen, rejected); "
            "set data.task=preference"
        )
    if cfg.source == "hh":
        return load_hh(cfg.path or None, cfg)
    table = table_rows(cfg)
    if table is not None:
        return records_to_pairs(*table, cfg)
    raise DataError(
        f"data.source={cfg.source!r} has no preference pairs; use hh, file or hf with "
        "data.task=preference"
    )


def load_hh(path: str | Path | None, cfg: DataConfig) -> list[Example]:
    """Anthropic HH: a `*.jsonl.gz` / `*.jsonl` file or a folder of them (read in name
    order). The file's subset name (e.g. `helpful-base` of helpful-base-test.jsonl.gz)
    is each pair's category and site, unless data.category_column/site_column say
    otherwise."""
    p, files = dataset_files(path, "hh", "hh-rlhf", "an HH .jsonl.gz file",
                             lambda f: f.name.endswith((".jsonl.gz", ".jsonl")),
                             "no .jsonl.gz or .jsonl files")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for f in files:
        subset = f.name.split(".")[0].removesuffix("-test").removesuffix("-train")
        rows += [{**r, "subset": subset} for r in _jsonl(f)]
    flat = DataConfig(**{**config_fields(cfg), "category_column": cfg.category_column or "subset",
                         "site_column": cfg.site_column or "subset"})  # fmt: skip
    return records_to_pairs(rows, "hh", str(p), flat)


def _jsonl(f: Path) -> list[dict[str, Any]]:
    try:
        data = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{f}: cannot read ({e}); download the file again") from e
    rows = []
    for lineno, line in enumerate(decode_bytes(data, "utf-8", str(f)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{f}: line {lineno}: not valid JSON ({e.msg}); fix the file") from e
        if not isinstance(row, dict):
            raise DataError(f"{f}: line {lineno}: not a JSON object; each line must be one")
        rows.append(row)
    return rows


# --- the column mapping ------------------------------------------------------------


def records_to_pairs(
    rows: list[dict[str, Any]], name: str, where: str, cfg: DataConfig
) -> list[Example]:
    """Rows -> preference examples. With a prompt column the responses are the
    `chosen`/`rejected` cells; without one, the two cells are whole HH transcripts."""
    if not rows:
        raise DataError(f"{where}: empty dataset (no records); check the file")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    prompt = _column(cols, cfg.instruction_column, "prompt", "data.instruction_column", where,
                     False)  # fmt: skip
    # Prompts alone (no response column at all, none configured): what RL (rloo, grpo)
    # samples from; the pair methods refuse them when they encode.
    prompts_only = bool(prompt) and not (
        cfg.response_column or cfg.rejected_column
        or _column(cols, "", "chosen", "", where, False)
        or _column(cols, "", "rejected", "", where, False))  # fmt: skip
    chosen = "" if prompts_only else _column(cols, cfg.response_column, "chosen",
                                             "data.response_column", where, True)  # fmt: skip
    rejected = "" if prompts_only else _column(cols, cfg.rejected_column, "rejected",
                                               "data.rejected_column", where, True)  # fmt: skip
    cat = _column(cols, cfg.category_column, "category", "data.category_column", where, False)
    for col, key in ((cfg.site_column, "data.site_column"),
                     (cfg.group_column, "data.group_column")):  # fmt: skip
        if col:
            _column(cols, col, key.split("_")[0], key, where, required=True)
    out: list[Example] = []
    for i, row in enumerate(rows, start=1):
        unit = f"{where}: record {i}"
        if prompts_only:
            text, context = _prompt_turns(row.get(prompt), unit)
            good = bad = ""
        elif prompt:
            text, context = _prompt_turns(row.get(prompt), unit)
            good, bad = _response(row.get(chosen), unit), _response(row.get(rejected), unit)
        else:
            text, context, good, bad = _split_transcripts(row.get(chosen), row.get(rejected), unit)
        if good == bad and not prompts_only:
            continue  # the same answer twice: no preference to learn
        # One empty side is kept: an empty reply (HH has some) can be the worse one.
        site = cell_text(row.get(cfg.site_column)) if cfg.site_column else ""
        if cfg.site_column and not site:
            raise DataError(f"{unit}: empty site in column {cfg.site_column!r}; fill it or "
                            "remove the record")  # fmt: skip
        group = cell_text(row.get(cfg.group_column)) if cfg.group_column else f"{context}\x00{text}"
        out.append(Example(
            text, (cell_text(row.get(cat)) if cat else "") or DEFAULT_CATEGORY, f"{name}:{i}",
            site, context, good, group, bad,
        ))  # fmt: skip
    if not out:
        raise DataError(f"{where}: every pair has chosen == rejected; nothing to learn from")
    return out


def _messages(value: Any) -> list[tuple[str, str]] | None:
    """[(role, content)] of a chat `messages` list; None when `value` is not one."""
    if hasattr(value, "tolist"):  # parquet hands over numpy arrays
        value = value.tolist()
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [(str(m["role"]), cell_text(m.get("content"))) for m in value]
    return None


def _prompt_turns(value: Any, unit: str) -> tuple[str, str]:
    """(last user turn, earlier turns) of a prompt cell: plain text, a chat list, or an
    HH transcript ending with its open "Assistant:" turn."""
    turns = _messages(value)
    if turns is None:
        text = value if isinstance(value, str) else cell_text(value)
        if HUMAN.strip() in text:
            return _dialogue(text.removesuffix(ASSISTANT).removesuffix(ASSISTANT.strip()), unit)
        if not text.strip():
            raise DataError(f"{unit}: empty prompt; fix or remove the record")
        return text.strip(), ""
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not users:
        raise DataError(f"{unit}: the prompt's messages hold no user turn; fix the record")
    last = users[-1]
    return turns[last][1], "\n".join(f"{r}: {c}" for r, c in turns[:last] if c)


def _response(value: Any, unit: str) -> str:
    """A response cell: text, or the last assistant turn of a chat list."""
    turns = _messages(value)
    if turns is None:
        return value.strip() if isinstance(value, str) else cell_text(value)
    answers = [c for r, c in turns if r == "assistant"]
    if not answers:
        raise DataError(f"{unit}: a response's messages hold no assistant turn; fix the record")
    return answers[-1]


def _split_transcripts(chosen: Any, rejected: Any, unit: str) -> tuple[str, str, str, str]:
    """HH: two transcripts sharing all but the last Assistant reply -> (last human turn,
    earlier turns, chosen reply, rejected reply)."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise DataError(f"{unit}: no prompt column and the chosen/rejected cells are not "
                        "transcripts; set data.instruction_column to the prompt column")
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise DataError(
            f"{unit}: without a prompt column, chosen and rejected must be HH transcripts "
            f"(turns starting '\\n\\nHuman:' / '\\n\\nAssistant:'); set data.instruction_column "
            "to the prompt column"
        )
    # 17 of HH's 8,552 pairs differ before the last reply too (an edited earlier turn):
    # the chosen transcript's prompt is the one kept.
    text, context = _dialogue(chosen[:cut_c], unit)
    return (text, context, chosen[cut_c + len(ASSISTANT):].strip(),
            rejected[cut_r + len(ASSISTANT):].strip())  # fmt: skip


def _dialogue(transcript: str, unit: str) -> tuple[str, str]:
    """An HH transcript up to its last reply -> (last human turn, earlier turns as
    "Human: ..." / "Assistant: ..." lines)."""
    turns: list[tuple[str, str]] = []
    for part in ("\n\n" + transcript.lstrip("\n")).split("\n\n"):
        if part.startswith("Human:"):
            turns.append(("Human", part[len("Human:"):].strip()))
        elif part.startswith("Assistant:"):
            turns.append(("Assistant", part[len("Assistant:"):].strip()))
        elif turns and part:  # a paragraph break inside a turn
            turns[-1] = (turns[-1][0], f"{turns[-1][1]}\n\n{part}")
    humans = [i for i, (who, _) in enumerate(turns) if who == "Human"]
    if not humans or not turns[humans[-1]][1]:
        raise DataError(f"{unit}: the transcript has no Human turn before the last reply; "
                        "fix the record")  # fmt: skip
    last = humans[-1]
    return turns[last][1], "\n".join(f"{who}: {c}" for who, c in turns[:last])
