"""The persistent retrieval index of fedtune: passages, their embeddings and metadata on disk.

Why LanceDB: it is embedded (a library, no server to run), persists in a plain directory, keeps
metadata columns (text, label, site, source) next to the vectors in one table, searches small
tables exactly by brute force, and is built on Arrow, reusing the pyarrow fedtune already needs.

Layout of an index directory::

    INDEX_DIR/
      index.json       {"format": 1, "embedder": str, "dim": int, "metric": "cosine", "count": int}
      passages.lance/  the LanceDB table: vector, text, label, site, source, row

Vectors are L2-normalised before they are stored, so cosine similarity is a dot product.
Also here: reading a documents folder and splitting it into word windows (`fedtune index`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from fedtune.atomic import umask, write_json_atomic
from fedtune.errors import IndexStoreError

if TYPE_CHECKING:
    from lancedb.table import Table

FORMAT = 1
DOC_SUFFIXES = (".txt", ".md")
# Queries per block of the exact search: the [block, N] float32 score matrix stays <= ~16 MiB.
_SCORE_BLOCK_FLOATS = 1 << 22


def _lancedb() -> Any:
    """Import lancedb lazily (it takes ~1.5 s), with its Rust logger quietened.

    LanceDB logs a WARN line ("No existing dataset at ..., it will be created") on every
    create; LANCEDB_LOG is read once, when the native module loads. setdefault keeps a
    level the user chose.
    """
    os.environ.setdefault("LANCEDB_LOG", "error")
    import lancedb

    return lancedb


@dataclass(frozen=True)
class Hit:
    score: float  # cosine similarity in [-1, 1]; higher = closer (0.0 from `vectors()`)
    label: str  # "" when the passage has no label (documents)
    site: str
    source: str  # file name / dataset name the passage came from
    text: str
    row: int  # insertion order id, 0-based


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # path relative to the docs dir
    start: int  # word offset in the document


@dataclass
class _Snapshot:
    """The whole table in memory, in row order: what `search` and `vectors` read."""

    matrix: npt.NDArray[np.float32]  # [N, dim], rows L2-normalised
    rows: npt.NDArray[np.int64]  # [N], ascending
    sites: npt.NDArray[np.object_]  # [N] str, for the site mask
    texts: list[str]
    labels: list[str]
    sources: list[str]

    def hit(self, pos: int, score: float) -> Hit:
        return Hit(
            score=score,
            label=self.labels[pos],
            site=str(self.sites[pos]),
            source=self.sources[pos],
            text=self.texts[pos],
            row=int(self.rows[pos]),
        )


def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("vector", pa.list_(pa.float32(), dim)),  # fixed_size_list<float32>[dim]
            pa.field("text", pa.string()),
            pa.field("label", pa.string()),
            pa.field("site", pa.string()),
            pa.field("source", pa.string()),
            pa.field("row", pa.int64()),
        ]
    )


def _as_matrix(x: Any, what: str, dim: int | None) -> npt.NDArray[np.float32]:
    """[N, dim] (or one [dim] vector) -> L2-normalised float32 [N, dim]; refuses bad input."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise IndexStoreError(f"{what} must be a numeric array of shape [N, dim]: {e}") from e
    if a.ndim == 1:
        a = a.reshape(1, -1)  # a single vector
    if a.ndim != 2:
        raise IndexStoreError(f"{what} must have shape [N, dim]; got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise IndexStoreError(
            f"{what} have dimension {a.shape[1]} but the index holds {dim}-dimensional vectors; "
            "embed them with the model the index was built with"
        )
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
        raise IndexStoreError(f"{what} row {bad} holds NaN or infinite values")
    norms = np.linalg.norm(a, axis=1, keepdims=True)  # [N, 1]
    if a.shape[0] and (norms == 0).any():
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise IndexStoreError(f"{what} row {bad} is all zeros; a zero vector has no direction")
    # Normalise in float64, store float32: the stored rows have norm 1 to ~1e-7.
    return np.ascontiguousarray(a / np.where(norms == 0, 1.0, norms), dtype=np.float32)


def _str_column(values: Sequence[str] | None, n: int, name: str) -> list[str]:
    if values is None:
        return [""] * n
    values = list(values)
    if len(values) != n:
        raise IndexStoreError(f"{name} has {len(values)} entries but there are {n} vectors")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise IndexStoreError(f"{name}[{i}] is {type(v).__name__}, expected str")
    return values


