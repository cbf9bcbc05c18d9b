"""The LanceDB retrieval index: round-trips, exact search, metadata, refusals; doc splitting."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from fedtune.errors import IndexStoreError
from fedtune.vectorstore import (
    Hit,
    Passage,
    VectorStore,
    read_documents,
    split_passages,
)

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _random(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim))


def _store(tmp_path: Path, n: int = 30, dim: int = 8) -> tuple[VectorStore, np.ndarray]:
    vs = VectorStore.create(tmp_path / "idx", MODEL, dim)
    vecs = _random(n, dim, seed=1)
    vs.add(
        vecs,
        [f"text {i}" for i in range(n)],
        labels=[["neg", "pos", ""][i % 3] for i in range(n)],
        sites=[f"site{i % 2}" for i in range(n)],
        sources=[f"doc{i % 4}.md" for i in range(n)],
    )
    return vs, vecs


def _meta(path: Path) -> dict[str, object]:
    return json.loads((path / VectorStore.META_FILE).read_text())


def test_round_trip_after_reopen(tmp_path: Path) -> None:
    vs, _ = _store(tmp_path)
    queries = _random(4, 8, seed=2)
    before = vs.search(queries, k=5)
    again = VectorStore.open(tmp_path / "idx", MODEL)
    assert again is not vs and len(again) == 30
    assert (again.embedder, again.dim) == (MODEL, 8)
    assert again.search(queries, k=5) == before
    assert [len(h) for h in before] == [5, 5, 5, 5]
    # A query equal to a stored vector finds it first, with score ~1.
    vecs, hits = again.vectors()
    top = again.search(vecs[7:8] * 3.0, k=1)[0][0]
    assert top.row == 7 and top.score == pytest.approx(1.0, abs=1e-6)
    assert hits[7] == Hit(0.0, "pos", "site1", "doc3.md", "text 7", 7)


def test_search_is_exact_against_numpy(tmp_path: Path) -> None:
    n, dim, k = 500, 16, 10
    vs = VectorStore.create(tmp_path / "idx", MODEL, dim)
    vecs = _random(n, dim, seed=3)
    vs.add(vecs, [str(i) for i in range(n)])
    queries = _random(7, dim, seed=4)
    vn = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ref = qn @ vn.T  # [7, 500] float64 cosine
    for q, hits in enumerate(vs.search(queries, k)):
        order = np.argsort(-ref[q], kind="stable")[:k]
        np.testing.assert_allclose([h.score for h in hits], ref[q, order], atol=1e-5)
        for h, r in zip(hits, order, strict=True):
            # Same row, or a float32-level tie with the reference's row.
            assert h.row == r or abs(ref[q, h.row] - ref[q, r]) < 1e-5
            assert h.text == str(h.row)
    # k larger than the index: every row, best first.
    full = vs.search(queries[:1], k=n + 50)[0]
    assert len(full) == n and sorted(h.row for h in full) == list(range(n))
    assert all(a.score >= b.score for a, b in itertools.pairwise(full))


def test_ties_are_ordered_by_row(tmp_path: Path) -> None:
    vs = VectorStore.create(tmp_path / "idx", MODEL, 3)
    same = np.array([[1.0, 0.0, 0.0]] * 5)
    vs.add(np.vstack([[0.0, 1.0, 0.0], same]), [str(i) for i in range(6)])
    hits = vs.search(np.array([[2.0, 0.0, 0.0]]), k=3)[0]
    assert [h.row for h in hits] == [1, 2, 3]


def test_site_filter_and_metadata(tmp_path: Path) -> None:
    vs, _ = _store(tmp_path)
    assert vs.sites() == ["site0", "site1"]
    assert vs.labels() == ["neg", "pos"]
    queries = _random(3, 8, seed=5)
    for hits in vs.search(queries, k=4, site="site1"):
        assert len(hits) == 4
        assert all(h.site == "site1" and h.row % 2 == 1 for h in hits)
    # The filtered search equals the full search restricted to the site.
    full = vs.search(queries, k=30)
    for q, hits in enumerate(vs.search(queries, k=4, site="site0")):
        assert hits == [h for h in full[q] if h.site == "site0"][:4]
    for h in full[0]:
        assert h.text == f"text {h.row}"
        assert h.label == ["neg", "pos", ""][h.row % 3]
        assert h.source == f"doc{h.row % 4}.md"
        assert -1.0 <= h.score <= 1.0
    mat, hits = vs.vectors(site="site0")
    assert mat.shape == (15, 8) and [h.row for h in hits] == list(range(0, 30, 2))
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, atol=1e-6)
    with pytest.raises(IndexStoreError, match="no passages for site 'nowhere'"):
        vs.search(queries, k=2, site="nowhere")


def test_add_appends_rows_and_updates_count(tmp_path: Path) -> None:
    vs = VectorStore.create(tmp_path / "idx", MODEL, 4)
    assert _meta(tmp_path / "idx") == {
        "format": 1,
        "embedder": MODEL,
        "dim": 4,
        "metric": "cosine",
        "count": 0,
    }
    vs.add(_random(3, 4, seed=6), ["a", "b", "c"])
    assert _meta(tmp_path / "idx")["count"] == 3
    vs.add(_random(2, 4, seed=7), ["d", "e"], sites=["x", "x"])
    assert _meta(tmp_path / "idx")["count"] == 5 and len(vs) == 5
    _, hits = vs.vectors()
    assert [(h.row, h.text, h.site, h.label) for h in hits] == [
        (0, "a", "", ""),
        (1, "b", "", ""),
        (2, "c", "", ""),
        (3, "d", "x", ""),
        (4, "e", "x", ""),
    ]
    # The search sees rows added after an earlier search (the cache is invalidated).
    hits = vs.search(np.ones(4), k=5)[0]
    assert len(hits) == 5
    assert not list((tmp_path / "idx").glob(".*tmp"))  # no stray temp files


def test_embedder_mismatch_is_refused(tmp_path: Path) -> None:
    _store(tmp_path)
    with pytest.raises(IndexStoreError) as err:
        VectorStore.open(tmp_path / "idx", "BAAI/bge-small-en-v1.5")
    assert MODEL in str(err.value) and "BAAI/bge-small-en-v1.5" in str(err.value)
    assert VectorStore.open(tmp_path / "idx").embedder == MODEL  # no model given: no check


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(IndexStoreError, match=r"no index at .*fedtune index DOCS_DIR --output"):
        VectorStore.open(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()  # opening did not create it
    (tmp_path / "plain").mkdir()
    with pytest.raises(IndexStoreError, match="no index at"):
        VectorStore.open(tmp_path / "plain")


def test_empty_index_search(tmp_path: Path) -> None:
    vs = VectorStore.create(tmp_path / "idx", MODEL, 4)
    assert len(vs) == 0 and vs.sites() == [] and vs.labels() == []
    with pytest.raises(IndexStoreError, match="is empty; add passages with `fedtune index"):
        vs.search(np.ones((1, 4)), k=3)


def test_create_refuses_non_empty_dir_unless_overwrite(tmp_path: Path) -> None:
    _store(tmp_path)
    with pytest.raises(IndexStoreError, match="--overwrite"):
        VectorStore.create(tmp_path / "idx", MODEL, 8)
    assert len(VectorStore.open(tmp_path / "idx")) == 30  # untouched
    fresh = VectorStore.create(tmp_path / "idx", "other-model", 5, overwrite=True)
    assert (len(fresh), fresh.dim, fresh.embedder) == (0, 5, "other-model")
    assert VectorStore.open(tmp_path / "idx").embedder == "other-model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no staging leftovers
    # An existing empty folder is fine; a non-empty folder that is no index is never deleted.
    (tmp_path / "empty").mkdir()
    VectorStore.create(tmp_path / "empty", MODEL, 4)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(IndexStoreError, match="holds no fedtune index"):
        VectorStore.create(tmp_path / "mine", MODEL, 4, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("dim", [0, -3, 2.5])
def test_failed_create_leaves_nothing(tmp_path: Path, dim: object) -> None:
    with pytest.raises(IndexStoreError, match="dim must be a positive integer"):
        VectorStore.create(tmp_path / "idx", MODEL, dim)  # type: ignore[arg-type]
    with pytest.raises(IndexStoreError, match="embedder"):
        VectorStore.create(tmp_path / "idx", "", 4)
    assert list(tmp_path.iterdir()) == []


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    vs = VectorStore.create(tmp_path / "idx", MODEL, 4)
    with pytest.raises(IndexStoreError, match="dimension 5"):
        vs.add(np.ones((2, 5)), ["a", "b"])
    with pytest.raises(IndexStoreError, match="texts has 1 entries but there are 2 vectors"):
        vs.add(np.ones((2, 4)), ["a"])
    with pytest.raises(IndexStoreError, match="sites has 3 entries"):
        vs.add(np.ones((2, 4)), ["a", "b"], sites=["x", "y", "z"])
    with pytest.raises(IndexStoreError, match=r"shape \[N, dim\]"):
        vs.add(np.ones((2, 2, 4)), ["a", "b"])
    with pytest.raises(IndexStoreError, match="all zeros"):
        vs.add(np.zeros((1, 4)), ["a"])
    with pytest.raises(IndexStoreError, match="NaN"):
        vs.add(np.full((1, 4), np.nan), ["a"])
    assert len(vs) == 0 and _meta(tmp_path / "idx")["count"] == 0  # nothing half-added
    vs.add(np.ones((2, 4)), ["a", "b"])
    with pytest.raises(IndexStoreError, match="dimension 3"):
        vs.search(np.ones((1, 3)), k=1)
    with pytest.raises(IndexStoreError, match="k must be a positive integer"):
        vs.search(np.ones((1, 4)), k=0)
    assert len(vs.search(np.ones(4), k=1)) == 1  # one [dim] vector is one query


def test_read_documents(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("bee", encoding="utf-8")
    (docs / "a.md").write_text("# Ä heading", encoding="utf-8")
    (docs / "sub" / "c.TXT").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (docs / "skip.pdf").write_bytes(b"%PDF")
    (docs / ".hidden.md").write_text("secret")
    assert read_documents(docs) == [
        ("a.md", "# Ä heading"),
        ("b.txt", "bee"),
        ("sub/c.TXT", "café"),
    ]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.pdf").write_bytes(b"")
    with pytest.raises(IndexStoreError, match=r"no documents in .*none.*\*\.txt, \*\.md"):
        read_documents(tmp_path / "none")
    with pytest.raises(IndexStoreError, match=r"missing.*\*\.txt"):
        read_documents(tmp_path / "missing")


def test_split_passages() -> None:
    text = " ".join(f"w{i}" for i in range(25))
    ps = split_passages(text, "doc.md", words=10, overlap=3)
    assert [p.start for p in ps] == [0, 7, 14, 21]
    assert ps[0] == Passage(" ".join(f"w{i}" for i in range(10)), "doc.md", 0)
    assert ps[1].text.split()[:3] == ["w7", "w8", "w9"]  # overlaps the previous window
    assert ps[-1].text == "w21 w22 w23 w24"  # last, partial window
    # Exactly one window's worth: one passage; whitespace and paragraphs do not matter.
    assert split_passages("a  b\n\nc\td", "s", words=4, overlap=1) == [Passage("a b c d", "s", 0)]
    assert split_passages("a b c d e", "s", words=4, overlap=0)[-1] == Passage("e", "s", 4)
    assert split_passages("", "s") == [] and split_passages(" \n ", "s") == []
    for words, overlap in [(10, 10), (10, -1), (0, 0)]:
        with pytest.raises(IndexStoreError, match="overlap"):
            split_passages(text, "s", words=words, overlap=overlap)
