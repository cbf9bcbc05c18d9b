"""Retrieval with a frozen model: nearest-neighbour classification (`knn`) over a
persistent vector index (fedtune.vectorstore, LanceDB), and the vote that turns
neighbours into label scores.

`knn` embeds the training set once into an index with metadata (label, site,
source) that is saved in the model directory; a query is embedded, its k nearest
passages retrieved (cosine similarity) and their labels voted, each neighbour
weighted by 1 / (cosine distance + 0.01) by default. The vote is a function of
(score, label) pairs only, which is what lets the federated form (fedtune.federated.query)
merge the top-k lists sites send without ever seeing their texts or embeddings.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedtune.config import MethodConfig
from fedtune.data import Example
from fedtune.errors import ConfigError, ModelError
from fedtune.methods import register
from fedtune.methods.frozen import EmbeddingMethod, Payload, QueryFederated
from fedtune.vectorstore import Hit, VectorStore

INDEX_DIR = "index"
NO_LABEL = -1


@dataclass(frozen=True)
class KnnConfig(MethodConfig):
    """Nearest-neighbour classification over a vector index of the training set."""

    lr: float = 0.0
    """Unused (nothing is trained)."""
    embedder: str = ""
    """Embedding model (Hub id, directory or `minilm`); default: `model.name`."""
    k: int = 10
    """Neighbours that vote."""
    weighting: Literal["distance", "uniform"] = "distance"
    """`distance`: each neighbour's vote weighs 1 / (1 - cosine + 0.01); `uniform`: 1."""
    max_length: int = 128
    cache: bool = True
    """Keep embeddings in the on-disk cache ($FEDTUNE_CACHE_DIR) for re-runs."""


def vote(scores: np.ndarray, labels: np.ndarray, n_labels: int, weighting: str) -> np.ndarray:
    """Neighbours -> log-probability per label [Q, K].

    scores [Q, k] cosine similarities, labels [Q, k] label ids (NO_LABEL = no
    neighbour in that slot). Probabilities are the normalised vote weights, with a
    small floor (1e-3 of the total) so no label is impossible.
    """
    valid = labels >= 0
    weights = 1.0 / (1.0 - scores + 0.01) if weighting == "distance" else np.ones_like(scores)
    weights = np.where(valid, weights, 0.0)  # [Q, k]
    votes = np.zeros((len(scores), n_labels), dtype=np.float64)
    rows = np.repeat(np.arange(len(scores)), scores.shape[1])
    np.add.at(votes, (rows[valid.ravel()], labels.ravel()[valid.ravel()]),
              weights.ravel()[valid.ravel()])  # fmt: skip
    total = votes.sum(1, keepdims=True)
    floor = 1e-3 * np.maximum(total, 1e-12) / n_labels
    probs = (votes + floor) / (total + n_labels * floor)
    return np.log(probs).astype(np.float32)


def top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, label) pairs per row of concatenated candidate lists
    [Q, m] -> [Q, k] each, best first (stable: earlier candidates win ties)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)


@register
class Knn(EmbeddingMethod[KnnConfig], QueryFederated):
    name = "knn"
    description = "k nearest neighbours in a vector index (LanceDB), distance-weighted vote"
    config_class = KnnConfig

    @property
    def query_protocol(self) -> str:
        return ("for each query the server sent the query's embedding to every site and "
                "received the site's top-k (cosine score, label) pairs: no text and no "
                "embedding of a site's data left it. The server kept the k best pairs over "
                "all sites and voted.")  # fmt: skip

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.k < 1:
            raise ConfigError(f"method.k = {cfg.k} must be at least 1")
        self.store: VectorStore | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def fit(self, train: list[Example], directory: Path | None = None,
            validation: list[Example] | None = None) -> Knn:  # fmt: skip
        """Embed `train` into a new index (in `directory`/index, else a temporary one)."""
        return self.fit_embeddings(self.embed([e.text for e in train]), train, directory)

    def fit_embeddings(self, x: np.ndarray, train: list[Example],
                       directory: Path | None = None) -> Knn:  # fmt: skip
        t0 = time.perf_counter()
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedtune-knn-")
            directory = Path(self._tmp.name)
        self.store = VectorStore.create(directory / INDEX_DIR, self.embedder.fingerprint,
                                        x.shape[1], overwrite=True)  # fmt: skip
        self.store.add(x, [e.text for e in train], [e.label for e in train],
                       [e.site or "" for e in train], ["train"] * len(train))  # fmt: skip
        self.fit_seconds += time.perf_counter() - t0
        return self

    def neighbours(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine score, label id) per query embedding [Q, k] each; slots
        without a neighbour (an index smaller than k) hold (-inf, NO_LABEL)."""
        if self.store is None:
            raise ModelError("the knn index is empty; call fit() first")
        index = {label: i for i, label in enumerate(self.labels)}
        hits: list[list[Hit]] = self.store.search(queries, k)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        labels = np.full((len(queries), k), NO_LABEL, dtype=np.int64)
        for q, row in enumerate(hits):
            for j, h in enumerate(row):
                if h.label not in index:
                    raise ModelError(f"index label {h.label!r} is not one of {self.labels}")
                scores[q, j], labels[q, j] = h.score, index[h.label]
        return scores, labels

    def scores_of(self, queries: np.ndarray) -> np.ndarray:
        return self._vote(*self.neighbours(queries, self.config.k))

    def _vote(self, s: np.ndarray, lab: np.ndarray) -> np.ndarray:
        return vote(np.where(np.isfinite(s), s, 0.0), lab, len(self.labels), self.config.weighting)

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        return self.scores_of(self.embed(list(texts)))

    # Federated by query: the server embeds the queries; a site answers with its
    # top-k (score, label) pairs; the k best of the union are the k best of the
    # pooled index, so with disjoint sites the vote equals centralized knn's.

    def query_payload(self, queries: list[Example]) -> Payload:
        return {"queries": self.embed([e.text for e in queries])}

    def answer_queries(self, payload: Payload) -> Payload:
        scores, labels = self.neighbours(np.asarray(payload["queries"], np.float32), self.config.k)
        return {"scores": scores, "labels": labels}

    def combine_answers(self, answers: list[Payload]) -> np.ndarray:
        s, lab = top_k(np.concatenate([np.asarray(a["scores"]) for a in answers], 1),
                       np.concatenate([np.asarray(a["labels"]) for a in answers], 1),
                       self.config.k)  # fmt: skip
        return self._vote(s, lab)

    def _save_state(self, directory: Path) -> None:
        if self.store is None:
            raise ModelError("nothing to save: the knn index is empty")
        target = directory / INDEX_DIR
        if self.store.path.resolve() != target.resolve():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(self.store.path, target)

    def _load_state(self, directory: Path) -> None:
        # Refuses an index built with another embedding model (fingerprints differ).
        self.store = VectorStore.open(directory / INDEX_DIR, self.embedder.fingerprint)
