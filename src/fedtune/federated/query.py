"""Frozen methods federated by query (`QueryFederated`: knn, icl). Each site fits the
method on its own training examples and keeps it; the server sends every site each
batch of queries (`query.answer` messages), each site answers from its own copy,
and the server combines the answers of the sites that replied into label scores.
There are no rounds and no global model; what leaves a site is its answers.

- knn: the server sends query embeddings; a site answers with its top-k (cosine
  score, label id) pairs; the server keeps the k best over all sites and votes. The
  merge is exact: the k best of the union of the sites' top-k lists are the k best
  of the union of their indexes, so with disjoint shards federated kNN gives the
  labels centralized kNN gives on the pooled index.
- icl: the server sends the query texts; a site prompts the LM with demonstrations
  from its own examples and answers with its label probabilities; the server
  averages them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from rich.markup import escape

from fedtune import __version__
from fedtune.config import RunConfig
from fedtune.data import Example, Splits
from fedtune.errors import ConfigError, FedtuneError
from fedtune.evaluate import Metrics, test_line
from fedtune.federated.apps import VERSION_KEY, client_app, workspace
from fedtune.federated.grid import InProcessGrid, exchange
from fedtune.federated.wire import arrays_of, message_bytes, message_payload_bytes
from fedtune.methods.frozen import FrozenMethod, Payload, QueryFederated, frozen_class
from fedtune.report import plot_confusion, test_section, write_answers
from fedtune.runs import METRICS_FILE, append_jsonl, final_run_dir, write_json

QUERY_BATCH = 256
"""Queries per message (knn: 256 x 384 fp32 = 393 KB of MiniLM embeddings)."""
QUERY_TEXTS = "queries"
"""The ConfigRecord that carries a payload's texts (its arrays ride in "arrays")."""
SITE_KEY = "site"
"""Added by the server to each site's answer: the site's name, once per query (what
`combine_answers` may record of where a kept answer came from)."""


_COUNTED = re.compile(
    r"^(?P<head>.*?)(?<![\d.,])(?P<n>\d+) of (?P<m>\d+)(?![\d.,]?\d)(?P<tail>.*)$", re.S
)
"""A note with a whole-number count "N of M" (not inside a decimal or a 1,024)."""


def merge_counted(notes: list[str]) -> list[str]:
    """Notes of one pass over the queries, each batch's "<site>: ... N of M ..." notes
    made one per site and kind by adding up N and M ("site-1: icl: 3 of 256 prompts
    dropped demonstrations" and "... 1 of 83 ..." -> "... 4 of 339 ..."); other notes
    once each, in their first order. Notes that differ only in their first count are
    taken for one count's batches: the site notes of methods federated by query are
    counts of the queries a batch held (knn, icl)."""
    merged: dict[tuple[str, str], list[int]] = {}
    out: dict[str, tuple[str, str] | None] = {}
    for note in notes:
        m = _COUNTED.match(note)
        if m is None:
            out.setdefault(note, None)
            continue
        key = (m["head"], m["tail"] or "")
        if key in merged:
            merged[key][0] += int(m["n"])
            merged[key][1] += int(m["m"])
        else:
            merged[key] = [int(m["n"]), int(m["m"])]
            out[f"\0{len(merged)}"] = key
    return [note if key is None else f"{key[0]}{merged[key][0]} of {merged[key][1]}{key[1]}"
            for note, key in out.items()]  # fmt: skip


def federates_by_query(cfg: RunConfig) -> bool:
    """True when the run's method (for its task) federates by query."""
    cls = frozen_class(cfg.method_name, cfg.data.task)
    return cls is not None and issubclass(cls, QueryFederated)


def refuse_resume(cfg: RunConfig) -> None:
    if federates_by_query(cfg):
        raise ConfigError(
            f"a federated {cfg.method_name} run has no rounds and no checkpoint to resume: "
            "start it again (without --resume)"
        )


