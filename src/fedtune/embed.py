"""Frozen-model sentence embeddings, with an on-disk cache.

Two ways to embed, chosen from what the model directory holds:
- a sentence-transformers model (it has `modules.json`): `SentenceTransformer`,
  with the model's own pooling and normalisation (all-MiniLM-L6-v2: mean + L2);
- any other transformers model: mean of the last hidden states over the
  attention mask (decoders included), L2-normalised.

The cache is one SQLite file (stdlib, safe under concurrent readers and one
writer, no server): rows keyed by (embedder fingerprint, sha256 of the text), the
vector stored as float32 bytes. The fingerprint covers the model name, a hash of
its config.json, the pooling, the maximum length and the fedtune cache format, so
a different model or setting never reads another's vectors. Re-runs of a
comparison then skip encoding entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.errors import ModelError
from fedtune.models import resolve_model_name

CACHE_FORMAT = 1


def cache_path() -> Path:
    """$FEDTUNE_CACHE_DIR/embeddings.sqlite, else ~/.cache/fedtune/embeddings.sqlite."""
    root = os.environ.get("FEDTUNE_CACHE_DIR") or str(Path.home() / ".cache" / "fedtune")
    return Path(root) / "embeddings.sqlite"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    encode_seconds: float = 0.0


class EmbeddingCache:
    """(fingerprint, text hash) -> float32 vector, in one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors ("
            " fingerprint TEXT NOT NULL, sha TEXT NOT NULL, dim INTEGER NOT NULL,"
            " vec BLOB NOT NULL, PRIMARY KEY (fingerprint, sha))"
        )
        self._db.commit()

    def get(self, fingerprint: str, shas: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        # SQLite limits bound parameters per statement (32766); stay well below.
        for start in range(0, len(shas), 900):
            chunk = shas[start : start + 900]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT sha, vec FROM vectors WHERE fingerprint = ? AND sha IN ({marks})",
                [fingerprint, *chunk],
            )
            for sha, blob in rows:
                found[sha] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, fingerprint: str, items: dict[str, np.ndarray]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)",
            [(fingerprint, sha, v.shape[0], v.astype(np.float32).tobytes())
             for sha, v in items.items()],
        )  # fmt: skip
        self._db.commit()

    def count(self, fingerprint: str | None = None) -> int:
        if fingerprint is None:
            return int(self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])
        q = "SELECT COUNT(*) FROM vectors WHERE fingerprint = ?"
        return int(self._db.execute(q, [fingerprint]).fetchone()[0])

    def close(self) -> None:
        self._db.close()


@dataclass
class Embedder:
    """Embeds texts with a frozen model; `embed()` goes through the cache."""

    name: str
    max_length: int = 128
    batch_size: int = 64
    cache: bool = True
    device: str = "auto"
    stats: CacheStats = field(default_factory=CacheStats)
    _model: Any = None
    _tokenizer: Any = None
    _fingerprint: str = ""

    @property
    def path(self) -> str:
        return resolve_model_name(self.name)

    @property
    def is_sentence_transformer(self) -> bool:
        return (Path(self.path) / "modules.json").is_file()

    @property
    def fingerprint(self) -> str:
        """Identity of the vectors this embedder makes (cache key; stored in indexes)."""
        if not self._fingerprint:
            cfg_file = Path(self.path) / "config.json"
            if cfg_file.is_file():
                config_hash = _sha(cfg_file.read_text(encoding="utf-8"))[:16]
            else:  # a Hub id: transformers resolves it; the id is the identity
                config_hash = "hub"
            pooling = "st" if self.is_sentence_transformer else "mean"
            self._fingerprint = (
                f"{self.name}|{config_hash}|{pooling}|len{self.max_length}|v{CACHE_FORMAT}"
            )
        return self._fingerprint

    @property
    def dim(self) -> int:
        return int(self.embed(["dimension probe"], use_cache=False).shape[1])

    def parameters(self) -> int:
        self._load()
        return int(sum(p.numel() for p in self._model.parameters()))

    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            if self.is_sentence_transformer:
                from sentence_transformers import SentenceTransformer

                # SentenceTransformer wants a str path, not a Path.
                self._model = SentenceTransformer(str(self.path), device=self._device())
                self._model.max_seq_length = self.max_length
            else:
                from transformers import AutoModel, AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.path)
                if self._tokenizer.pad_token is None:
                    self._tokenizer.pad_token = (
                        self._tokenizer.eos_token or self._tokenizer.unk_token
                    )
                self._model = AutoModel.from_pretrained(self.path).to(self._device()).eval()
        except OSError as e:
            raise ModelError(
                f"cannot load embedding model {self.name!r} ({e.__class__.__name__}: {e}); "
                "pass a local model directory, a Hub id while online, or `minilm`"
            ) from e

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32, L2-normalised rows."""
        self._load()
        if self.is_sentence_transformer:
            out = self._model.encode(
                texts, batch_size=self.batch_size, convert_to_numpy=True,
                normalize_embeddings=True, show_progress_bar=False,
            )  # fmt: skip
            return np.asarray(out, dtype=np.float32)
        chunks = []
        order = np.argsort([len(t) for t in texts], kind="stable")  # less padding
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self._tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self._device())  # fmt: skip
            hidden = self._model(**batch).last_hidden_state  # [B, T, H]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, H]
            chunks.append((idx, torch.nn.functional.normalize(mean.float(), dim=-1).cpu()))
        out = np.zeros((len(texts), chunks[0][1].shape[1]), dtype=np.float32)
        for idx, vecs in chunks:
            out[idx] = vecs.numpy()
        return out

    def embed(self, texts: list[str], use_cache: bool | None = None) -> np.ndarray:
        """[N, D] float32 embeddings of `texts` (cached ones read, the rest encoded)."""
        if not texts:
            raise ModelError("nothing to embed: the list of texts is empty")
        use_cache = self.cache if use_cache is None else use_cache
        if not use_cache:
            t0 = time.perf_counter()
            out = self._encode(list(texts))
            self.stats.encode_seconds += time.perf_counter() - t0
            self.stats.misses += len(texts)
            return out
        shas = [_sha(t) for t in texts]
        store = EmbeddingCache(cache_path())
        try:
            found = store.get(self.fingerprint, sorted(set(shas)))
            missing = sorted({s: t for s, t in zip(shas, texts, strict=True)
                              if s not in found}.items())  # fmt: skip
            self.stats.hits += sum(s in found for s in shas)
            self.stats.misses += sum(s not in found for s in shas)
            if missing:
                t0 = time.perf_counter()
                vecs = self._encode([t for _, t in missing])
                self.stats.encode_seconds += time.perf_counter() - t0
                new = {s: v for (s, _), v in zip(missing, vecs, strict=True)}
                store.put(self.fingerprint, new)
                found.update(new)
        finally:
            store.close()
        return np.stack([found[s] for s in shas]).astype(np.float32)


def describe(embedder: Embedder) -> dict[str, Any]:
    return {"name": embedder.name, "fingerprint": embedder.fingerprint,
            "max_length": embedder.max_length}  # fmt: skip


def fingerprint_json(embedder: Embedder) -> str:
    return json.dumps(describe(embedder), sort_keys=True)
