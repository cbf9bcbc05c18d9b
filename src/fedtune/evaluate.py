"""Metrics of a classifier on labelled examples (scikit-learn does the counting)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from fedtune.classify import Feature, to_device
from fedtune.errors import ConfigError

if TYPE_CHECKING:  # avoids an import cycle at runtime
    from fedtune.adapted import AdaptedModel


@dataclass
class Metrics:
    """A model's scores on a set of examples. `values` are the task's metrics (higher
    is better): classification accuracy / macro_f1 / weighted_f1, generation rougeL /
    exact_match / f1 (all in 0..1), preference pair_accuracy (0..1) / reward_margin;
    `primary` names the one regimes are ranked by. `loss` is the training objective on
    the same examples."""

    loss: float
    n: int
    values: dict[str, float] = field(default_factory=dict)
    primary: str = "accuracy"
    report: dict[str, Any] = field(default_factory=dict)
    """Classification: per-class precision/recall/F1/support (sklearn's
    classification_report). Generation and preference: per-category metrics and counts."""
    confusion: list[list[int]] = field(default_factory=list)
    """Rows: true label, columns: predicted label, in label order (classification)."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """Generation: a few (instruction, reference, prediction) triples for the report."""
    answers: list[dict[str, Any]] = field(default_factory=list)
    """Generation: every test example's instruction, category, reference, generated
    answer and its scores, in the examples' order (the run's answers.jsonl)."""
    per_example: list[float] = field(default_factory=list)
    """The primary metric of each example, in the examples' order (classification: 1 if
    right; generation: the answer's ROUGE-L; preference: 1 if the chosen answer scored
    higher): its mean is `score`. Two models tested on the same examples are compared
    paired on these (fedtune.federated.compare.findings)."""

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss, **self.values}

    @property
    def score(self) -> float:
        """The primary metric (nan when only the loss was computed)."""
        return self.values.get(self.primary, float("nan"))

    @property
    def accuracy(self) -> float:
        return self.values.get("accuracy", float("nan"))

    @property
    def macro_f1(self) -> float:
        return self.values.get("macro_f1", float("nan"))

    @property
    def weighted_f1(self) -> float:
        return self.values.get("weighted_f1", float("nan"))

    def brief(self) -> str:
        """The metrics as a short console line, e.g. `acc 0.8761  macro-F1 0.8512`."""
        return "  ".join(f"{SHORT.get(k, k)} {v:.4f}" for k, v in self.values.items())


SHORT = {"accuracy": "acc", "macro_f1": "macro-F1", "weighted_f1": "weighted F1",
         "rougeL": "ROUGE-L", "exact_match": "EM", "f1": "F1", "pair_accuracy": "pair acc",
         "reward_margin": "margin"}  # fmt: skip
"""Display names of metric keys (console lines)."""

LABEL = {**SHORT, "accuracy": "accuracy", "pair_accuracy": "pair accuracy",
         "reward_margin": "reward margin"}  # fmt: skip
"""Display names of metric keys (table headers)."""

TASK_METRICS = {"classification": ("accuracy", "macro_f1", "weighted_f1"),
                "generation": ("rougeL", "exact_match", "f1"),
                "preference": ("pair_accuracy", "reward_margin")}  # fmt: skip
"""Each task's metrics, the primary (ranking) one first."""


def check_select_by(select_by: str, task: str, has_validation: bool = True) -> None:
    """`train.select_by` must be `loss` or one of the task's metrics, and a metric needs
    a validation set to be computed on."""
    allowed = ("loss", *TASK_METRICS.get(task, ()))
    if select_by not in allowed:
        raise ConfigError(f"train.select_by = {select_by!r} is not a validation score of a "
                          f"{task} task; use one of {', '.join(allowed)}")  # fmt: skip
    if select_by != "loss" and not has_validation:
        raise ConfigError(f"train.select_by = {select_by!r} needs a validation set to select "
                          "on: set data.val_size > 0, or leave select_by = 'loss'")  # fmt: skip


def selection_key(m: Metrics, select_by: str) -> float:
    """What `train.select_by` minimizes: the validation loss, or minus the metric (a
    metric that could not be computed counts as the worst)."""
    value = m.loss if select_by == "loss" else -m.values.get(select_by, float("nan"))
    return float("inf") if np.isnan(value) else float(value)