def payload_records(payload: Payload) -> dict[str, ArrayRecord | ConfigRecord]:
    """A payload as a message's records: its arrays in "arrays", its texts (if any) in
    QUERY_TEXTS (the queries going down, a site's answers coming up)."""
    arrays = {k: Array(np.ascontiguousarray(v))
              for k, v in payload.items() if isinstance(v, np.ndarray)}  # fmt: skip
    texts = ConfigRecord()
    for k, v in payload.items():
        if not isinstance(v, np.ndarray):
            # Flower's protobuf refuses strings that are not valid UTF-8 (a lone
            # surrogate from a JSON escape): those characters go as "?".
            texts[k] = [str(t).encode("utf-8", "replace").decode("utf-8") for t in v]
    return {"arrays": ArrayRecord(arrays), **({QUERY_TEXTS: texts} if texts else {})}


def query_content(payload: Payload, start: int, stop: int) -> RecordDict:
    """Rows start:stop of a payload as a message's content."""
    rows: Payload = {k: v[start:stop] for k, v in payload.items()}
    return RecordDict({**payload_records(rows),
                       "config": ConfigRecord({VERSION_KEY: __version__})})  # fmt: skip


def payload_of(content: RecordDict, arrays: ArrayRecord | None = None) -> Payload:
    """The payload a message carries (payload_records' inverse); `arrays` when the
    caller unpacked them already (fedtune.federated.wire.arrays_of)."""
    record = content.array_records["arrays"] if arrays is None else arrays
    payload: Payload = {k: a.numpy() for k, a in record.items()}
    texts = content.config_records.get(QUERY_TEXTS)
    for k, v in (texts or {}).items():
        if not isinstance(v, list) or k in payload:
            raise ValueError(f"{k!r} is not a list of texts, or is sent twice")
        payload[k] = [str(t) for t in v]
    return payload


def _checked(method: QueryFederated, reply: Any, rows: int) -> tuple[Payload, str]:
    """A site's reply as its answer, and what is wrong with it ('' when nothing): one
    finite row (or text) per query in every field, and an answer the method can combine
    on its own (its fields, kinds and shapes), so a malformed reply is left out rather
    than stopping the server."""
    try:
        answer = payload_of(reply.content, arrays_of(reply))
    except Exception as e:  # a record of the wrong kind
        return {}, f"unreadable: {e}"
    bad = [k for k, a in answer.items() if len(a) != rows
           or (isinstance(a, np.ndarray) and a.dtype.kind == "f"
               and not np.isfinite(a).all())]  # fmt: skip
    if bad or not answer:
        return answer, f"{', '.join(bad) or 'empty'}: not one finite row per query"
    try:
        combined = method.combine_answers([answer])
    except Exception as e:
        return answer, f"{type(e).__name__}: {e}"
    if len(combined) != rows:
        return answer, f"{len(combined)} combined rows for {rows} queries"
    return answer, ""


