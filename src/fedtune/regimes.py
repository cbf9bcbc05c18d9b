"""Regimes: how a method's training is organised over the data. This module has
the centralized regime (one model, pooled data) for trained and frozen-model
methods; the local-only regime runs it on one site's data, the federated one is
fedtune.federated, and fedtune.federated.compare puts them side by side.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedtune.adapted import AdaptedModel
from fedtune.config import MethodConfig, RunConfig, method_config
from fedtune.data import Example, Splits, example_groups, examples_digest, make_splits
from fedtune.data.sources import fpb_file_agreement
from fedtune.evaluate import Metrics, check_select_by, evaluate_features, test_line, val_line
from fedtune.methods import FrozenMethod, get_method, is_frozen
from fedtune.methods.frozen import EmbeddingMethod
from fedtune.report import write_run_report
from fedtune.runs import (
    CONFIG_FILE,
    LABELS_FILE,
    METRICS_FILE,
    MODEL_DIR,
    append_jsonl,
    final_run_dir,
    staged_run_dir,
    write_json,
)
from fedtune.train import train


def encode(model: AdaptedModel, examples: list[Example]) -> list[dict[str, Any]]:
    return model.formulation.encode_examples(examples)


def describe_data(cfg: RunConfig) -> str:
    d = cfg.data
    if d.source == "fpb":
        where = d.path or (
            f"{os.environ['FEDTUNE_DATA_DIR']}/financial_phrasebank"
            if os.environ.get("FEDTUNE_DATA_DIR")
            else "Hub: takala/financial_phrasebank"
        )
        agreement = (fpb_file_agreement(d.path) if d.path else None) or d.agreement
        return f"Financial PhraseBank ({agreement} agree, {where}), split `{d.split}`"
    where = d.path or d.name or "its default folder under FEDTUNE_DATA_DIR"
    return f"{d.source} ({where}), split `{d.split}`"


def run_centralized(
    cfg: RunConfig,
    console: Console | None = None,
    splits: Splits | None = None,
    shown_as: Path | None = None,
) -> dict[str, Any]:
    """Train one model on the pooled training set, evaluate on the test set and
    write the run directory. Returns the run summary (also in metrics.jsonl)."""
    console = console or Console()
    if is_frozen(cfg.method_name):
        return run_frozen(cfg, console, splits, shown_as)
    t_start = time.perf_counter()
    # Everything a user can get wrong is checked before anything is written.
    final = final_run_dir(cfg)
    splits = splits or make_splits(cfg.data)
    check_select_by(cfg.train.select_by, cfg.data.task, has_validation=bool(splits.validation))
    model = AdaptedModel.build(cfg.model, cfg.method, splits.labels, seed=cfg.seed,
                               task=cfg.data.task)  # fmt: skip
    train_feats = encode(model, splits.train)
    val_feats = encode(model, splits.validation) if splits.validation else None
    test_feats = encode(model, splits.test)
    n_train = model.trainable_parameters()
    console.print(
        f"[bold]{cfg.method_name}[/] on {cfg.model.name} ({model.kind}): "
        f"{n_train:,} trainable parameters ({100 * n_train / model.base_parameters:.3f}%), "
        + _sizes(splits)
    )

    with staged_run_dir(final) as run_dir:
        metrics_path = _begin(run_dir, cfg, splits)

        def on_eval(record: dict[str, Any]) -> None:
            append_jsonl(metrics_path, {"event": "eval", **record})
            console.print(
                f"  step {record['step']:>5}  epoch {record['epoch']:.2f}  "
                f"train loss {record['train_loss']:.4f}{val_line(record)}"
            )

        result = train(
            model, train_feats, val_feats, cfg.train, cfg.method.lr, cfg.seed, on_eval,
            description=cfg.method_name,
        )  # fmt: skip
        test = evaluate_features(model, test_feats, cfg.train.eval_batch_size,
                                 bf16=cfg.train.bf16)  # fmt: skip
        model.save(run_dir / MODEL_DIR)
        training = {
            "steps": result.steps,
            "epochs": result.epochs,
            "stopped_early": result.stopped_early,
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "select_by": cfg.train.select_by,
            "best_val_score": result.best_val_score,
            "train_seconds": result.train_seconds,
            "samples_per_second": result.samples_per_second,
        }
        summary = _finish(cfg, final, run_dir, splits, test, result.history, t_start,
                          model.kind, n_train, model.base_parameters, training)  # fmt: skip
    return _announce(console, summary, test, shown_as or final)


def _sizes(splits: Splits) -> str:
    return (f"{len(splits.train)} train / {len(splits.validation)} validation / "
            f"{len(splits.test)} test examples")  # fmt: skip


def _begin(run_dir: Path, cfg: RunConfig, splits: Splits) -> Path:
    """The files every run directory starts with; returns the metrics file's path."""
    write_json(run_dir / CONFIG_FILE, cfg.to_dict())
    write_json(run_dir / LABELS_FILE, {"labels": list(splits.labels)})
    return run_dir / METRICS_FILE


