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
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.errors import ModelError
from fedtune.models import cache_root, resolve_model_name

CACHE_FORMAT = 1


def cache_path() -> Path:
    """$FEDTUNE_CACHE_DIR/embeddings.sqlite, else ~/.cache/fedtune/embeddings.sqlite."""
    return cache_root() / "embeddings.sqlite"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path: Path) -> str:
    """sha256 of a file's content, remembered in the cache DB per (path, size, mtime)."""
    try:
        store: EmbeddingCache | None = EmbeddingCache(cache_path())
    except ModelError:  # no usable cache: hash every time
        store = None
    try:
        known = store.digest(path) if store else None
        if known:
            return known
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()[:16]
        if store:
            store.put_digest(path, digest)
        return digest
    finally:
        if store:
            store.close()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    encode_seconds: float = 0.0


class EmbeddingCache:
    """(fingerprint, text hash) -> float32 vector, in one SQLite file; also the
    content digests of weight files, per (path, size, mtime)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS vectors ("
                " fingerprint TEXT NOT NULL, sha TEXT NOT NULL, dim INTEGER NOT NULL,"
                " vec BLOB NOT NULL, PRIMARY KEY (fingerprint, sha))"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER,"
                " mtime INTEGER, digest TEXT)"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as e:
            raise ModelError(
                f"embedding cache {self.path} is not usable ({e}); delete the file, point "
                "FEDTUNE_CACHE_DIR elsewhere, or turn the cache off (--set method.cache=false)"
            ) from e

    def digest(self, path: Path) -> str | None:
        st = path.stat()
        row = self._db.execute("SELECT size, mtime, digest FROM digests WHERE path = ?",
                               [str(path.resolve())]).fetchone()  # fmt: skip
        return row[2] if row and row[0] == st.st_size and row[1] == st.st_mtime_ns else None

    def put_digest(self, path: Path, digest: str) -> None:
        st = path.stat()
        self._db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
                         [str(path.resolve()), st.st_size, st.st_mtime_ns, digest])  # fmt: skip
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
    _sentence_transformer: bool | None = None

    @classmethod
    def from_fingerprint(cls, fingerprint: str, **kwargs: Any) -> Embedder:
        """The embedder (name and maximum length) that made vectors of `fingerprint`."""
        name, _weights, _pooling, length, _fmt = fingerprint.rsplit("|", 4)
        return cls(name, max_length=int(length.removeprefix("len")), **kwargs)

    @property
    def path(self) -> str:
        return resolve_model_name(self.name)

    @property
    def is_sentence_transformer(self) -> bool:
        """The model ships sentence-transformers modules (its own pooling). Decided
        once per embedder: every embed() asks, and for a Hub id it is a lookup."""
        if self._sentence_transformer is None:
            self._sentence_transformer = self._has_st_modules()
        return self._sentence_transformer

    def _has_st_modules(self) -> bool:
        local = Path(self.path)
        if local.is_dir():
            return (local / "modules.json").is_file()
        from huggingface_hub import hf_hub_download

        try:  # a Hub id: a tiny file, from the local cache when offline
            hf_hub_download(self.path, "modules.json")
            return True
        except Exception:  # not on the Hub, no such file, or offline and not cached
            return False

    @property
    def fingerprint(self) -> str:
        """Identity of the vectors this embedder makes (cache key; stored in indexes):
        the model name, its weights (a content hash of the weight files of a local
        directory; the resolved commit of a Hub id), pooling, maximum length and the
        cache format. Machine-independent, so a run directory copied elsewhere
        reopens its index; different weights in the same folder never match."""
        if not self._fingerprint:
            pooling = "st" if self.is_sentence_transformer else "mean"
            self._fingerprint = (f"{self.name}|{self._weights_id()}|{pooling}"
                                 f"|len{self.max_length}|v{CACHE_FORMAT}")  # fmt: skip
        return self._fingerprint

    def _weights_id(self) -> str:
        local = Path(self.path)
        if not local.is_dir():  # a Hub id: the revision transformers resolves
            from transformers import AutoConfig

            try:
                commit = getattr(AutoConfig.from_pretrained(self.path), "_commit_hash", None)
            except OSError as e:
                raise ModelError(f"cannot load embedding model {self.name!r}: {e}") from e
            return f"rev-{commit or 'unknown'}"
        files = sorted(p for p in local.rglob("*")
                       if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file())
        # Hashing weights costs ~0.2 s per 100 MB; the digest is kept in the cache DB
        # per (path, size, mtime), so a model is hashed once per install.
        parts = [f"{p.relative_to(local)}:{_file_digest(p)}" for p in files]
        if (local / "config.json").is_file():
            parts.append(_sha((local / "config.json").read_text(encoding="utf-8")))
        return _sha("\n".join(parts))[:16]

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
        fingerprint = self.fingerprint  # may hash weight files: before the cache is open
        store = EmbeddingCache(cache_path())
        try:
            found = store.get(fingerprint, sorted(set(shas)))
            missing = sorted({s: t for s, t in zip(shas, texts, strict=True)
                              if s not in found}.items())  # fmt: skip
            self.stats.hits += sum(s in found for s in shas)
            self.stats.misses += sum(s not in found for s in shas)
            if missing:
                t0 = time.perf_counter()
                vecs = self._encode([t for _, t in missing])
                self.stats.encode_seconds += time.perf_counter() - t0
                new = {s: v for (s, _), v in zip(missing, vecs, strict=True)}
                store.put(fingerprint, new)
                found.update(new)
        except sqlite3.Error as e:
            raise ModelError(
                f"embedding cache {store.path} failed ({e}); delete the file, point "
                "FEDTUNE_CACHE_DIR elsewhere, or turn the cache off (--set method.cache=false)"
            ) from e
        finally:
            store.close()
        return np.stack([found[s] for s in shas]).astype(np.float32)