def federated_answers(
    grid: Grid, method: QueryFederated, payload: Payload, n: int, min_sites: int,
    traffic: list[dict[str, Any]], names: dict[int, str], timeout: float = 3600.0,
    kind: str = "test", failures: list[tuple[str, str]] | None = None,
    notes: list[str] | None = None,
) -> np.ndarray:  # fmt: skip
    """The combined answers (label scores [n, K]; generation: answer texts [n]) to the
    n queries of `payload`, combined by `method` from the sites that answered each
    batch. `names` (node id -> site name) is completed from the replies; a site that
    fails, sends no reply or a malformed one is skipped and named in `failures` (site,
    what happened); what a site noted (e.g. prompts cut to fit the context) is added
    to `notes`, prefixed with its name; fewer than `min_sites` answers for a batch
    stop the run."""
    rows = {k: len(v) for k, v in payload.items()}
    if any(r != n for r in rows.values()):
        raise ValueError(f"a query payload holds {rows} rows, not {n} each")
    nodes = list(grid.get_node_ids())
    out = []
    for start in range(0, n, QUERY_BATCH):
        stop = min(start + QUERY_BATCH, n)
        content = query_content(payload, start, stop)
        messages = [grid.create_message(content, f"{MessageType.QUERY}.answer", node, str(start))
                    for node in nodes]  # fmt: skip
        for m in messages:
            traffic.append({"kind": kind, "direction": "down", "site": names.get(
                m.metadata.dst_node_id, str(m.metadata.dst_node_id)),
                "bytes": message_bytes(m), "payload_bytes": message_payload_bytes(m)})  # fmt: skip
        got = exchange(grid, messages, timeout)
        what = f"{kind} queries {start}-{stop - 1}"
        if failures is not None:
            for node in got.missing:
                site = names.get(node, f"node-{node}")
                failures.append((site, f"{site} sent no reply to {what} in {timeout:g} s"))
        replies = got.replies
        for r in replies:
            if not r.has_error() and "site" in r.content.config_records:
                names.setdefault(r.metadata.src_node_id,
                                 str(r.content.config_records["site"]["name"]))  # fmt: skip

        def site_of(r: Message) -> str:
            return names.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}")

        # By site name (the order of the run's `sites`), not by node: a deployed
        # federation's node ids are random, and the order decides a method's ties (the
        # surest answer, equal neighbour scores) and how its float sums round.
        answers = []
        for r in sorted(replies, key=site_of):
            site = site_of(r)
            traffic.append({"kind": kind, "direction": "up", "site": site,
                            "bytes": message_bytes(r), "payload_bytes": message_payload_bytes(r),
                            "error": r.error.reason if r.has_error() else ""})  # fmt: skip
            if r.has_error():
                if failures is not None:
                    failures.append((site, f"{site} failed on {what}: {r.error.reason}"))
                continue
            answer, problem = _checked(method, r, stop - start)
            if problem:
                if failures is not None:
                    failures.append((site, f"{site} failed on {what}: a malformed answer "
                                           f"({problem})"))  # fmt: skip
                continue
            answers.append({**answer, SITE_KEY: [site] * (stop - start)})
            if notes is not None and "notes" in r.content.config_records:
                said = r.content.config_records["notes"].get("notes")
                if isinstance(said, list):
                    notes += [f"{site}: {n}" for n in said if isinstance(n, str)]
        if len(answers) < max(1, min_sites):
            raise FedtuneError(
                f"only {len(answers)} of {len(nodes)} sites answered the {kind} queries "
                f"(federated.min_sites = {min_sites}): "
                + "; ".join(str(r.error.reason) for r in replies if r.has_error())
            )
        out.append(method.combine_answers(answers))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def run_federated_by_query(
    cfg: RunConfig,
    console: Console | None = None,
    splits: Splits | None = None,
    shown_as: Path | None = None,
    grid: Grid | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """A frozen method federated by query across the sites of `grid` (default:
    `cfg.federated.sites` sites in this process, each one's fitted method under the
    run's sites/<site>/); writes a run directory (config, metrics.jsonl, report.md,
    confusion.png, traffic.json; no global model: what each site fitted stays there)
    and returns the summary."""
    from fedtune.data import example_groups, examples_digest
    from fedtune.federated.runner import _run_id, make_contexts, prepare_run_dir
    from fedtune.regimes import describe_data

    console = console or Console()
    t_start = time.perf_counter()
    out = out or final_run_dir(cfg)
    ws = workspace(cfg, splits)
    method = ws.model
    assert isinstance(method, FrozenMethod) and isinstance(method, QueryFederated)
    name = cfg.method_name
    sites = ws.partition.sites
    names = [s.name for s in sites]
    node_names: dict[int, str] = {}
    if grid is None:
        contexts = make_contexts(cfg, len(sites), names, out)
        grid = InProcessGrid(client_app, contexts, _run_id(cfg))
        node_names = {n: names[i] for i, n in enumerate(contexts)}
    n_sites = len(list(grid.get_node_ids()))
    console.print(
        f"[bold]{name}[/] with {escape(method.model_description)}, federated by query: "
        f"{n_sites} sites each answer from their own examples; "
        f"{len(ws.splits.validation) if method.validates else 0} validation / "
        f"{len(ws.splits.test)} test queries"
    )
    traffic: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    site_notes: list[str] = []
    noted = len(method.notes)  # the server's copy is kept between runs: this run's notes
    fed = cfg.federated

    def evaluate(kind: str, examples: list[Example]) -> Metrics:
        said: list[str] = []
        with console.status(f"{name}: {len(examples)} {kind} queries to {n_sites} sites"):
            payload = method.query_payload(examples)
            combined = federated_answers(grid, method, payload, len(examples), fed.min_sites,
                                         traffic, node_names, fed.timeout, kind,
                                         failures, said)  # fmt: skip
        site_notes.extend(merge_counted(said))  # batches of QUERY_BATCH: one note per pass
        return method.query_metrics(combined, examples)

    prepare_run_dir(cfg, out, ws.splits.labels, sites)
    try:
        val = (evaluate("validation", ws.splits.validation)
               if ws.splits.validation and method.validates else None)  # fmt: skip
        if val is not None:
            console.print(f"  validation {test_line(val)}")
        test = evaluate("test", ws.splits.test)
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # nothing half-written stays
        raise
    for _, line in failures:
        console.print(f"[yellow]{escape(line)}[/]")
    test_traffic = [t for t in traffic if t["kind"] == "test"]
    per_site = {d: sum(t["bytes"] for t in test_traffic if t["direction"] == d) / n_sites
                for d in ("down", "up")}  # fmt: skip
    summary: dict[str, Any] = {
        "event": "test",
        "regime": "federated",
        "name": (shown_as or out).name,
        "method": name,
        "model": method.model_description,
        "kind": method.kind,
        "data": describe_data(cfg),
        "strategy": "query",
        "transport": "fp32",
        "sites": sorted(set(node_names.values())) or names,
        "n_train": sum(len(s.train) for s in sites),
        "n_validation": len(ws.splits.validation),
        "n_test": len(ws.splits.test),
        "trainable_parameters": 0,
        "base_parameters": method.base_parameters,
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
        "task": cfg.data.task,
        "primary": test.primary,
        "report": test.report,
        "confusion": test.confusion,
        "samples": test.samples,
        "test_scores": test.per_example,
        "test_groups": example_groups(ws.splits.test),
        "test_digest": examples_digest(ws.splits.test),
        "notes": list(ws.splits.notes) + list(ws.partition.notes) + list(dict.fromkeys(site_notes))
        + list(method.notes[noted:])
        + [f for _, f in failures],
        "failed_sites": sorted({site for site, _ in failures}),
        "wall_seconds": time.perf_counter() - t_start,
        "history": [],
    }  # fmt: skip
    append_jsonl(out / METRICS_FILE, summary)
    write_json(out / "traffic.json", traffic)
    _write_report(out, summary, test, ws.splits.labels, method.query_protocol)
    console.print(
        f"[bold green]test[/] {test_line(test)}  ({summary['wall_seconds']:.0f} s) "
        f"-> {escape(str(shown_as or out))}"
    )
    summary["run_dir"] = str(out)
    return summary


def _write_report(out: Path, s: dict[str, Any], test: Metrics, labels: tuple[str, ...],
                  protocol: str) -> None:  # fmt: skip
    title = f"{s['method']} on {s['model']}, federated by query"
    if test.confusion:
        plot_confusion(test, labels, out / "confusion.png", f"test, {title}")
    write_answers(out, test)
    mb = 1e6
    text = f"""# Run {s["name"]}: {title}

Each site ({", ".join(s["sites"])}) kept the method fitted on its own training
examples ({s["n_train"]} in all); {protocol}

| | |
|---|---|
| data | {s["data"]} |
| validation / test queries | {s["n_validation"]} / {s["n_test"]} |
| bytes per site for the test queries, down / up | {s["bytes_down_per_site_round"] / mb:.3f} MB / {s["bytes_up_per_site_round"] / mb:.3f} MB |
| bytes in total | {s["bytes_total"] / mb:.3f} MB |
| wall time | {s["wall_seconds"]:.1f} s |

## Test set

{test_section(test, labels)}
{"![confusion matrix](confusion.png)" if test.confusion else ""}
"""  # noqa: E501
    if s["failed_sites"]:
        text += ("\n## Sites that failed\n\nTheir answers are missing for the queries "
                 "below: those come from the other sites' data only.\n\n"
                 + "\n".join(f"- {n}" for n in s["notes"]
                        if " failed on " in n or " sent no reply to " in n) + "\n")
    (out / "report.md").write_text(text)