class VectorStore:
    """A LanceDB-backed passage index with exact cosine search (see the module docstring)."""

    TABLE = "passages"
    META_FILE = "index.json"

    def __init__(self, path: Path, table: Table, meta: dict[str, Any]) -> None:
        # Use `create` or `open`; this only wires an opened table to its metadata.
        self.path = path
        self.embedder: str = meta["embedder"]
        self.dim: int = int(meta["dim"])
        self._meta = meta
        self._table = table
        self._snapshot: _Snapshot | None = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | Path, embedder: str, dim: int, overwrite: bool = False
    ) -> VectorStore:
        """A new, empty index at `path` for `dim`-dimensional vectors from model `embedder`.

        The index is built in a hidden staging folder next to `path` and renamed into place,
        so a failure leaves nothing behind. With `overwrite`, an existing index at `path` is
        replaced; a non-empty folder that is not an index is still refused (it is not ours
        to delete).
        """
        path = Path(path).expanduser()
        # Validate everything before touching the disk.
        if not isinstance(embedder, str) or not embedder.strip():
            raise IndexStoreError(
                f"cannot create index {path}: embedder must name the embedding model, "
                f"got {embedder!r}"
            )
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise IndexStoreError(
                f"cannot create index {path}: dim must be a positive integer, got {dim!r}"
            )
        dim = int(dim)
        if path.exists() and not path.is_dir():
            raise IndexStoreError(f"cannot create index {path}: it is a file; choose another path")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise IndexStoreError(
                    f"{path} already exists and is not empty; pass --overwrite to replace it "
                    "or choose another path"
                )
            if not ((path / cls.META_FILE).exists() or (path / f"{cls.TABLE}.lance").exists()):
                raise IndexStoreError(
                    f"{path} is not empty and holds no fedtune index, so --overwrite will not "
                    "delete it; choose another path"
                )
        path.parent.mkdir(parents=True, exist_ok=True)

        meta: dict[str, Any] = {
            "format": FORMAT,
            "embedder": embedder,
            "dim": dim,
            "metric": "cosine",
            "count": 0,
        }
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.creating-"))
        staging.chmod(0o777 & ~umask())  # mkdtemp makes it private (0700): as mkdir would
        try:
            db = _lancedb().connect(str(staging))
            db.create_table(cls.TABLE, schema=_schema(dim))
            write_json_atomic(staging / cls.META_FILE, meta)
            if path.is_dir():
                # Move the old index (or empty folder) aside, put the new one in, then delete
                # the old: at no point is there no index at `path` and a half-written one.
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
                os.replace(path, old / "index")
                os.replace(staging, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # Lance keeps relative paths in its manifests, so the renamed table opens in place.
        return cls.open(path, embedder)

    @classmethod
    def open(cls, path: str | Path, embedder: str | None = None) -> VectorStore:
        """Open the index at `path`; with `embedder`, refuse one built with another model."""
        path = Path(path).expanduser()
        meta_path = path / cls.META_FILE
        # Check before lancedb.connect: connecting to a missing directory creates it.
        if not path.is_dir() or not meta_path.is_file():
            raise IndexStoreError(
                f"no index at {path}; build one with `fedtune index DOCS_DIR --output {path}`"
            )
        rebuild = f"rebuild it with `fedtune index DOCS_DIR --output {path} --overwrite`"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            ok = (
                isinstance(meta, dict)
                and isinstance(meta.get("embedder"), str)
                and isinstance(meta.get("dim"), int)
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexStoreError(
                f"index metadata {meta_path} is unreadable ({e}); {rebuild}"
            ) from e
        if not ok:
            raise IndexStoreError(f"index metadata {meta_path} lacks embedder/dim; {rebuild}")
        if meta.get("format") != FORMAT:
            raise IndexStoreError(
                f"index {path} has format {meta.get('format')!r}; this fedtune reads format "
                f"{FORMAT}: {rebuild}"
            )
        if embedder is not None and embedder != meta["embedder"]:
            raise IndexStoreError(
                f"the index at {path} was built with {meta['embedder']}; queries embedded with "
                f"{embedder} are not comparable: re-index with {embedder} or use model "
                f"{meta['embedder']}"
            )
        db = _lancedb().connect(str(path))
        try:
            table = db.open_table(cls.TABLE)
        except (ValueError, FileNotFoundError, OSError) as e:  # 0.40 raises ValueError
            raise IndexStoreError(
                f"index {path} has no '{cls.TABLE}' table ({e}); {rebuild}"
            ) from e
        vec_type = table.schema.field("vector").type
        if getattr(vec_type, "list_size", None) != meta["dim"]:
            raise IndexStoreError(
                f"index {path}: {cls.META_FILE} says dim {meta['dim']} but the table stores "
                f"{vec_type}; {rebuild}"
            )
        return cls(path, table, meta)

    # ---- writing ------------------------------------------------------------------------

    def add(
        self,
        vectors: npt.ArrayLike,
        texts: list[str],
        labels: list[str] | None = None,
        sites: list[str] | None = None,
        sources: list[str] | None = None,
    ) -> None:
        """Append N passages: `vectors` [N, dim] (normalised here), one text/label/site/source each.

        Rows get the next insertion-order ids. Missing labels/sites/sources are stored as "".
        """
        mat = _as_matrix(vectors, "vectors", self.dim)  # [N, dim] float32, unit rows
        n = mat.shape[0]
        cols = {
            "text": _str_column(texts, n, "texts"),
            "label": _str_column(labels, n, "labels"),
            "site": _str_column(sites, n, "sites"),
            "source": _str_column(sources, n, "sources"),
        }
        if n == 0:
            return
        start = self._table.count_rows()  # rows are never deleted, so this is max(row) + 1
        data = pa.table(
            {
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), self.dim),
                **{name: pa.array(vals, pa.string()) for name, vals in cols.items()},
                "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
            },
            schema=_schema(self.dim),
        )
        self._table.add(data)
        self._snapshot = None  # the in-memory copy is stale now
        self._meta["count"] = self._table.count_rows()
        write_json_atomic(self.path / self.META_FILE, self._meta)

    # ---- reading ------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._table.count_rows())

    def _load(self) -> _Snapshot:
        """Read the table (the store of record) once into memory; `add` invalidates it.

        Only this object's writes invalidate the copy: one writer (`fedtune index`) at a time.
        """
        if self._snapshot is None:
            tbl = self._table.to_arrow().sort_by("row")  # Lance does not promise scan order
            n = tbl.num_rows
            # fixed_size_list -> flat float32 [N * dim]; flatten() honours slice offsets.
            flat = tbl.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self._snapshot = _Snapshot(
                matrix=np.ascontiguousarray(flat, dtype=np.float32).reshape(n, self.dim),
                rows=tbl.column("row").to_numpy().astype(np.int64),
                sites=np.array(tbl.column("site").to_pylist(), dtype=object),
                texts=tbl.column("text").to_pylist(),
                labels=tbl.column("label").to_pylist(),
                sources=tbl.column("source").to_pylist(),
            )
        return self._snapshot

    def search(self, queries: npt.ArrayLike, k: int, site: str | None = None) -> list[list[Hit]]:
        """The k passages closest (cosine) to each query, best first; ties ordered by row.

        `queries` [Q, dim] (or one [dim] vector) are normalised here. With `site`, only that
        site's passages are searched. Returns Q lists of at most k hits.

        Exact search, done in numpy over the snapshot: scores = Qn @ Mn.T (float32), then
        argpartition for the top k. Measured on 2 cores (Q=1000, N=3000, dim=384): ~0.16 s
        (+0.2 s to read the table the first time), against ~6 s for a loop of per-query
        LanceDB searches and ~0.4 s for one batched LanceDB search. LanceDB's search is exact
        too (no ANN index is ever built, so it runs a flat KNN scan), but numpy is faster and
        gives the documented row tie-break and float32 scores without a distance round-trip.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise IndexStoreError(f"k must be a positive integer, got {k!r}")
        snap = self._load()
        if snap.rows.size == 0:
            raise IndexStoreError(
                f"index {self.path} is empty; add passages with "
                f"`fedtune index DOCS_DIR --output {self.path} --overwrite`"
            )
        q = _as_matrix(queries, "queries", self.dim)  # [Q, dim] float32, unit rows
        if site is None:
            positions = np.arange(snap.rows.size)  # [n] indices into the snapshot
        else:
            positions = np.flatnonzero(snap.sites == site)
            if positions.size == 0:
                raise IndexStoreError(
                    f"index {self.path} has no passages for site {site!r}; its sites are "
                    f"{', '.join(repr(s) for s in self.sites())}"
                )
        mat = snap.matrix if site is None else snap.matrix[positions]  # [n, dim]
        n = positions.size
        kk = min(int(k), n)
        out: list[list[Hit]] = []
        block = max(1, _SCORE_BLOCK_FLOATS // n)
        for b in range(0, q.shape[0], block):
            scores = q[b : b + block] @ mat.T  # [B, n] cosine similarities
            if kk < n:
                # The kth best score of each query; every score >= it is a candidate, so
                # rows tied at the cut-off are all considered and the tie-break stays by row.
                part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # [B, kk], unordered
                kth = np.take_along_axis(scores, part, axis=1).min(axis=1)  # [B]
            else:
                kth = np.full(scores.shape[0], -np.inf, dtype=scores.dtype)
            for s, cut in zip(scores, kth, strict=True):
                cand = np.flatnonzero(s >= cut)  # ascending position = ascending row
                best = cand[np.lexsort((cand, -s[cand]))[:kk]]  # score desc, then row asc
                # Clip float32 rounding (1.0000001) back into the documented [-1, 1].
                out.append(
                    [snap.hit(int(positions[p]), float(np.clip(s[p], -1.0, 1.0))) for p in best]
                )
        return out

    def vectors(self, site: str | None = None) -> tuple[npt.NDArray[np.float32], list[Hit]]:
        """All rows (or one site's) in row order: unit vectors [n, dim] and their metadata.

        The hits carry score 0.0 (there is no query). An unknown site gives [0, dim] and [].
        """
        snap = self._load()
        positions = (
            np.arange(snap.rows.size) if site is None else np.flatnonzero(snap.sites == site)
        )
        return snap.matrix[positions].copy(), [snap.hit(int(p), 0.0) for p in positions]

    def sites(self) -> list[str]:
        """Distinct site values, sorted ("" included when some passages have no site)."""
        return sorted(set(self._load().sites.tolist()))

    def labels(self) -> list[str]:
        """Distinct non-empty labels, sorted."""
        return sorted({lab for lab in self._load().labels if lab})

    def __repr__(self) -> str:
        return f"VectorStore({str(self.path)!r}, embedder={self.embedder!r}, dim={self.dim})"


# ---- documents for `fedtune index DOCS_DIR` -----------------------------------------------


def read_documents(directory: str | Path) -> list[tuple[str, str]]:
    """(relative POSIX path, text) of every *.txt / *.md file under `directory`, sorted by path.

    Recursive; hidden files and folders (name starting with ".") are skipped. Text is read
    as UTF-8 (a BOM is dropped), falling back to Latin-1, which decodes any byte.
    """
    root = Path(directory).expanduser()
    accepted = ", ".join(f"*{s}" for s in DOC_SUFFIXES)
    if not root.is_dir():
        raise IndexStoreError(
            f"documents folder {root} does not exist or is not a folder; "
            f"`fedtune index` reads {accepted} files from a folder"
        )
    found: list[tuple[str, Path]] = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if (
            p.suffix.lower() in DOC_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in rel.parts)
        ):
            found.append((rel.as_posix(), p))
    if not found:
        raise IndexStoreError(
            f"no documents in {root}: `fedtune index` reads {accepted} files "
            "(recursively); add some or point it at another folder"
        )
    docs: list[tuple[str, str]] = []
    for rel_name, p in sorted(found):
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        docs.append((rel_name, text))
    return docs


def split_passages(text: str, source: str, words: int = 120, overlap: int = 20) -> list[Passage]:
    """Windows of `words` words, each starting `words - overlap` after the previous one.

    Whitespace (newlines, paragraphs) is only a word separator; passage text joins the words
    with single spaces. The last window may be shorter; no window lies inside the one before.
    """
    if words < 1 or not 0 <= overlap < words:
        raise IndexStoreError(
            f"passage split needs words >= 1 and 0 <= overlap < words; "
            f"got words={words}, overlap={overlap}"
        )
    toks = text.split()
    step = words - overlap
    out: list[Passage] = []
    for start in range(0, len(toks), step):
        out.append(Passage(" ".join(toks[start : start + words]), source, start))
        if start + words >= len(toks):
            break  # this window reached the end of the document
    return out
