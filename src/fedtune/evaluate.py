"""Metrics of a classifier on labelled examples (scikit-learn does the counting)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from fedtune.classify import Feature, to_device

if TYPE_CHECKING:  # avoids an import cycle at runtime
    from fedtune.adapted import AdaptedModel


@dataclass
class Metrics:
    loss: float
    accuracy: float
    macro_f1: float
    weighted_f1: float
    n: int
    report: dict[str, Any] = field(default_factory=dict)
    """Per-class precision/recall/F1/support (sklearn's classification_report)."""
    confusion: list[list[int]] = field(default_factory=list)
    """Rows: true label, columns: predicted label, in label order."""

    def summary(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
        }


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...], loss: float = float("nan")
) -> Metrics:
    ids = list(range(len(labels)))
    return Metrics(
        loss=loss,
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        weighted_f1=float(
            f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)
        ),
        n=len(y_true),
        report=classification_report(
            y_true, y_pred, labels=ids, target_names=list(labels), output_dict=True, zero_division=0
        ),
        confusion=confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    )


@torch.no_grad()
def evaluate_features(model: AdaptedModel, feats: list[Feature], batch_size: int = 64) -> Metrics:
    """Loss (the training objective, averaged like in training) and metrics of
    already-encoded labelled features."""
    order = np.argsort([f["length"] for f in feats], kind="stable")  # less padding
    was_training = model.module.training
    model.module.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # (summed loss, loss units)
    preds = np.zeros(len(feats), dtype=np.int64)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = to_device(model.formulation.collate([feats[i] for i in idx]), model.device)
            loss_units, scores = model.formulation.evaluate(model.module, batch)
            totals += loss_units.double().cpu()
            preds[idx] = scores.argmax(-1).cpu().numpy()
    finally:
        model.module.train(was_training)
    y_true = np.array([f["labels"] for f in feats])
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    return classification_metrics(y_true, preds, model.labels, loss)


def evaluate(
    model: AdaptedModel, texts: list[str], labels: list[int], batch_size: int = 64
) -> Metrics:
    return evaluate_features(model, model.formulation.encode(texts, labels), batch_size)