def _finish(
    cfg: RunConfig, final: Path, run_dir: Path, splits: Splits, test: Metrics,
    history: list[dict[str, Any]], t_start: float, kind: str, n_train: int, n_base: int,
    training: dict[str, Any], notes: list[str] | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The run summary (last line of metrics.jsonl) and the report, for every method."""
    summary: dict[str, Any] = {
        "event": "test",
        "name": final.name,
        "method": cfg.method_name,
        "model": cfg.model.name,
        "kind": kind,
        "data": describe_data(cfg),
        "n_train": len(splits.train),
        "n_validation": len(splits.validation),
        "n_test": len(splits.test),
        "trainable_parameters": n_train,
        "base_parameters": n_base,
        "trainable_percent": 100 * n_train / max(1, n_base),
        **training,
        **test.summary(),
        "task": cfg.data.task,
        "primary": test.primary,
        "report": test.report,
        "confusion": test.confusion,
        "samples": test.samples,
        "test_scores": test.per_example,
        "test_groups": example_groups(splits.test),
        "test_digest": examples_digest(splits.test),
        "notes": list(splits.notes) + list(notes or []),
        **(extra or {}),
    }
    summary["wall_seconds"] = time.perf_counter() - t_start
    append_jsonl(run_dir / METRICS_FILE, summary)
    write_run_report(run_dir, summary, test, history, splits.labels)
    summary["run_dir"] = str(final)
    return summary


def _announce(console: Console, summary: dict[str, Any], test: Metrics,
              shown_as: Path) -> dict[str, Any]:  # fmt: skip
    console.print(
        f"[bold green]test[/] {test_line(test)}  ({summary['wall_seconds']:.0f} s) "
        f"-> {escape(str(shown_as))}"
    )
    return summary


def method_configs(
    cfg: RunConfig, methods: list[str], overrides: dict[str, dict[str, Any]] | None = None
) -> list[MethodConfig]:
    """The config of each method to compare: defaults, the run config's own
    `[method]` values for the method it names, then per-method overrides."""
    out = []
    for m in methods:
        values = dataclasses.asdict(cfg.method) if m == cfg.method_name else {}
        out.append(method_config(m, {**values, **(overrides or {}).get(m, {})}))
    return out


def build_frozen(cfg: RunConfig, labels: tuple[str, ...]) -> FrozenMethod[Any]:
    cls = get_method(cfg.method_name)
    assert issubclass(cls, FrozenMethod)
    return cls.for_task(cfg.data.task)(cfg.method, cfg.model, labels, seed=cfg.seed,
                                       bf16=cfg.train.bf16)  # fmt: skip


def run_frozen(
    cfg: RunConfig,
    console: Console,
    splits: Splits | None = None,
    shown_as: Path | None = None,
) -> dict[str, Any]:
    """The centralized regime of a frozen-model method: fit on the pooled training
    set (embed + classifier, fill the index, or nothing), evaluate on the test set,
    write the same run directory as a trained method."""
    t_start = time.perf_counter()
    final = final_run_dir(cfg)
    splits = splits or make_splits(cfg.data)
    method = build_frozen(cfg, splits.labels)
    console.print(
        f"[bold]{cfg.method_name}[/] ({method.description}) with {method.model_description}: "
        + _sizes(splits)
    )
    with staged_run_dir(final) as run_dir:
        metrics_path = _begin(run_dir, cfg, splits)
        with console.status(f"{cfg.method_name}: fitting on {len(splits.train)} examples"):
            method.fit(splits.train, run_dir / MODEL_DIR, splits.validation)
        history: list[dict[str, Any]] = []
        if splits.validation and method.validates:
            with console.status(f"{cfg.method_name}: validation"):
                val = method.evaluate(splits.validation)
            record = {"step": 0, "epoch": 0.0, "train_loss": float("nan"),
                      "val_loss": val.loss, "val_accuracy": val.accuracy,
                      "val_macro_f1": val.macro_f1}  # fmt: skip
            append_jsonl(metrics_path, {"event": "eval", **record})
            history.append(record)
            console.print(f"  validation accuracy {val.accuracy:.4f}  macro-F1 {val.macro_f1:.4f}")
        with console.status(f"{cfg.method_name}: test"):
            t_test = time.perf_counter()
            test = method.evaluate(splits.test)
            test_seconds = time.perf_counter() - t_test
        method.save(run_dir / MODEL_DIR)
        if isinstance(method, EmbeddingMethod):  # say what the wall time includes
            st = method.embedder.stats
            method.notes.append(f"embeddings: {st.hits} read from the cache, {st.misses} "
                                f"encoded ({st.encode_seconds:.1f} s)")  # fmt: skip
        training = {
            "steps": 0,
            "epochs": 0.0,
            "stopped_early": False,
            "best_step": 0,
            "best_val_loss": history[0]["val_loss"] if history else float("nan"),
            "train_seconds": method.fit_seconds,
            "samples_per_second": len(splits.test) / max(test_seconds, 1e-9),
        }
        summary = _finish(cfg, final, run_dir, splits, test, history, t_start, method.kind,
                          method.trainable_parameters(), method.base_parameters, training,
                          method.notes,
                          {**method.extra_metrics, "model": method.model_description})  # fmt: skip
    return _announce(console, summary, test, shown_as or final)
