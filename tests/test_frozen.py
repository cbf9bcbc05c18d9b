"""Frozen-model methods: the embedding cache, `features` (centralized and
federated logistic regression), `knn` over the vector index (centralized and
federated by query), retrieval-augmented answers, and the comparison of all."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, TEXTS, Y
from flwr.app import Message
from openai_stub import OpenAIStub
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer

import fedtune.federated.apps as apps
from fedtune.config import ModelConfig, RunConfig, load_config, method_config
from fedtune.data import Example
from fedtune.embed import Embedder, EmbeddingCache, cache_path
from fedtune.errors import ConfigError, IndexStoreError
from fedtune.federated.compare import run_regimes
from fedtune.federated.grid import InProcessGrid
from fedtune.federated.query import federated_answers
from fedtune.federated.runner import _run_id, make_contexts, run_federated
from fedtune.methods.features import Features
from fedtune.methods.frozen import load_frozen
from fedtune.methods.retrieval import Knn, top_k, vote
from fedtune.predict import load_predictor, predict_table
from fedtune.rag import answer_local, answer_remote, build_index, grounded_messages, retrieve
from fedtune.regimes import run_centralized


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(tiny: dict[str, str], table: Path, out: Path, method: str, *extra: str) -> RunConfig:
    apps.clear_workspace()
    return load_config(None, [
        "data.source=file", f"data.path={table}", f"model.name={tiny['bert']}",
        "train.progress=false", f"output_dir={out}", f"method.name={method}",
        "federated.partition=column", "data.site_column=site", *extra,
    ])  # fmt: skip


# --- embeddings and their cache ---------------------------------------------------------


def test_embedding_cache_hit_and_miss(tiny_models: dict[str, str], cache_dir: Path) -> None:
    emb = Embedder(tiny_models["bert"], max_length=32)
    first = emb.embed(TEXTS)
    assert (emb.stats.hits, emb.stats.misses) == (0, len(TEXTS))
    assert cache_path() == cache_dir / "embeddings.sqlite" and cache_path().is_file()
    again = Embedder(tiny_models["bert"], max_length=32)  # a new process would do this
    second = again.embed([*TEXTS, TEXTS[0]])
    assert (again.stats.hits, again.stats.misses) == (len(TEXTS) + 1, 0)
    np.testing.assert_array_equal(second[: len(TEXTS)], first)
    np.testing.assert_array_equal(second[-1], first[0])
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    # Another setting is another fingerprint: never reads these vectors.
    other = Embedder(tiny_models["bert"], max_length=16)
    other.embed(TEXTS[:2])
    assert other.stats.misses == 2 and other.fingerprint != emb.fingerprint
    store = EmbeddingCache(cache_path())
    assert store.count(emb.fingerprint) == len(TEXTS) and store.count() == len(TEXTS) + 2
    store.close()
    # Off: encodes, writes nothing.
    off = Embedder(tiny_models["bert"], max_length=8, cache=False)
    off.embed(TEXTS[:1])
    store = EmbeddingCache(cache_path())
    assert store.count(off.fingerprint) == 0
    store.close()


def test_new_weights_in_the_same_folder_are_a_new_fingerprint(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    import shutil

    import torch
    from transformers import AutoModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["bert"], folder)
    old = Embedder(str(folder))
    before = old.embed(TEXTS[:2])
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.save_pretrained(folder)  # same config.json, other weights
    new = Embedder(str(folder))
    after = new.embed(TEXTS[:2])
    assert new.fingerprint != old.fingerprint and new.stats.misses == 2
    assert not np.allclose(after, before)


def test_bundled_minilm_is_a_sentence_transformer() -> None:
    emb = Embedder("minilm")
    x = emb.embed(["profit rose", "profit fell"])
    assert emb.is_sentence_transformer and x.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


# --- features -----------------------------------------------------------------------------


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping 2-D Gaussian classes: a logistic regression with a finite optimum."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.normal(0, 0.8, (n, 2))).astype(np.float32), y


def test_federated_logistic_regression_on_iid_sites_approaches_centralized() -> None:
    """FedAvg of the sites' L-BFGS updates, computed by hand, against scikit-learn's
    logistic regression on the pooled data with the same C: same weights."""
    x, y = _blobs(3000, 0)
    c = 1e-3  # strong regularisation: the split of the penalty over sites must be right
    central = LogisticRegression(C=c, max_iter=1000).fit(x, y)
    method = Features(method_config("features", {"c": c, "local_iters": 50}), ModelConfig(),
                      LABELS)  # fmt: skip
    method.init_state(2)
    sites = [(x[i::3], y[i::3]) for i in range(3)]  # IID shards of 1000
    for _ in range(5):  # rounds
        start = {k: v.clone() for k, v in method.trainable_state().items()}
        updates = []
        for xs, ys in sites:
            method.load_trainable_state(start)
            method.local_update(xs, ys, sites=3)
            updates.append((len(ys), method.trainable_state()))
        n = sum(k for k, _ in updates)
        method.load_trainable_state({key: sum(k * s[key] for k, s in updates) / n
                                     for key in ("coef", "intercept")})  # fmt: skip
    w = method.trainable_state()
    # Multinomial weights are defined up to a shift shared by all classes: compare
    # the differences to class 0.
    fed_w = (w["coef"] - w["coef"][0]).numpy()
    cen_w = central.coef_ - central.coef_[0]
    np.testing.assert_allclose(fed_w, cen_w, atol=0.01 * np.abs(cen_w).max())
    fed_pred = method.scores_of(x).argmax(1)
    assert (fed_pred == central.predict(x)).mean() > 0.995


def test_features_centralized_federated_and_predict(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    cen = run_centralized(_cfg(tiny_models, table, tmp_path, "features", "name=c"))
    run = tmp_path / "c"
    assert (run / "model" / "classifier.safetensors").is_file()
    assert cen["trainable_parameters"] == 3 * 32 + 3  # tiny bert: hidden size 32
    assert not (run / "curves.png").exists() and (run / "confusion.png").is_file()
    model = load_predictor(run / "model")
    table_out = predict_table(model, TEXTS)
    assert set(table_out["label"]) <= set(LABELS)

    fed = run_federated(_cfg(tiny_models, table, tmp_path, "features", "name=f",
                             "federated.rounds=3", "federated.partition=iid"))  # fmt: skip
    assert fed["trainable_parameters"] == cen["trainable_parameters"]
    # Only the classifier crossed the wire: [3, 32] + [3] fp32 = 396 bytes of payload.
    assert fed["payload_up_per_site_round"] == 396
    assert abs(fed["accuracy"] - cen["accuracy"]) <= 0.15
    assert isinstance(load_frozen(tmp_path / "f" / "model"), Features)


@pytest.mark.parametrize("classifier", ["logreg", "linear_svm", "ridge", "mlp"])
def test_features_save_and_reload_predicts_the_same(
    tiny_models: dict[str, str], tmp_path: Path, classifier: str
) -> None:
    m = Features(method_config("features", {"classifier": classifier}),
                 ModelConfig(name=tiny_models["bert"]), LABELS).fit(_examples())  # fmt: skip
    before = m.predict_scores(TEXTS)
    m.save(tmp_path / "m")
    again = load_frozen(tmp_path / "m")
    np.testing.assert_allclose(again.predict_scores(TEXTS), before, rtol=1e-5, atol=1e-6)
    assert again.trainable_parameters() == m.trainable_parameters() > 0


def test_features_on_one_label_predicts_it_and_says_so(tiny_models: dict[str, str]) -> None:
    only = [e for e in _examples() if e.label == "neutral"]
    m = Features(method_config("features"), ModelConfig(name=tiny_models["bert"]),
                 LABELS).fit(only)  # fmt: skip
    assert set(m.predict(TEXTS)) == {"neutral"} and "one label only" in m.notes[0]


def test_features_other_classifiers_save_and_reload(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    for clf in ("ridge", "linear_svm"):
        run_centralized(_cfg(tiny_models, table, tmp_path, "features", f"name={clf}",
                             f"method.classifier={clf}"))  # fmt: skip
        assert (tmp_path / clf / "model" / "classifier.joblib").is_file()
        m = load_predictor(tmp_path / clf / "model")
        assert set(m.predict(TEXTS)) <= set(LABELS)
    with pytest.raises(ConfigError, match=r"method\.classifier = 'logreg'"):
        run_federated(_cfg(tiny_models, table, tmp_path, "features", "name=bad",
                           "method.classifier=ridge"))  # fmt: skip
    assert not (tmp_path / "bad").exists()


# --- knn --------------------------------------------------------------------------------------


def test_vote_by_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.5]])
    labels = np.array([[0, 1, 1]])
    logp = vote(scores, labels, 3, "distance")
    w = 1 / (1 - np.array([0.9, 0.8, 0.5]) + 0.01)  # 9.09, 4.76, 1.96
    total = w.sum()
    floor = 1e-3 * total / 3
    expected = np.array([w[0] + floor, w[1] + w[2] + floor, floor]) / (total + 3 * floor)
    np.testing.assert_allclose(np.exp(logp[0]), expected, rtol=1e-5)
    assert vote(scores, labels, 3, "uniform").argmax() == 1  # 2 votes beat 1
    s, lab = top_k(np.array([[0.1, 0.7, 0.4, 0.9]]), np.array([[0, 1, 2, 0]]), 2)
    assert s.tolist() == [[pytest.approx(0.9), pytest.approx(0.7)]] and lab.tolist() == [[0, 1]]


def _examples(n: int = 60) -> list[Example]:
    return [Example(f"{TEXTS[i % 6]} {i}", LABELS[Y[i % 6]], site=f"org-{i % 3}")
            for i in range(n)]  # fmt: skip


def test_knn_index_round_trip_and_model_mismatch(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    knn = Knn(method_config("knn", {"k": 3}), ModelConfig(name=tiny_models["bert"]), LABELS)
    knn.fit(_examples(), tmp_path / "m")
    before = knn.predict_scores(TEXTS)
    knn.save(tmp_path / "m")
    again = load_frozen(tmp_path / "m")  # reopens the LanceDB index from disk
    np.testing.assert_allclose(again.predict_scores(TEXTS), before, rtol=1e-5)
    assert isinstance(again, Knn) and again.store is not None and len(again.store) == 60
    meta = json.loads((tmp_path / "m" / "fedtune.json").read_text())
    meta["method"]["embedder"] = tiny_models["llama"]  # queries from another model
    (tmp_path / "m" / "fedtune.json").write_text(json.dumps(meta))
    with pytest.raises(IndexStoreError, match="not comparable"):
        load_frozen(tmp_path / "m")


def test_federated_knn_equals_centralized_and_only_scores_leave_sites(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedtune.federated.query as query

    cfg = _cfg(tiny_models, table, tmp_path, "knn", "name=fk", "method.k=5")
    ws = apps.workspace(cfg)
    sites = ws.partition.sites
    contexts = make_contexts(cfg, len(sites), [s.name for s in sites], None)
    replies: list[Message] = []

    class Spy(InProcessGrid):
        def pull_messages(self, ids):  # type: ignore[no-untyped-def]
            out = list(super().pull_messages(ids))
            replies.extend(out)
            return out

    grid = Spy(apps.client_app, contexts, _run_id(cfg))
    texts = [e.text for e in ws.splits.test]
    queries = ws.embeddings("test", ws.splits.test)
    traffic: list[dict] = []
    knn = ws.model
    assert isinstance(knn, Knn)
    scores = federated_answers(grid, knn, knn.query_payload(ws.splits.test), len(texts), 1,
                               traffic, {})  # fmt: skip
    # Centralized: one index over the union of the sites' disjoint shards; the merged
    # top-k are the pooled index's top-k, so the votes are the same.
    central = Knn(cfg.method, cfg.model, LABELS).fit([e for st in sites for e in st.train])
    np.testing.assert_allclose(scores, central.predict_scores(texts), rtol=1e-5)
    cs, cl = central.neighbours(queries, 5)
    answers = [{k: a.numpy() for k, a in r.content.array_records["arrays"].items()}
               for r in replies]  # fmt: skip
    s, lab = top_k(np.concatenate([a["scores"] for a in answers], 1),
                   np.concatenate([a["labels"] for a in answers], 1), 5)  # fmt: skip
    np.testing.assert_allclose(s, cs, rtol=1e-5)
    np.testing.assert_array_equal(lab, cl)
    # What left the sites: k (score, label id) pairs per query and the site's name.
    site_texts = [e.text.encode() for st in sites for e in st.train]
    for r in replies:
        c = r.content
        assert set(c.array_records) == {"arrays"}
        assert set(c.array_records["arrays"]) == {"scores", "labels"}
        assert tuple(c.array_records["arrays"]["scores"].shape) == (len(queries), 5)
        assert set(c.config_records) == {"site"} and set(c.metric_records) == {"metrics"}
        assert dict(c.config_records["site"])["name"] in {st.name for st in sites}
        raw = c.array_records["arrays"]["scores"].data + c.array_records["arrays"]["labels"].data
        assert not any(t in raw for t in site_texts)
    assert {t["direction"] for t in traffic} == {"down", "up"}
    up = [t for t in traffic if t["direction"] == "up"]
    assert all(t["payload_bytes"] == len(queries) * 5 * (4 + 8) for t in up)

    monkeypatch.setattr(query, "QUERY_BATCH", 5)  # several batches of embeddings
    summary = run_federated(cfg)
    cen = run_centralized(_cfg(tiny_models, table, tmp_path, "knn", "name=ck", "method.k=5"))
    assert summary["confusion"] == cen["confusion"]
    assert (tmp_path / "fk" / "report.md").is_file() and summary["trainable_parameters"] == 0


def test_compare_ranks_frozen_and_trained_methods(
    tiny_models: dict[str, str], table: Path, tmp_path: Path,
    check_paired_findings: Callable[[Path, str], None],
) -> None:
    cfg = _cfg(tiny_models, table, tmp_path, "lora", "name=all", "federated.rounds=1",
               "train.batch_size=8")  # fmt: skip
    out = run_regimes(cfg, ["features", "knn", "head"], ("centralized", "federated"))
    rows = json.loads((out / "comparison.json").read_text())
    assert [(r["method"], r["regime"]) for r in rows] == [
        (m, reg) for m in ("features", "knn", "head") for reg in ("centralized", "federated")
    ]
    report = (out / "report.md").read_text()
    assert "Ranking" in report and (out / "ranking.png").stat().st_size > 10_000
    assert "by query" in report
    check_paired_findings(out, "accuracy")  # knn's federated form too


# --- retrieval-augmented answers -----------------------------------------------------------


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "acme.txt").write_text("Acme revenue grew 12 percent in 2024 to EUR 30 million. " * 3)
    (d / "sub" / "rain.md").write_text("It rains often in Bergen on the west coast of Norway.")
    return d


def test_index_and_ask(
    tiny_models: dict[str, str],
    chat_llama: str,
    docs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rep = build_index(docs, tmp_path / "idx", "minilm", words=10, overlap=2)
    assert rep.documents == 2 and rep.passages >= 3
    hits = retrieve(tmp_path / "idx", "Acme revenue grew", k=2)
    assert len(hits) == 2 and hits[0].source.startswith("acme.txt")
    with pytest.raises(IndexStoreError, match="not comparable"):
        retrieve(tmp_path / "idx", "Acme", k=2, embedder=tiny_models["llama"])
    with pytest.raises(IndexStoreError, match="fedtune index"):
        retrieve(tmp_path / "missing", "Acme")
    with pytest.raises(IndexStoreError, match="--overwrite"):  # nothing replaced without it
        build_index(docs, tmp_path / "idx", tiny_models["bert"])
    with pytest.raises(IndexStoreError, match="not a fedtune index"):
        build_index(docs, docs, "minilm", overwrite=True)  # never deletes a non-index folder

    def disk_full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("No space left on device")

    monkeypatch.setattr("fedtune.vectorstore.VectorStore.add", disk_full)
    with pytest.raises(OSError):
        build_index(docs, tmp_path / "idx", "minilm", words=5, overlap=1, overwrite=True)
    monkeypatch.undo()
    assert retrieve(tmp_path / "idx", "Acme revenue grew", k=2) == hits  # old index intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")) == []
    rep = build_index(docs, tmp_path / "idx", "minilm", words=5, overlap=1, overwrite=True)
    assert rep.passages > 3 and len(retrieve(tmp_path / "idx", "rain", k=50)) == rep.passages

    # The tiny test tokenizer spends many tokens on words it never saw: a short
    # instruction keeps the prompt inside its 128 positions.
    monkeypatch.setattr("fedtune.rag.INSTRUCTION", "Answer from the passages.")
    ans = answer_local(tiny_models["gpt2"], "How much did revenue grow?", hits[:1], 4)
    assert isinstance(ans.text, str) and "[1]" in ans.prompt and ans.sources == hits[:1]
    assert not ans.notes
    # Two passages do not fit the tiny model's 128 positions: the last one is dropped.
    short = answer_local(tiny_models["gpt2"], "How much did revenue grow?", hits, 4)
    assert short.sources == hits[:1] and "1 of 2 passages dropped" in short.notes[0]
    with pytest.raises(ConfigError, match="not a causal LM"):
        answer_local(tiny_models["bert"], "q", hits)
    # An instruction-tuned model (a chat template) answers as the assistant.
    # (Rotary positions: the tiny Llama runs past its nominal 128 positions.)
    chat = answer_local(chat_llama, "How much did revenue grow?", hits[:1], 4, max_context=256)
    tok = AutoTokenizer.from_pretrained(chat_llama)
    assert chat.sources == hits[:1] and not chat.notes
    assert chat.prompt == tok.apply_chat_template(
        grounded_messages("How much did revenue grow?", hits[:1]),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat.prompt.startswith("<|im_start|>system\nAnswer from the passages.<|im_end|>")
    assert chat.prompt.endswith("Question: How much did revenue grow?\nAnswer:<|im_end|>\n"
                                "<|im_start|>assistant\n")  # fmt: skip

    with OpenAIStub(lambda body: "12 percent [1]") as stub:
        ans = answer_remote(stub.url, "m", "How much did revenue grow?", hits, retries=0)
        sent = stub.chat_requests[0].body["messages"]
    assert ans.text == "12 percent [1]"
    assert hits[0].text in sent[1]["content"] and sent[0]["role"] == "system"


def test_merge_counted_notes() -> None:
    from fedtune.federated.query import merge_counted

    said = ["org-0: icl: 3 of 4 prompts dropped demonstrations", "org-0: icl: chose 'a'",
            "org-1: icl: 1 of 4 prompts dropped demonstrations", "org-0: icl: chose 'a'",
            "org-0: icl: 2 of 3 prompts dropped demonstrations",
            "org-0: icl: 1 of 3 query texts were truncated"]  # fmt: skip
    # Numbers inside decimals or thousands are not counts.
    other = ["org-0: lr 0.5 of 10 steps", "org-0: 1,024 of 2,048 rows", "org-0: lr 0.5 of 10 steps"]
    assert merge_counted(other) == other[:2]
    assert merge_counted(said) == [
        "org-0: icl: 5 of 7 prompts dropped demonstrations", "org-0: icl: chose 'a'",
        "org-1: icl: 1 of 4 prompts dropped demonstrations",
        "org-0: icl: 1 of 3 query texts were truncated"]  # fmt: skip
    # Numbers inside decimals or thousands are not counts.
    other = ["org-0: lr 0.5 of 10 steps", "org-0: 1,024 of 2,048 rows", "org-0: lr 0.5 of 10 steps"]
    assert merge_counted(other) == other[:2]


def test_icl_federates_by_query_demonstrations_stay_at_their_site(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Federated ICL: each site prompts with demonstrations from its own examples and
    returns label probabilities; the server averages them. Zero-shot it is the
    centralized run (no site data is used)."""
    import fedtune.federated.query as query
    from fedtune.methods.frozen import log_normalize
    from fedtune.methods.icl import ICL

    monkeypatch.setattr(query, "QUERY_BATCH", 4)  # several batches: slicing is exercised
    lm = f"method.model={tiny_models['gpt2']}"
    cfg = _cfg(tiny_models, table, tmp_path, "icl", "name=icl", lm, "method.shots=2",
               "method.selection=similar", f"method.embedder={tiny_models['bert']}")  # fmt: skip
    out = run_regimes(cfg, ["icl"], ("centralized", "local", "federated"))
    rows = json.loads((out / "comparison.json").read_text())
    assert [(r["regime"], r["site"]) for r in rows] == [
        ("centralized", "all"), ("local", "org-0"), ("local", "org-1"), ("local", "org-2"),
        ("federated", "all")]  # fmt: skip
    fed = rows[-1]
    # The run names the LM that answered (method.model), not model.name (unused here).
    assert fed["model"] == rows[0]["model"] == tiny_models["gpt2"]
    assert fed["strategy"] == "query" and fed["trainable_parameters"] == 0
    report = (out / "icl-federated" / "report.md").read_text()
    assert "demonstrations drawn from its own examples" in report
    # By hand: every site's ICL on its own examples, probabilities averaged.
    ws = apps.workspace(cfg)
    test = ws.splits.test
    probs = []
    for site in ws.partition.sites:
        icl = ICL(cfg.method, cfg.model, LABELS, seed=cfg.seed).fit(site.train)
        probs.append(np.exp(log_normalize(icl.predict_scores([e.text for e in test]))))
    mean = np.mean(probs, 0)
    fed_run = json.loads((out / "icl-federated" / "metrics.jsonl").read_text().splitlines()[-1])
    y = ICL(cfg.method, cfg.model, LABELS).label_ids(test)
    loss = float(-np.log(np.maximum(mean[np.arange(len(y)), y], 1e-6)).mean())
    assert fed_run["loss"] == pytest.approx(loss, rel=1e-4)
    assert fed_run["accuracy"] == pytest.approx(float((mean.argmax(1) == y).mean()))

    # What crossed: down, the query texts and the fedtune version; up, one probability
    # per label per query, the site's name and its number of examples.
    contexts = make_contexts(cfg, 3, [s.name for s in ws.partition.sites], None)
    sent: list[Message] = []
    replies: list[Message] = []

    class Spy(InProcessGrid):
        def push_messages(self, messages):  # type: ignore[no-untyped-def]
            messages = list(messages)
            sent.extend(messages)
            return super().push_messages(messages)

        def pull_messages(self, ids):  # type: ignore[no-untyped-def]
            got = list(super().pull_messages(ids))
            replies.extend(got)
            return got

    icl = ws.model
    assert isinstance(icl, ICL)
    texts = [e.text for e in test]
    federated_answers(Spy(apps.client_app, contexts, _run_id(cfg)), icl,
                      icl.query_payload(test), len(texts), 3, [], {})  # fmt: skip
    batches = -(-len(texts) // 4)
    assert len(sent) == len(replies) == 3 * batches
    down = sorted({t for m in sent for t in m.content.config_records["queries"]["texts"]})
    assert down == sorted(set(texts))
    for m in sent:
        c = m.content
        assert set(c.config_records) == {"queries", "config"} and not c.array_records["arrays"]
        assert set(c.config_records["config"]) == {apps.VERSION_KEY}
    for r in replies:
        c = r.content
        assert set(c.array_records) == {"arrays"} and set(c.array_records["arrays"]) == {"logp"}
        assert c.array_records["arrays"]["logp"].shape[1] == 3
        assert set(c.config_records) == {"site"} and set(c.config_records["site"]) == {"name"}
        assert set(c.metric_records["metrics"]) == {"num-examples"}

    # A site that fails or answers malformed is left out and named; the others decide.
    real = ICL.answer_queries

    def org_1_breaks(self, payload):  # type: ignore[no-untyped-def]
        out = real(self, payload)
        if self._pool and self._pool[0].site == "org-1":
            return {"logp": out["logp"][:-1]}  # one row short
        return out

    monkeypatch.setattr(ICL, "answer_queries", org_1_breaks)
    failures: list[tuple[str, str]] = []
    names: dict[int, str] = {}
    two = federated_answers(InProcessGrid(apps.client_app, contexts, _run_id(cfg)), icl,
                            icl.query_payload(test), len(texts), 2, [], names, kind="test",
                            failures=failures)  # fmt: skip
    assert {s for s, _ in failures} == {"org-1"} and "malformed" in failures[0][1]
    np.testing.assert_allclose(np.exp(two), (probs[0] + probs[2]) / 2, rtol=1e-4)
    monkeypatch.setattr(ICL, "answer_queries", real)

    # What a site notes (prompts cut to fit the context) reaches the run's summary.
    tight = run_federated(_cfg(tiny_models, table, tmp_path, "icl", "name=tight", lm,
                               "method.shots=2", "method.max_context=56"))  # fmt: skip
    # Its batches' counts are added up: one note per site and pass (validation, test),
    # out of all of that pass's queries.
    passes = sorted([len(ws.splits.validation), len(test)])
    for org in ("org-0", "org-1", "org-2"):
        dropped = [n for n in tight["notes"] if n.startswith(f"{org}: icl: ")
                   and "dropped demonstrations to fit 56 tokens" in n]  # fmt: skip
        assert sorted(int(n.split(" of ")[1].split()[0]) for n in dropped) == passes, dropped

    # The remote backend would send a site's demonstrations to the run config's endpoint.
    with pytest.raises(ConfigError, match=r"backend.*remote.*demonstrations"):
        run_federated(_cfg(tiny_models, table, tmp_path, "icl", "name=r", lm,
                           "method.backend=remote", "method.base_url=http://127.0.0.1:9/v1",
                           "method.api_model=m"))  # fmt: skip
    assert not (tmp_path / "r").exists()

    # Zero-shot, the sites' answers are the same prompt's: federated = centralized.
    zero = _cfg(tiny_models, table, tmp_path, "icl", "name=zero", lm, "method.shots=0")
    z = json.loads((run_regimes(zero, ["icl"], ("centralized", "federated"))
                    / "comparison.json").read_text())  # fmt: skip
    assert [r["regime"] for r in z] == ["centralized", "federated"]
    assert z[1]["accuracy"] == z[0]["accuracy"]
    assert z[1]["loss"] == pytest.approx(z[0]["loss"], rel=1e-4)


def test_federated_knn_runs_as_a_server_app_reports_failed_sites_and_refuses_resume(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import Context, RecordDict

    cfg = _cfg(tiny_models, table, tmp_path, "knn", "name=direct", "method.k=5")
    direct = run_federated(cfg)
    assert (tmp_path / "direct" / "sites" / "org-0" / "index" / "index.json").is_file()
    # The same run through the ServerApp's entry point (as `flwr run` calls it).
    ws = apps.workspace(cfg)
    names = [s.name for s in ws.partition.sites]
    contexts = make_contexts(cfg, len(names), names, None)
    grid = InProcessGrid(apps.client_app, contexts, _run_id(cfg))
    run_config = {apps.CONFIG_KEY: json.dumps(cfg.to_dict()),
                  "output-dir": str(tmp_path / "served")}  # fmt: skip
    apps.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                   run_config=run_config))  # fmt: skip
    served = json.loads((tmp_path / "served" / "metrics.jsonl").read_text().splitlines()[-1])
    assert served["confusion"] == direct["confusion"] and served["sites"] == names

    real = Knn.neighbours

    def org_1_fails(self, queries, k):  # type: ignore[no-untyped-def]
        if self.store is not None and self.store.sites() == ["org-1"]:
            raise OSError("index unreadable")
        return real(self, queries, k)

    monkeypatch.setattr(Knn, "neighbours", org_1_fails)
    partial = run_federated(_cfg(tiny_models, table, tmp_path, "knn", "name=partial"))
    assert partial["failed_sites"] == ["org-1"]
    assert any("org-1 failed on test queries 0-" in n for n in partial["notes"])
    assert "Sites that failed" in (tmp_path / "partial" / "report.md").read_text()
    with pytest.raises(ConfigError, match="no rounds"):
        run_federated(cfg, resume=tmp_path / "direct")
