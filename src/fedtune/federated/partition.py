"""Divide a training set among sites. The partitioning itself is flwr-datasets'
(IID, Dirichlet label skew, fixed sizes, natural ids); fedtune adds the seeded
shuffle they leave to the caller, quantity skew (sizes drawn from a Dirichlet, then
`SizePartitioner`) and per-site validation hold-outs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.config import FederatedConfig
from fedtune.data import Example
from fedtune.data.splits import _take
from fedtune.errors import ConfigError, DataError


@dataclass(frozen=True)
class Site:
    name: str
    train: list[Example]
    validation: list[Example]
    """Empty with the shared validation set (`federated.validation = "shared"`)."""


@dataclass(frozen=True)
class Partition:
    sites: list[Site]
    notes: tuple[str, ...] = ()

    @property
    def pooled_train(self) -> list[Example]:
        """What centralized training sees: the union of the sites' training data."""
        return [e for s in self.sites for e in s.train]


def _dataset(examples: list[Example], labels: tuple[str, ...], seed: int | None) -> Any:
    import datasets

    index = {lab: i for i, lab in enumerate(labels)}
    ds = datasets.Dataset.from_dict(
        {
            "idx": list(range(len(examples))),
            "label": [index[e.label] for e in examples],
            "site": [e.site for e in examples],
        }
    )
    return ds.shuffle(seed=seed) if seed is not None else ds


def _quantity_sizes(n: int, fed: FederatedConfig, rng: np.random.Generator) -> list[int]:
    """Site sizes proportional to a Dirichlet(alpha) draw, each >= min_site_size."""
    if fed.sites * fed.min_site_size > n:
        raise ConfigError(
            f"{fed.sites} sites x federated.min_site_size={fed.min_site_size} > {n} examples; "
            "lower federated.min_site_size or federated.sites"
        )
    for _ in range(100):
        shares = rng.dirichlet([fed.alpha] * fed.sites)
        sizes = [math.floor(s * n) for s in shares]
        # largest remainder: the sizes add up to n exactly
        for i in np.argsort([-(s * n - math.floor(s * n)) for s in shares])[: n - sum(sizes)]:
            sizes[i] += 1
        if min(sizes) >= fed.min_site_size:
            return sizes
    raise ConfigError(
        f"quantity skew: no Dirichlet(alpha={fed.alpha}) draw in 100 gave every site "
        f">= {fed.min_site_size} examples; raise federated.alpha or lower min_site_size"
    )


