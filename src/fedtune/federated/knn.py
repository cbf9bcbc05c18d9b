"""Federated nearest-neighbour classification: each site keeps its own index;
the server sends query embeddings to every site (`query.knn` messages), each site
answers with its top-k (cosine score, label id) pairs, and the server keeps the
k best pairs over all sites and votes. No text and no embedding of a site's data
ever leaves it; what does is k (score, label) pairs per query.

The merge is exact: the k best of the union of the sites' top-k lists are the k
best of the union of their indexes, so with disjoint shards federated kNN gives
the labels centralized kNN gives on the pooled index.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from rich.markup import escape

from fedtune import __version__
from fedtune.config import RunConfig
from fedtune.data import Example, Splits
from fedtune.errors import FedtuneError
from fedtune.evaluate import Metrics
from fedtune.federated.apps import VERSION_KEY, client_app, workspace
from fedtune.federated.grid import InProcessGrid, exchange
from fedtune.federated.wire import arrays_of, message_bytes, message_payload_bytes
from fedtune.methods.retrieval import Knn, top_k, vote
from fedtune.report import metrics_table, plot_confusion
from fedtune.runs import METRICS_FILE, append_jsonl, final_run_dir, write_json

QUERY_BATCH = 256
"""Query embeddings per message (256 x 384 fp32 = 393 KB for MiniLM)."""


def federated_neighbours(
    grid: Grid, queries: np.ndarray, k: int, min_sites: int, traffic: list[dict[str, Any]],
    names: dict[int, str], timeout: float = 3600.0, kind: str = "knn",
    failures: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The k best (score, label id) pairs over the sites that answered, for each query
    [Q, k] each. `names` (node id -> site name) is completed from the replies; a site
    that fails is skipped and named in `failures`; fewer than `min_sites` answers for
    a batch of queries stop the run."""
    nodes = list(grid.get_node_ids())
    best_s, best_l = [], []
    for start in range(0, len(queries), QUERY_BATCH):
        batch = np.ascontiguousarray(queries[start : start + QUERY_BATCH], dtype=np.float32)
        config = ConfigRecord({"k": k, VERSION_KEY: __version__})
        content = RecordDict({"arrays": ArrayRecord({"queries": Array(batch)}), "config": config})
        messages = [grid.create_message(content, f"{MessageType.QUERY}.knn", node, str(start))
                    for node in nodes]  # fmt: skip
        for m in messages:
            traffic.append({"kind": kind, "direction": "down", "site": names.get(
                m.metadata.dst_node_id, str(m.metadata.dst_node_id)),
                "bytes": message_bytes(m), "payload_bytes": message_payload_bytes(m)})  # fmt: skip
        got = exchange(grid, messages, timeout)
        if failures is not None:
            failures += [f"{names.get(n, f'node-{n}')} sent no reply to {kind} queries "
                         f"{start}-{start + len(batch) - 1} in {timeout:g} s"
                         for n in got.missing]  # fmt: skip
        replies = got.replies
        cand_s, cand_l = [], []
        for r in replies:
            node = r.metadata.src_node_id
            if not r.has_error() and "site" in r.content.config_records:
                names.setdefault(node, str(r.content.config_records["site"]["name"]))
            site = names.get(node, f"node-{node}")
            traffic.append({"kind": kind, "direction": "up", "site": site,
                            "bytes": message_bytes(r), "payload_bytes": message_payload_bytes(r),
                            "error": r.error.reason if r.has_error() else ""})  # fmt: skip
            if r.has_error():
                if failures is not None:
                    failures.append(f"{site} failed on {kind} queries {start}-"
                                    f"{start + len(batch) - 1}: {r.error.reason}")  # fmt: skip
                continue
            arrays = arrays_of(r)
            cand_s.append(arrays["scores"].numpy())
            cand_l.append(arrays["labels"].numpy())
        if len(cand_s) < max(1, min_sites):
            raise FedtuneError(
                f"only {len(cand_s)} of {len(nodes)} sites answered the kNN queries "
                f"(federated.min_sites = {min_sites}): "
                + "; ".join(str(r.error.reason) for r in replies if r.has_error())
            )
        s, lab = top_k(np.concatenate(cand_s, 1), np.concatenate(cand_l, 1), k)
        best_s.append(s)
        best_l.append(lab)
    return np.concatenate(best_s), np.concatenate(best_l)


