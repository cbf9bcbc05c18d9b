"""Frozen-model methods on MiniLM (FPB all-agree, the default random split).

    python benchmarks/frozen.py cache       # embedding the split: cold cache vs warm cache
    python benchmarks/frozen.py methods     # features (4 classifiers) and knn (k = 5/10/20):
                                            # test accuracy, macro-F1, fit and predict time
    python benchmarks/frozen.py federated   # features and knn: centralized vs local-only vs
                                            # federated, 3 IID sites and 3 Dirichlet(0.5) sites
    python benchmarks/frozen.py search      # vector index: exact top-10 of 1,000 queries in
                                            # 3,000 passages, LanceDB's own search vs fedtune's

Results print as Markdown tables for docs/benchmarks.md. The embedding cache goes to
a temporary directory, so `cache` measures a really cold start.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np


def _splits():  # type: ignore[no-untyped-def]
    from fedtune.config import DataConfig
    from fedtune.data import make_splits

    return make_splits(DataConfig())


def cache() -> None:
    from fedtune.embed import Embedder

    splits = _splits()
    texts = [e.text for e in splits.train + splits.validation + splits.test]
    rows = []
    for run in ("cold", "warm"):
        emb = Embedder("minilm")
        t = time.perf_counter()
        emb.embed(texts)
        rows.append((run, time.perf_counter() - t, emb.stats.hits, emb.stats.misses))
    print(f"{len(texts)} texts (train + validation + test), MiniLM, max 128 tokens\n")
    print("| cache | seconds | read from cache | encoded | speed-up |")
    print("|---|---|---|---|---|")
    for run, sec, hits, misses in rows:
        print(f"| {run} | {sec:.2f} | {hits} | {misses} | {rows[0][1] / sec:.0f}x |")


def methods() -> None:
    from fedtune.config import ModelConfig, method_config
    from fedtune.methods.features import Features
    from fedtune.methods.retrieval import Knn

    splits = _splits()
    runs = [("features", {"classifier": c}) for c in ("logreg", "linear_svm", "ridge", "mlp")]
    runs += [("knn", {"k": k}) for k in (5, 10, 20)]
    print("| method | setting | test accuracy | macro-F1 | fit (s) | predict 452 (s) |")
    print("|---|---|---|---|---|---|")
    for name, values in runs:
        cls = Features if name == "features" else Knn
        m = cls(method_config(name, values), ModelConfig(), splits.labels, seed=42)
        m.embed([e.text for e in splits.train + splits.test])  # warm the cache: time the method
        t = time.perf_counter()
        m.fit(splits.train)
        fit = time.perf_counter() - t
        t = time.perf_counter()
        res = m.evaluate(splits.test)
        pred = time.perf_counter() - t
        setting = ", ".join(f"{k}={v}" for k, v in values.items())
        print(f"| {name} | {setting} | {res.accuracy:.4f} | {res.macro_f1:.4f} | {fit:.2f} "
              f"| {pred:.2f} |")  # fmt: skip


def federated() -> None:
    from rich.console import Console

    from fedtune.config import load_config
    from fedtune.federated.compare import run_regimes

    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - tables only
    print("| partition | method | regime | site | test accuracy | macro-F1 | bytes total |")
    print("|---|---|---|---|---|---|---|")
    for part in (["federated.partition=iid"],
                 ["federated.partition=dirichlet", "federated.alpha=0.5"]):  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(None, [f"output_dir={out}", "name=f", "federated.rounds=5",
                                     "train.progress=false", *part])  # fmt: skip
            import json

            run = run_regimes(cfg, ["features", "knn"], console=console)
            for r in json.loads((run / "comparison.json").read_text()):
                total = f"{r['bytes_total'] / 1e6:.3f} MB" if r["regime"] == "federated" else "-"
                print(f"| {part[0].split('=')[1]} | {r['method']} | {r['regime']} | {r['site']} "
                      f"| {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {total} |")  # fmt: skip


def search() -> None:
    from fedtune.vectorstore import VectorStore

    rng = np.random.default_rng(0)
    passages = rng.normal(size=(3000, 384)).astype(np.float32)
    queries = rng.normal(size=(1000, 384)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        store = VectorStore.create(f"{d}/i", "bench", 384)
        store.add(passages, [f"p{i}" for i in range(3000)])
        store.search(queries[:1], 10)  # load once (the first search reads the table)
        t = time.perf_counter()
        ours = store.search(queries, 10)
        t_ours = time.perf_counter() - t
        table = store._table  # LanceDB's own batched flat search, for comparison
        t = time.perf_counter()
        theirs = table.search(list(queries)).distance_type("cosine").limit(10).to_list()
        t_theirs = time.perf_counter() - t
    same = sum(h.row for h in ours[0]) == sum(r["row"] for r in theirs if r["query_index"] == 0)
    print("| search (1,000 queries x 3,000 passages, top-10) | seconds | ratio |")
    print("|---|---|---|")
    print(f"| LanceDB batched flat search | {t_theirs:.3f} | 1.00 |")
    print(f"| fedtune (numpy over the LanceDB table) | {t_ours:.3f} | {t_ours / t_theirs:.2f} |")
    print(f"\nsame neighbours for query 0: {same}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FEDTUNE_DATA_DIR", "../shared/data")
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["FEDTUNE_CACHE_DIR"] = cache_dir
        parts = {"cache": cache, "methods": methods, "federated": federated, "search": search}
        wanted = sys.argv[1:] or list(parts)
        for part in wanted:
            if part not in parts:
                sys.exit(f"unknown part {part!r}; choose from {', '.join(parts)}")
        for part in wanted:
            print(f"\n## {part}\n")
            parts[part]()