def partition_examples(
    examples: list[Example], labels: tuple[str, ...], fed: FederatedConfig, seed: int
) -> Partition:
    """Split `examples` (the training set) into sites as `fed` says, deterministically
    for a given seed."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        SizePartitioner,
    )

    if fed.partition == "own":
        raise ConfigError(
            "federated.partition = 'own': each site reads its own file, there is no one "
            "training set to split (local-only and centralized runs need one: use another "
            "partition, or `fedtune federate` for the federation alone)"
        )
    n = len(examples)
    notes: list[str] = []
    names: list[str] | None = None
    if fed.partition != "column" and fed.sites < 1:
        raise ConfigError(f"federated.sites = {fed.sites} must be at least 1")
    if fed.partition == "iid":
        if fed.sites > n:
            raise ConfigError(f"federated.sites = {fed.sites} > {n} training examples")
        partitioner = IidPartitioner(num_partitions=fed.sites)
        partitioner.dataset = _dataset(examples, labels, seed)
    elif fed.partition == "dirichlet":
        if fed.alpha <= 0:
            raise ConfigError(f"federated.alpha = {fed.alpha} must be > 0")
        partitioner = DirichletPartitioner(
            num_partitions=fed.sites, partition_by="label", alpha=fed.alpha,
            min_partition_size=fed.min_site_size, self_balancing=False, shuffle=True, seed=seed,
        )  # fmt: skip
        partitioner.dataset = _dataset(examples, labels, None)
    elif fed.partition in ("quantity", "sizes"):
        if fed.partition == "quantity":
            if fed.alpha <= 0:
                raise ConfigError(f"federated.alpha = {fed.alpha} must be > 0")
            sizes = _quantity_sizes(n, fed, np.random.default_rng(seed))
        else:
            sizes = list(fed.sizes) or [n // fed.sites] * fed.sites
            if len(sizes) != fed.sites:
                raise ConfigError(
                    f"federated.sizes has {len(sizes)} entries but federated.sites = "
                    f"{fed.sites}; give one size per site"
                )
            if min(sizes) < 1 or sum(sizes) > n:
                raise ConfigError(
                    f"federated.sizes = {sizes} (sum {sum(sizes)}) must be positive and add up "
                    f"to at most the {n} training examples; lower them or use more data"
                )
            if sum(sizes) < n:
                notes.append(f"sizes {sizes}: {n - sum(sizes)} training examples left unused")
        partitioner = SizePartitioner(partition_sizes=sizes)
        partitioner.dataset = _dataset(examples, labels, seed)
    elif fed.partition == "column":
        missing = [e.origin for e in examples if not e.site]
        if missing:
            raise DataError(
                f"{missing[0]}: no site for this row; federated.partition = 'column' needs "
                "data.site_column naming a column of the table"
            )
        names = sorted({e.site for e in examples})
        partitioner = NaturalIdPartitioner(partition_by="site")
        partitioner.dataset = _dataset(examples, labels, None)
    else:  # pragma: no cover - the config's Literal keeps this out
        raise ConfigError(f"unknown federated.partition {fed.partition!r}")

    try:
        with warnings.catch_warnings():
            # SizePartitioner warns about unused rows; the partition notes say it instead.
            warnings.simplefilter("ignore", UserWarning)
            if fed.partition == "column":
                by_site = {
                    str(partitioner.partition_id_to_natural_id[i]): partitioner.load_partition(i)
                    for i in range(partitioner.num_partitions)
                }
                parts = [by_site[name] for name in names or []]
            else:
                n_parts = partitioner.num_partitions
                parts = [partitioner.load_partition(i) for i in range(n_parts)]
    except ValueError as e:  # flwr-datasets: e.g. Dirichlet could not meet min size
        raise ConfigError(
            f"partition {fed.partition!r} into {fed.sites} sites failed ({e}); raise "
            "federated.alpha, lower federated.min_site_size or federated.sites"
        ) from e
    names = names or [f"site-{i + 1}" for i in range(len(parts))]
    sites = []
    for i, (name, part) in enumerate(zip(names, parts, strict=True)):
        site_train = [examples[j] for j in sorted(part["idx"])]
        if not site_train:
            raise ConfigError(f"site {name} got no training examples; use fewer sites")
        sites.append(make_site(name, site_train, fed, seed + i, notes))
    return Partition(sites, tuple(notes))


def make_site(name: str, train: list[Example], fed: FederatedConfig, seed: int,
              notes: list[str]) -> Site:  # fmt: skip
    """A site from its training examples; with `validation = "site"` a seeded share
    of them is held out as the site's own validation set."""
    site_val: list[Example] = []
    if fed.validation == "site":
        k = math.ceil(fed.site_val_size * len(train))
        if not 0 < fed.site_val_size < 1 or k >= len(train):
            raise ConfigError(
                f"federated.site_val_size = {fed.site_val_size} leaves site {name} "
                f"({len(train)} examples) no training data; use a share in (0, 1)"
            )
        train, site_val = _take(train, k, seed, f"{name} validation", notes)
    return Site(name, train, site_val)


def describe_partition(p: Partition, labels: tuple[str, ...]) -> list[str]:
    """One line per site: sizes and label mix."""
    lines = []
    for s in p.sites:
        counts = [sum(e.label == lab for e in s.train) for lab in labels]
        mix = ", ".join(f"{lab} {c}" for lab, c in zip(labels, counts, strict=True))
        val = f", {len(s.validation)} validation" if s.validation else ""
        lines.append(f"{s.name}: {len(s.train)} train ({mix}){val}")
    return lines