def metric_names(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The metrics of run summaries (all of one task; summaries written before tasks
    existed are classification)."""
    tasks = {r.get("task", "classification") for r in rows}
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks ({', '.join(sorted(tasks))}) in one table")
    return TASK_METRICS[tasks.pop() if tasks else "classification"]


def val_line(record: dict[str, Any]) -> str:
    """`  val loss 0.4321  acc 0.8761 ...`: the validation part of a progress line, with
    whatever metrics the task computed between steps (generation: the loss alone)."""
    if "val_loss" not in record:
        return ""
    rest = "".join(f"  {SHORT.get(k[4:], k[4:])} {v:.4f}" for k, v in record.items()
                   if k.startswith("val_") and k != "val_loss"
                   and isinstance(v, float))  # fmt: skip
    return f"  val loss {record['val_loss']:.4f}{rest}"


def test_line(test: Metrics) -> str:
    """`accuracy 0.8761  macro-F1 0.8512  weighted F1 0.8700` (or the task's metrics)."""
    return "  ".join(f"{LABEL.get(k, k)} {v:.4f}" for k, v in test.values.items())


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...], loss: float = float("nan")
) -> Metrics:
    ids = list(range(len(labels)))
    values = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)
        ),
    }
    return Metrics(
        loss=loss,
        n=len(y_true),
        values=values,
        report=classification_report(
            y_true, y_pred, labels=ids, target_names=list(labels), output_dict=True, zero_division=0
        ),
        confusion=confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        per_example=(np.asarray(y_true) == np.asarray(y_pred)).astype(float).tolist(),
    )


@torch.no_grad()
def evaluate_features(
    model: AdaptedModel, feats: list[Feature], batch_size: int = 64, generate: bool = True,
    bf16: bool = False,
) -> Metrics:  # fmt: skip
    """Loss (the training objective, averaged like in training) and the task's metrics
    of already-encoded labelled features (preference: the pairs' rewards come with the
    loss, so validation gets them too). Generation tasks decode answers only when
    `generate` (test sets, not the validation checks between steps and rounds, where
    the loss alone decides). `bf16` autocasts the forward passes and that decoding, as
    training does (`train.bf16`): evaluation is most of a short run's time."""
    if bf16:
        from fedtune.train import warn_slow_bf16  # here: fedtune.train imports this module

        warn_slow_bf16(bf16, model.device)
    order = np.argsort([f["length"] for f in feats], kind="stable")  # less padding
    was_training = model.module.training
    model.module.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # (summed loss, loss units)
    preds = np.zeros(len(feats), dtype=np.int64)
    task = model.formulation.task
    classify = task == "classification"
    pair_scores = np.zeros((len(feats), 2))  # preference: [N, 2 or 3] rewards (and KL)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = to_device(model.formulation.collate([feats[i] for i in idx]), model.device)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss_units, scores = model.formulation.evaluate(model.module, batch)
            totals += loss_units.double().cpu()
            if classify:
                preds[idx] = scores.argmax(-1).cpu().numpy()
            elif task == "preference":
                if pair_scores.shape[1] != scores.shape[1]:
                    pair_scores = np.zeros((len(feats), scores.shape[1]), dtype=np.float64)
                pair_scores[idx] = scores.double().cpu().numpy()
    finally:
        model.module.train(was_training)
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    if task == "preference":
        from fedtune.preference import preference_metrics

        return preference_metrics(pair_scores, [f["labels"] for f in feats], model.labels, loss)
    if not classify:
        from fedtune.generate import generation_metrics

        if not generate:
            return Metrics(loss=loss, n=len(feats), primary="rougeL")
        return generation_metrics(model, feats, loss, batch_size, bf16)
    y_true = np.array([f["labels"] for f in feats])
    return classification_metrics(y_true, preds, model.labels, loss)


def evaluate(
    model: AdaptedModel, texts: list[str], labels: list[int], batch_size: int = 64
) -> Metrics:
    return evaluate_features(model, model.formulation.encode(texts, labels), batch_size)