def run_federated_knn(
    cfg: RunConfig,
    console: Console | None = None,
    splits: Splits | None = None,
    shown_as: Path | None = None,
    grid: Grid | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Federated kNN: the sites of `grid` (default: `cfg.federated.sites` sites in
    this process, each index under the run's sites/<site>/index); writes a run
    directory (config, metrics.jsonl, report.md, confusion.png, traffic.json; no
    global model: the indexes stay at the sites) and returns the summary."""
    from fedtune.data import example_groups, examples_digest
    from fedtune.federated.runner import _run_id, make_contexts, prepare_run_dir
    from fedtune.regimes import describe_data

    console = console or Console()
    t_start = time.perf_counter()
    out = out or final_run_dir(cfg)
    ws = workspace(cfg, splits)
    knn = ws.model
    assert isinstance(knn, Knn)
    sites = ws.partition.sites
    names = [s.name for s in sites]
    node_names: dict[int, str] = {}
    if grid is None:
        contexts = make_contexts(cfg, len(sites), names, out)
        grid = InProcessGrid(client_app, contexts, _run_id(cfg))
        node_names = {n: names[i] for i, n in enumerate(contexts)}
    n_sites = len(list(grid.get_node_ids()))
    console.print(
        f"[bold]knn[/], federated by query (k = {knn.config.k}): {n_sites} sites each "
        f"keep their own index; {len(ws.splits.validation)} validation / "
        f"{len(ws.splits.test)} test queries"
    )
    traffic: list[dict[str, Any]] = []
    failures: list[str] = []
    fed = cfg.federated

    def evaluate(kind: str, examples: list[Example]) -> Metrics:
        with console.status(f"knn: {len(examples)} {kind} queries to {n_sites} sites"):
            q = ws.embeddings(kind, examples)  # the server embeds its own queries
            s, lab = federated_neighbours(grid, q, knn.config.k, fed.min_sites, traffic,
                                          node_names, fed.timeout, kind, failures)  # fmt: skip
        scores = vote(np.where(np.isfinite(s), s, 0.0), lab, len(knn.labels), knn.config.weighting)
        return knn.metrics(scores, knn.label_ids(examples))

    prepare_run_dir(cfg, out, ws.splits.labels, sites)
    try:
        val = evaluate("validation", ws.splits.validation) if ws.splits.validation else None
        if val is not None:
            console.print(f"  validation accuracy {val.accuracy:.4f}  macro-F1 {val.macro_f1:.4f}")
        test = evaluate("test", ws.splits.test)
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # nothing half-written stays
        raise
    for line in failures:
        console.print(f"[yellow]{escape(line)}[/]")
    test_traffic = [t for t in traffic if t["kind"] == "test"]
    per_site = {d: sum(t["bytes"] for t in test_traffic if t["direction"] == d) / n_sites
                for d in ("down", "up")}  # fmt: skip
    summary: dict[str, Any] = {
        "event": "test",
        "regime": "federated",
        "name": (shown_as or out).name,
        "method": "knn",
        "model": knn.model_description,
        "kind": knn.kind,
        "data": describe_data(cfg),
        "strategy": "query",
        "transport": "fp32",
        "sites": sorted(set(node_names.values())) or names,
        "n_train": sum(len(s.train) for s in sites),
        "n_validation": len(ws.splits.validation),
        "n_test": len(ws.splits.test),
        "trainable_parameters": 0,
        "base_parameters": knn.base_parameters,
        "trainable_percent": 0.0,
        "rounds": 0,
        "best_round": 0,
        "best_val_loss": val.loss if val is not None else float("nan"),
        "stopped_early": False,
        # One "round" of a query-federated method = answering the test queries.
        "bytes_down_per_site_round": per_site["down"],
        "bytes_up_per_site_round": per_site["up"],
        "payload_up_per_site_round": sum(
            t["payload_bytes"] for t in test_traffic if t["direction"] == "up") / n_sites,
        "bytes_total": sum(t["bytes"] for t in traffic),
        "personalized": [],
        **test.summary(),
        "report": test.report,
        "confusion": test.confusion,
        "test_scores": test.per_example,
        "test_groups": example_groups(ws.splits.test),
        "test_digest": examples_digest(ws.splits.test),
        "notes": list(ws.splits.notes) + list(ws.partition.notes) + failures,
        "failed_sites": sorted({f.split(" failed on ")[0] for f in failures}),
        "wall_seconds": time.perf_counter() - t_start,
        "history": [],
    }  # fmt: skip
    append_jsonl(out / METRICS_FILE, summary)
    write_json(out / "traffic.json", traffic)
    _write_report(out, summary, test, ws.splits.labels)
    console.print(
        f"[bold green]test[/] accuracy {test.accuracy:.4f}  macro-F1 {test.macro_f1:.4f}  "
        f"weighted F1 {test.weighted_f1:.4f}  ({summary['wall_seconds']:.0f} s) "
        f"-> {escape(str(shown_as or out))}"
    )
    summary["run_dir"] = str(out)
    return summary


def _write_report(out: Path, s: dict[str, Any], test: Metrics, labels: tuple[str, ...]) -> None:
    title = f"knn on {s['model']}, federated by query"
    plot_confusion(test, labels, out / "confusion.png", f"test, {title}")
    mb = 1e6
    text = f"""# Run {s["name"]}: {title}

Each site ({", ".join(s["sites"])}) keeps an index of its own training examples
({s["n_train"]} in all); for each query the server sent the query's embedding to every
site and received the site's top-k (cosine score, label) pairs: no text and no
embedding of a site's data left it. The server kept the k best pairs over all
sites and voted.

| | |
|---|---|
| data | {s["data"]} |
| validation / test queries | {s["n_validation"]} / {s["n_test"]} |
| bytes per site for the test queries, down / up | {s["bytes_down_per_site_round"] / mb:.3f} MB / {s["bytes_up_per_site_round"] / mb:.3f} MB |
| bytes in total | {s["bytes_total"] / mb:.3f} MB |
| wall time | {s["wall_seconds"]:.1f} s |

## Test set

| accuracy | macro-F1 | weighted F1 | loss |
|---|---|---|---|
| {100 * test.accuracy:.2f}% | {100 * test.macro_f1:.2f}% | {100 * test.weighted_f1:.2f}% | {test.loss:.4f} |

{metrics_table(test, labels)}

![confusion matrix](confusion.png)
"""  # noqa: E501
    if s["failed_sites"]:
        text += ("\n## Sites that failed\n\nTheir neighbours are missing from the queries "
                 "below: those answers come from the other sites' data only.\n\n"
                 + "\n".join(f"- {n}" for n in s["notes"] if " failed on " in n) + "\n")
    (out / "report.md").write_text(text)
