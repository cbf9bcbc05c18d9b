"""The contract of frozen-model methods: they leave the model's weights alone.

A `FrozenMethod` is the frozen counterpart of `AdaptedModel` + `Method`: it is
fitted on labelled examples (embed and fit a classifier, fill an index, or
nothing at all for in-context learning), predicts a score per label, reports the
same metrics, and saves a directory `fedtune predict` reloads. Its trainable
state is what would cross a site boundary: the classifier's weights for
`features`; nothing for `knn` and `icl`, which federate by query instead
(`QueryFederated`, run by fedtune.federated.query): each site keeps its own
index or demonstrations and answers the server's queries from them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from fedtune.config import MethodConfig, ModelConfig, method_config
from fedtune.data import Example
from fedtune.embed import Embedder
from fedtune.errors import ConfigError, ModelError
from fedtune.evaluate import Metrics, classification_metrics

META_FILE = "fedtune.json"  # the same name AdaptedModel uses

C = TypeVar("C", bound=MethodConfig)


def log_normalize(scores: np.ndarray) -> np.ndarray:
    """Rows of scores -> log-probabilities over the labels (log-softmax) [N, K]."""
    shifted = scores - scores.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def decide(scores: np.ndarray) -> np.ndarray:
    """Predicted label ids [N]; -1 where every label scores the same (a remote model's
    unparseable answer): counted as wrong, never as the first label."""
    pred = scores.argmax(-1)
    pred[np.ptp(scores, axis=-1) == 0] = -1
    return pred


class FrozenMethod(ABC, Generic[C]):
    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    kind: ClassVar[str] = "frozen"
    task: ClassVar[str] = "classification"
    validates: ClassVar[bool] = True
    """False where a validation pass decides nothing and costs much (generation ICL)."""

    @classmethod
    def for_task(cls, task: str) -> type[FrozenMethod[Any]]:
        """The class that runs this method on `task` (data.task)."""
        if task == "preference":
            raise ConfigError(
                f"method {cls.name} classifies; preference pairs (data.task=preference) are "
                "learned by method reward (a reward model) or dpo"
            )
        if task != "classification":
            raise ConfigError(
                f"method {cls.name} classifies; it has no form for data.task={task}. For "
                "generation use icl (the base model zero/few-shot) or a trained method "
                "(lora, ptuning, prompt, prefix, ia3, full)"
            )
        return cls

    def __init__(self, config: C, model_config: ModelConfig, labels: tuple[str, ...],
                 seed: int = 0, bf16: bool = False):  # fmt: skip
        self.config = config
        self.model_config = model_config
        self.labels = tuple(labels)
        self.seed = seed
        self.bf16 = bf16
        """Autocast the frozen LM's forward passes to bf16 (`train.bf16`; ICL's scoring)."""
        self.fit_seconds = 0.0
        self.notes: list[str] = []
        """What a reader of the run report should know (truncations, variants…)."""
        self.extra_metrics: dict[str, float] = {}
        """Method-specific numbers for the run summary (e.g. unparseable answers)."""

    @property
    def model_description(self) -> str:
        """The model this method runs, as the run's summary and report name it."""
        return self.model_config.name

    # --- fitting and predicting -------------------------------------------------

    @abstractmethod
    def fit(self, train: list[Example], directory: Path | None = None,
            validation: list[Example] | None = None) -> FrozenMethod[C]:  # fmt: skip
        """Learn from `train`; artifacts that live on disk (an index) go to
        `directory` (the model directory being written), else a temporary one.
        `validation` may be used to choose among variants (prompts, k)."""

    @abstractmethod
    def predict_scores(self, texts: list[str]) -> np.ndarray:
        """A score per label for each text [N, K]; higher is better."""

    def predict(self, texts: list[str]) -> list[str]:
        """Labels; "" where the method could not decide (see `decide`)."""
        return ["" if i < 0 else self.labels[i] for i in decide(self.predict_scores(texts))]

    def label_ids(self, examples: list[Example]) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index[e.label] for e in examples], dtype=np.int64)

    def evaluate(self, examples: list[Example]) -> Metrics:
        """Metrics on labelled examples; the loss is the negative log-likelihood of
        the true label under the scores renormalised over the labels."""
        return self.metrics(self.predict_scores([e.text for e in examples]),
                            self.label_ids(examples))  # fmt: skip

    def metrics(self, scores: np.ndarray, y: np.ndarray) -> Metrics:
        """Metrics of scores [N, K] against label ids y [N]."""
        logp = log_normalize(scores)
        # Floor at 1e-6 so one confident mistake of a vote-based method cannot make
        # the loss infinite.
        loss = float(-np.maximum(logp[np.arange(len(y)), y], np.log(1e-6)).mean())
        return classification_metrics(y, decide(scores), self.labels, loss)

    # --- what crosses a site boundary ---------------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        return {}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ModelError(f"method {self.name} has no trainable state; got {sorted(state)}")

    def trainable_parameters(self) -> int:
        return sum(t.numel() for t in self.trainable_state().values())

    @property
    @abstractmethod
    def base_parameters(self) -> int:
        """Parameters of the frozen model(s) used."""

    # --- save / load ----------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        from fedtune.methods import method_name_of

        return {
            "format": 1,
            "kind": self.kind,
            "labels": list(self.labels),
            "model": asdict(self.model_config),
            "method": {"name": method_name_of(self.config), **asdict(self.config)},
            "base_parameters": self.base_parameters,
            "bf16": self.bf16,
        }

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._save_state(out)
        (out / META_FILE).write_text(json.dumps(self.meta(), indent=2, sort_keys=True))
        return out

    @abstractmethod
    def _save_state(self, directory: Path) -> None:
        """Write what `_load_state` reads back (classifier, index, prompts…)."""

    @abstractmethod
    def _load_state(self, directory: Path) -> None: ...


