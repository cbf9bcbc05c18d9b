"""Feature-based adaptation (`features`): frozen-model embeddings + a
scikit-learn classifier.

The base model only embeds (fedtune.embed: sentence-transformers pooling for
sentence-transformers models, mean-pooled hidden states otherwise; cached on
disk). The classifier is scikit-learn's: logistic regression by default, or a
linear SVM, a ridge classifier or a small MLP.

Federated form (logistic regression only, the one linear model whose weights
average meaningfully as probabilities): the trainable state is the weight
matrix and bias, [K, D] and [K]. Each site starts from the global weights and
runs `local_iters` L-BFGS iterations on its own embeddings; the server averages
(FedAvg through the same Flower apps as every trainable method). The local step
is written here in torch, not with scikit-learn, because scikit-learn fits only
the classes present in the data and a site under label skew may lack one — the
exchanged matrix must always have one row per label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import joblib
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import LinearSVC
from torch import Tensor

from fedtune.config import MethodConfig
from fedtune.data import Example
from fedtune.errors import ConfigError, ModelError
from fedtune.methods import register
from fedtune.methods.frozen import EmbeddingMethod, to_tensors

WEIGHTS_FILE = "classifier.safetensors"
PICKLE_FILE = "classifier.joblib"


@dataclass(frozen=True)
class FeaturesConfig(MethodConfig):
    """Frozen embeddings + a scikit-learn classifier."""

    lr: float = 0.0
    """Unused (the classifiers have their own solvers)."""
    embedder: str = ""
    """Embedding model (Hub id, directory or `minilm`); default: `model.name`."""
    classifier: Literal["logreg", "linear_svm", "ridge", "mlp"] = "logreg"
    c: float = 10.0
    """Inverse regularisation strength (scikit-learn's C) of logreg and linear_svm;
    ridge uses 1/c as its alpha. 10 was best of 1/10/100 on FPB's validation set
    with MiniLM's unit-length embeddings."""
    max_iter: int = 1000
    max_length: int = 128
    """Tokens per text when embedding."""
    cache: bool = True
    """Keep embeddings in the on-disk cache ($FEDTUNE_CACHE_DIR) for re-runs."""
    local_iters: int = 25
    """Federated: L-BFGS iterations per round at each site."""


@register
class Features(EmbeddingMethod[FeaturesConfig]):
    name = "features"
    description = "frozen embeddings + scikit-learn classifier (logistic regression)"
    config_class = FeaturesConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.classifier_: Any = None
        self._weights: dict[str, np.ndarray] = {}  # logreg: coef [K, D], intercept [K]

    def _new_classifier(self) -> Any:
        cfg = self.config
        if cfg.c <= 0:
            raise ConfigError(f"method.c = {cfg.c} must be > 0")
        if cfg.classifier == "logreg":
            return LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, random_state=self.seed)
        if cfg.classifier == "linear_svm":
            return LinearSVC(C=cfg.c, max_iter=cfg.max_iter, random_state=self.seed)
        if cfg.classifier == "ridge":
            return RidgeClassifier(alpha=1.0 / cfg.c)
        return MLPClassifier(hidden_layer_sizes=(256,), max_iter=cfg.max_iter,
                             early_stopping=True, random_state=self.seed)  # fmt: skip

    def fit(self, train: list[Example], directory: Path | None = None,
            validation: list[Example] | None = None) -> Features:  # fmt: skip
        x = self.embed([e.text for e in train])
        return self.fit_embeddings(x, self.label_ids(train))

    def fit_embeddings(self, x: np.ndarray, y: np.ndarray) -> Features:
        t0 = time.perf_counter()
        present = np.unique(y)
        if len(present) < 2:
            # A skewed site alone may hold one label: predict it, as a trained
            # classifier on such data would, and say so (a comparison goes on).
            only = int(present[0])
            self._weights = {"coef": np.zeros((len(self.labels), x.shape[1]), np.float32),
                             "intercept": np.full(len(self.labels), -1e4, np.float32)}  # fmt: skip
            self._weights["intercept"][only] = 0.0
            self.notes.append(f"features: the training data holds one label only "
                              f"({self.labels[only]}): every text is predicted as it")  # fmt: skip
            self.fit_seconds += time.perf_counter() - t0
            return self
        clf = self._new_classifier().fit(x, y)
        self.classifier_ = clf
        if self.config.classifier == "logreg":
            # Full [K, D] even if a label is absent from the data (its row stays 0,
            # its bias very negative), so every model has the same shape.
            k = len(self.labels)
            coef = np.zeros((k, x.shape[1]), dtype=np.float32)
            bias = np.full(k, -1e4 if len(present) < k else 0.0, dtype=np.float32)
            if len(clf.classes_) == 2 and clf.coef_.shape[0] == 1:  # binary: one row
                coef[clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
                coef[clf.classes_[0]], bias[clf.classes_[0]] = 0.0, 0.0
            else:
                coef[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
            self._weights = {"coef": coef, "intercept": bias}
        self.fit_seconds += time.perf_counter() - t0
        return self

    def scores_of(self, x: np.ndarray) -> np.ndarray:
        if self._weights:
            return x @ self._weights["coef"].T + self._weights["intercept"]  # [N, K] logits
        if self.classifier_ is None:
            raise ModelError("the features classifier is not fitted; call fit() first")
        clf = self.classifier_
        out = np.full((len(x), len(self.labels)), -1e4, dtype=np.float32)
        raw = clf.predict_log_proba(x) if hasattr(clf, "predict_log_proba") else (
            clf.decision_function(x))  # fmt: skip
        if raw.ndim == 1:  # binary decision function: one column for classes_[1]
            raw = np.stack([-raw, raw], axis=1)
        out[:, clf.classes_] = raw
        return out

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        return self.scores_of(self.embed(list(texts)))

    # --- federated: the linear model's weights cross the wire -----------------------

    def _require_linear(self) -> None:
        if self.config.classifier != "logreg":
            raise ConfigError(
                f"federated `features` averages a logistic regression's weights; "
                f"method.classifier = {self.config.classifier!r} cannot be averaged: "
                "set method.classifier = 'logreg'"
            )

    def init_state(self, dim: int) -> None:
        """Round 0's global state: zeros (the logistic loss is convex; no symmetry to break)."""
        self._require_linear()
        k = len(self.labels)
        self._weights = {"coef": np.zeros((k, dim), np.float32),
                         "intercept": np.zeros(k, np.float32)}  # fmt: skip

    def trainable_state(self) -> dict[str, Tensor]:
        return to_tensors(self._weights)

    def trainable_parameters(self) -> int:
        """Learnt numbers: the linear weights, or the scikit-learn model's own."""
        if self._weights or self.classifier_ is None:
            return super().trainable_parameters()
        clf = self.classifier_
        arrays = [*getattr(clf, "coefs_", []), *getattr(clf, "intercepts_", [])]  # mlp
        if not arrays:
            arrays = [clf.coef_, np.atleast_1d(clf.intercept_)]
        return int(sum(np.asarray(a).size for a in arrays))

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        self._require_linear()
        if set(state) != {"coef", "intercept"}:
            raise ModelError(f"features state needs coef and intercept, got {sorted(state)}")
        self._weights = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()}

    def local_update(self, x: np.ndarray, y: np.ndarray, sites: int = 1) -> float:
        """`local_iters` L-BFGS iterations on this site's data from the current
        weights. Returns the final training loss.

        The objective is scikit-learn's multinomial logistic regression, split so
        that FedAvg's example-weighted average of the S sites' objectives is the
        centralized one: site i minimises mean cross-entropy + ||W||^2 / (2 C S n_i);
        sum_i (n_i / N) / (2 C S n_i) = 1 / (2 C N), the pooled penalty. (With
        1 / (2 C n_i) at every site the federation would be C / S centralized.)
        `sites` = S, the number of sites training this round (sent by the server).
        """
        self._require_linear()
        t0 = time.perf_counter()
        xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
        w = torch.from_numpy(self._weights["coef"]).double().requires_grad_(True)  # [K, D]
        b = torch.from_numpy(self._weights["intercept"]).double().requires_grad_(True)  # [K]
        l2 = 1.0 / (2 * self.config.c * max(1, sites) * len(y))
        opt = torch.optim.LBFGS([w, b], max_iter=self.config.local_iters,
                                line_search_fn="strong_wolfe")  # fmt: skip

        def closure() -> Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():  # the loss where L-BFGS stopped (step() returns the first)
            loss = float(torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + l2 * (w * w).sum())
        self._weights = {"coef": w.detach().float().numpy(),
                         "intercept": b.detach().float().numpy()}  # fmt: skip
        self.fit_seconds += time.perf_counter() - t0
        return loss

    # --- save / load ------------------------------------------------------------------

    def _save_state(self, directory: Path) -> None:
        if self._weights:
            save_file({k: np.ascontiguousarray(v) for k, v in self._weights.items()},
                      str(directory / WEIGHTS_FILE))  # fmt: skip
        elif self.classifier_ is not None:
            # Non-linear classifiers have no portable weight format: joblib (a
            # pickle; load only files you trust, as with any scikit-learn model).
            joblib.dump(self.classifier_, directory / PICKLE_FILE)
        else:
            raise ModelError("nothing to save: the features classifier is not fitted")

    def _load_state(self, directory: Path) -> None:
        if (directory / WEIGHTS_FILE).is_file():
            self._weights = load_file(str(directory / WEIGHTS_FILE))
        elif (directory / PICKLE_FILE).is_file():
            self.classifier_ = joblib.load(directory / PICKLE_FILE)
        else:
            raise ModelError(
                f"{directory}: no {WEIGHTS_FILE} or {PICKLE_FILE}; not a features model"
            )
