"""Labelled examples and leak-free splits: `make_splits(cfg.data)` is all a run needs;
the loaders and split functions are public for notebooks and tests (docs/data.md)."""

from fedtune.data.sources import (
    FPB_LABELS,
    Example,
    label_names,
    load_examples,
    load_fpb,
    load_hf,
    load_table,
)
from fedtune.data.splits import (
    Splits,
    deduplicate,
    example_groups,
    examples_digest,
    fingpt_split,
    make_splits,
    split_examples,
)

__all__ = [
    "FPB_LABELS",
    "Example",
    "Splits",
    "deduplicate",
    "example_groups",
    "examples_digest",
    "fingpt_split",
    "label_names",
    "load_examples",
    "load_fpb",
    "load_hf",
    "load_table",
    "make_splits",
    "split_examples",
]