Payload = dict[str, np.ndarray | list[str]]
"""What the server sends the sites for a batch of queries: arrays with one row per
query, or lists of texts with one item per query."""


class QueryFederated(ABC):
    """A frozen method that federates by query (fedtune.federated.query): every site
    fits its own copy on its own training examples; the server sends each query to
    every site, each answers from its copy, and only the answers leave a site; the
    server combines them (label scores, or the answer texts of generation) and scores
    them. No rounds and no global model."""

    @property
    @abstractmethod
    def query_protocol(self) -> str:
        """What crosses a site boundary, in a sentence or two for the run report."""

    @abstractmethod
    def query_payload(self, queries: list[Example]) -> Payload:
        """Server: what every site needs to answer `queries` (never their labels or
        reference answers)."""

    @abstractmethod
    def answer_queries(self, payload: Payload) -> Payload:
        """Site: its answers to a batch of queries, one row (or text) per query."""

    @abstractmethod
    def combine_answers(self, answers: list[Payload]) -> np.ndarray:
        """Server: the replies of the sites that answered a batch -> one row per query
        (label scores [Q, K]; generation: the chosen answers, an object array [Q])."""

    def query_metrics(self, combined: np.ndarray, examples: list[Example]) -> Metrics:
        """Server: the combined answers to `examples` scored against them."""
        method: Any = self
        return method.metrics(combined, method.label_ids(examples))


class EmbeddingMethod(FrozenMethod[C]):
    """A frozen method that works on embeddings of the texts (features, knn): its
    config has `embedder` (default: the run's model), `max_length` and `cache`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg: Any = self.config
        self.embedder = Embedder(cfg.embedder or self.model_config.name,
                                 max_length=cfg.max_length, cache=cfg.cache)  # fmt: skip

    @property
    def model_description(self) -> str:
        """The encoder that embeds: `method.embedder`, else `model.name`."""
        cfg: Any = self.config
        return str(cfg.embedder or self.model_config.name)

    @property
    def base_parameters(self) -> int:
        return self.embedder.parameters()

    def embed(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32 unit-length embeddings (through the on-disk cache)."""
        return self.embedder.embed(list(texts))


def frozen_class(name: str, task: str) -> type[FrozenMethod[Any]] | None:
    """The frozen-method class that runs method `name` on data.task `task` (icl hands
    generation over to its own class); None for a trained method."""
    from fedtune.methods import get_method

    cls = get_method(name)
    return cls.for_task(task) if issubclass(cls, FrozenMethod) else None


def is_frozen_dir(directory: Path) -> bool:
    meta = directory / META_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("kind") == "frozen"


def load_frozen(directory: str | Path) -> FrozenMethod[Any]:
    """A saved frozen method, ready to predict."""
    from fedtune.methods import get_method

    src = Path(directory)
    meta = json.loads((src / META_FILE).read_text())
    mcfg = dict(meta["method"])
    name = mcfg.pop("name")
    cls = get_method(name)
    if not issubclass(cls, FrozenMethod):
        raise ModelError(f"{src}: method {name} is not a frozen-model method")
    cls = cls.for_task(meta.get("task", "classification"))
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in meta["model"].items()}  # fmt: skip
    model_cfg = ModelConfig(**values)
    method = cls(method_config(name, mcfg), model_cfg, tuple(meta["labels"]),
                 bf16=bool(meta.get("bf16", False)))  # scored as it was when saved
    method._load_state(src)
    return method


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            for k, v in arrays.items()}  # fmt: skip
