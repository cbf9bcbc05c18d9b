"""The FPB all-agree evaluation set the ICL benchmarks share (icl_table.py,
remote_icl.py): the default random split and, optionally, a stratified seeded
subset of its test sentences."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedtune.config import DataConfig
from fedtune.data import Example, make_splits
from fedtune.methods.icl import stratified_subset


def fpb_test(n: int, seed: int) -> tuple[Any, list[Example], np.ndarray, list[str]]:
    """(splits, test examples, their label indices, their texts); n = 0: all."""
    splits = make_splits(DataConfig(agreement="all"))
    test = stratified_subset(splits.test, n, seed) if n else splits.test
    y = np.array([splits.labels.index(e.label) for e in test])
    return splits, test, y, [e.text for e in test]
