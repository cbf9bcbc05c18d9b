"""Train/validation/test splits that never leak a sentence across sets.

Two protocols: `random` de-duplicates first and then makes a seeded stratified split;
`fingpt` reproduces the published FinGPT/FlowerTune test set of Financial PhraseBank
(50% agreement) row for row, so that numbers are comparable with the literature, and
then cleans only the training side (docs/data.md has the measured counts).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from fedtune.config import DataConfig
from fedtune.data.sources import Example, check_labels, fpb_file_agreement, label_names
from fedtune.data.sources import load_examples as _load_examples
from fedtune.errors import DataError

FINGPT_TEST_SIZE = 0.25
FINGPT_SEED = 42
FINGPT_ROWS = 4846
"""Lines of Sentences_50Agree.txt, on which the published split was made."""


@dataclass(frozen=True)
class Splits:
    """The three sets plus the label order and what was done to get them."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: tuple[str, ...]
    notes: tuple[str, ...] = ()


def normalize_text(text: str) -> str:
    """The key two sentences are duplicates under: whitespace differences don't count."""
    return " ".join(text.split())


def _key(e: Example) -> str:
    """Duplicates: the same text (and, for generation, the same context; for preference,
    the same pair of responses too)."""
    key = normalize_text(e.text) + ("\x00" + normalize_text(e.context) if e.context else "")
    return key + (f"\x00{e.response}\x00{e.rejected}" if e.rejected else "")


def deduplicate(examples: Sequence[Example]) -> tuple[list[Example], list[str]]:
    """Keep the first occurrence of each sentence. A sentence whose copies carry different
    labels is dropped entirely: there is no way to tell which label is right, and keeping
    one would put a sentence with a contradicting twin into the data."""
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(_key(e), []).append(e)
    # A generation example's label is its category, not an answer: the same question
    # asked twice keeps its first copy whatever the copies say.
    conflicting = {
        k for k, g in groups.items() if len({e.label for e in g}) > 1 and not g[0].response
    }
    kept: list[Example] = []
    seen: set[str] = set()
    for e in examples:
        key = _key(e)
        if key in conflicting or key in seen:
            continue
        seen.add(key)
        kept.append(e)
    notes: list[str] = []
    same = sum(len(g) - 1 for k, g in groups.items() if k not in conflicting)
    if same:
        what = ("pairs (same prompt and responses)" if examples[0].rejected
                else "examples (same instruction and context)" if examples[0].response
                else "sentences (same text and label)")
        notes.append(f"removed {same} duplicate {what}")
    if conflicting:
        copies = sum(len(groups[k]) for k in conflicting)
        where = ", ".join(e.origin for k in sorted(conflicting) for e in groups[k] if e.origin)
        notes.append(
            f"dropped {len(conflicting)} sentences ({copies} copies) whose copies disagree "
            f"on the label" + (f": {where}" if where else "")
        )
    return kept, notes


def example_groups(examples: Sequence[Example]) -> list[str]:
    """Each example's group (`data.group_column`; TAT-QA: the report a question is
    about), or [] when the data has none: what a paired interval resamples whole
    (fedtune.federated.compare.paired_gap)."""
    if not any(e.group for e in examples):
        return []
    return [e.group or f"\x00{i}" for i, e in enumerate(examples)]


def examples_digest(examples: Sequence[Example]) -> str:
    """A fingerprint of examples and their order (what a model is scored on: text,
    context, label, response, rejected, group; not where they were read from), so that
    runs can be checked to have been tested on the same examples wherever they ran."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.text, e.context, e.label, e.response, e.rejected, e.group],
                            ensure_ascii=False).encode("utf-8") + b"\n")  # fmt: skip
    return h.hexdigest()[:16]


def _count(share: float, n: int, what: str) -> int:
    """A share as a whole number of rows, rounded up like scikit-learn does for tests."""
    if not 0.0 <= share < 1.0:
        raise DataError(f"data.{what}={share} must be at least 0 and below 1")
    return math.ceil(share * n)


def _take_groups(
    examples: list[Example], k: int, seed: int, what: str, notes: list[str]
) -> tuple[list[Example], list[Example]]:
    """Whole groups, in a seeded random order, until at least `k` examples are taken:
    a group (e.g. one report's table) never sits on both sides."""
    import numpy as np

    by_group: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_group.setdefault(e.group or f"\x00{i}", []).append(i)
    names = sorted(by_group)
    taken: set[int] = set()
    for gi in np.random.default_rng(seed).permutation(len(names)):
        if len(taken) >= k:
            break
        taken.update(by_group[names[gi]])
    if len(taken) >= len(examples):
        raise DataError(
            f"{what}: {len(names)} groups (data.group_column) are too few to split off "
            f"{k} examples and keep some; use more data or smaller shares"
        )
    notes.append(f"{what}: {len(taken)} examples from whole groups (no group in two sets)")
    rest = [e for i, e in enumerate(examples) if i not in taken]
    return rest, [e for i, e in enumerate(examples) if i in taken]


def _take(
    examples: list[Example], k: int, seed: int, what: str, notes: list[str],
    grouped: bool = True,
) -> tuple[list[Example], list[Example]]:  # fmt: skip
    """Split off `k` examples (stratified by label when every class allows it), returning
    (rest, taken). Tiny data sets fall back to a plain seeded split, noted, instead of
    failing, so that smoke runs on a handful of rows still work."""
    from sklearn.model_selection import train_test_split

    if k <= 0:
        return list(examples), []
    if k >= len(examples):
        raise DataError(
            f"cannot take {k} {what} examples out of {len(examples)}; use more data or "
            "smaller data.test_size / data.val_size"
        )
    if grouped and any(e.group for e in examples):
        return _take_groups(examples, k, seed, what, notes)
    labels = [e.label for e in examples]
    try:
        rest, taken = train_test_split(
            examples, test_size=k, random_state=seed, shuffle=True, stratify=labels
        )
    except ValueError:
        counts = Counter(labels)
        notes.append(
            f"{what}: too few examples per label to stratify ({dict(sorted(counts.items()))}); "
            "used a plain seeded random split"
        )
        rest, taken = train_test_split(examples, test_size=k, random_state=seed, shuffle=True)
    return list(rest), list(taken)


def _limit_train(
    train: list[Example], limit: int, seed: int, notes: list[str], skip: int = 0
) -> list[Example]:
    """`limit` training examples (stratified, seeded). `skip`: first set aside the
    `skip` examples that `limit = skip` would keep, so that two runs, one with `limit =
    N` and one with `limit_skip = N`, train on disjoint examples of the same split (e.g.
    a reward model that judges another's policy, trained on other pairs)."""
    if skip < 0:
        raise DataError(f"data.limit_skip = {skip} must be >= 0")
    if skip > 0:
        if limit <= 0:
            raise DataError(
                f"data.limit_skip = {skip} needs data.limit > 0 (how many examples to keep "
                "after the skipped ones)"
            )
        if skip + limit > len(train):
            raise DataError(
                f"data.limit_skip = {skip} + data.limit = {limit} exceed the {len(train)} "
                "training examples of this split; lower one of them"
            )
        train, skipped = _take(train, skip, seed, "train limit", [], grouped=False)
        notes.append(f"set aside the {len(skipped)} train examples data.limit={skip} keeps")
    if limit <= 0 or limit >= len(train):
        return train
    _, kept = _take(train, limit, seed, "train limit", notes, grouped=False)
    notes.append(f"kept a stratified subsample of {limit} of {len(train)} train examples")
    return kept


def split_examples(
    examples: Sequence[Example],
    labels: Sequence[str],
    test_size: float,
    val_size: float,
    seed: int,
    limit: int = 0,
    limit_skip: int = 0,
) -> Splits:
    """De-duplicate, then split test first and validation from the rest, both as shares
    of the de-duplicated total. Same inputs and seed give the same split."""
    check_labels(examples, labels)
    data, notes = deduplicate(examples)
    n = len(data)
    n_test = _count(test_size, n, "test_size")
    n_val = _count(val_size, n, "val_size")
    if n_test + n_val >= n:
        raise DataError(
            f"{n} examples after de-duplication leave nothing to train on with "
            f"test_size={test_size} and val_size={val_size}; use more data or smaller shares"
        )
    rest, test = _take(data, n_test, seed, "test", notes)
    train, validation = _take(rest, n_val, seed, "validation", notes)
    train = _limit_train(train, limit, seed, notes, limit_skip)
    notes.append(
        f"random split (seed {seed}): {len(train)} train, {len(validation)} validation, "
        f"{len(test)} test of {n} unique examples"
    )
    return Splits(train, validation, test, tuple(labels), tuple(notes))


def fingpt_test_indices(n: int) -> tuple[list[int], list[int]]:
    """(train, test) row indices of `datasets`' train_test_split(test_size=0.25, seed=42)
    over n rows: exactly what FinGPT and FlowerTune call on Sentences_50Agree, computed
    on indices so the result does not depend on how the text was decoded."""
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    parts = ds.train_test_split(test_size=FINGPT_TEST_SIZE, seed=FINGPT_SEED)
    return list(parts["train"]["i"]), list(parts["test"]["i"])


def fingpt_split(
    examples_50agree: Sequence[Example],
    labels: Sequence[str],
    val_size: float,
    seed: int,
    limit: int = 0,
    limit_skip: int = 0,
) -> Splits:
    """The published FinGPT test set (duplicates in it kept as published), and a training
    part cleaned of every sentence that also occurs in test, then de-duplicated, from
    which a stratified validation set (`val_size` of that part, `seed`) is carved."""
    check_labels(examples_50agree, labels)
    rows = list(examples_50agree)
    n = len(rows)
    notes: list[str] = []
    if n != FINGPT_ROWS:
        notes.append(
            f"fingpt: the input has {n} rows, not the {FINGPT_ROWS} of Sentences_50Agree.txt; "
            "the test set is NOT the published one"
        )
    train_idx, test_idx = fingpt_test_indices(n)
    test = [rows[i] for i in test_idx]
    test_keys = Counter(normalize_text(e.text) for e in test)
    in_test_dups = sum(c - 1 for c in test_keys.values())
    notes.append(
        f"fingpt: test = {len(test)} of {n} rows (datasets train_test_split test_size="
        f"{FINGPT_TEST_SIZE}, seed={FINGPT_SEED}, file order); "
        f"{in_test_dups} duplicate rows inside test kept as published; data.test_size "
        "does not apply"
    )
    remaining = [rows[i] for i in sorted(train_idx)]
    train_part = [e for e in remaining if normalize_text(e.text) not in test_keys]
    notes.append(
        f"fingpt: removed {len(remaining) - len(train_part)} of {len(remaining)} train rows "
        "whose sentence is also in the test set"
    )
    train_part, dedup_notes = deduplicate(train_part)
    notes.extend(f"fingpt train: {s}" for s in dedup_notes)
    n_val = _count(val_size, len(train_part), "val_size")
    if n_val >= len(train_part):
        raise DataError(f"fingpt: {len(train_part)} train rows leave nothing to train on")
    train, validation = _take(train_part, n_val, seed, "validation", notes)
    train = _limit_train(train, limit, seed, notes, limit_skip)
    notes.append(
        f"fingpt split: {len(train)} train, {len(validation)} validation (val_size={val_size} "
        f"of {len(train_part)}, seed {seed}), {len(test)} test"
    )
    return Splits(train, validation, test, tuple(labels), tuple(notes))


def make_splits(cfg: DataConfig) -> Splits:
    """Load the configured source and split it by `cfg.split`."""
    if cfg.split == "fingpt":
        # A Sentences_*Agree.txt path decides the agreement itself (load_fpb ignores it).
        agreement = fpb_file_agreement(cfg.path) or cfg.agreement
        if cfg.source != "fpb" or agreement != "50":
            raise DataError(
                "data.split=fingpt reproduces the published FinGPT test set, which exists "
                "only for Financial PhraseBank at 50% agreement; set data.source=fpb and "
                f"data.agreement=50 (got source={cfg.source}, agreement={agreement}), "
                "or use data.split=random"
            )
    examples = _load_examples(cfg)
    labels = label_names(examples, cfg)
    if cfg.split == "fingpt":
        return fingpt_split(examples, labels, cfg.val_size, cfg.split_seed, cfg.limit,
                            cfg.limit_skip)  # fmt: skip
    if cfg.split != "random":
        raise DataError(f"data.split={cfg.split!r} is not one of random, fingpt")
    return split_examples(examples, labels, cfg.test_size, cfg.val_size, cfg.split_seed, cfg.limit,
                          cfg.limit_skip)  # fmt: skip
