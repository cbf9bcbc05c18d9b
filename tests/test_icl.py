"""In-context learning (`icl`): prompt construction, demonstration selection,
local label scoring with tiny decoders, context overflow, prompt variants, the
remote backend against the OpenAI stub, and save -> load_frozen (offline, fast)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import LABELS, TEXTS, Y
from openai_stub import OpenAIStub
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.config import ModelConfig, method_config
from fedtune.data import Example
from fedtune.errors import ConfigError, EndpointError
from fedtune.methods import available_methods, is_frozen
from fedtune.methods.frozen import load_frozen, log_normalize
from fedtune.methods.icl import (
    ICL,
    IclConfig,
    Variant,
    build_messages,
    build_prompt,
    contextual_calibration,
    fit_to_budget,
    select_random,
    stratified_subset,
)

TRAIN = [Example(t, LABELS[y]) for t, y in zip(TEXTS, Y, strict=True)]
GOLD = {e.text: e.label for e in TRAIN}
INSTRUCTION = (
    "Classify the sentiment of the financial news sentence as negative, neutral, positive."
)


def make(model: str = "minilm", seed: int = 0, **cfg: Any) -> ICL:
    return ICL(IclConfig(**cfg), ModelConfig(name=model), LABELS, seed=seed)


def remote(url: str, **cfg: Any) -> ICL:
    opts: dict[str, Any] = {"backend": "remote", "base_url": url, "api_model": "stub-model",
                            "timeout": 2.0, "retries": 0}  # fmt: skip
    opts.update(cfg)
    return make(**opts)


def query_of(body: dict[str, Any]) -> str:
    """The query text of a chat request built with the default templates."""
    user = body["messages"][-1]["content"]
    return str(user.rsplit("Sentence: ", 1)[1].rsplit("\nSentiment:", 1)[0])


def gold_answer(body: dict[str, Any]) -> str:
    return GOLD.get(query_of(body), "neutral").capitalize() + "."


# --- prompts ------------------------------------------------------------------------


def test_build_prompt_exact() -> None:
    v = Variant.from_config(IclConfig())
    demos = [("profit rose", "positive"), ("loss grew", "negative")]
    assert build_prompt(v, demos, "sales fell", LABELS) == (
        f"{INSTRUCTION}\n\n"
        "Sentence: profit rose\nSentiment: positive\n\n"
        "Sentence: loss grew\nSentiment: negative\n\n"
        "Sentence: sales fell\nSentiment:"
    )
    terse = Variant("t", "", "{text} => {label}", "{text} =>", " | ")
    # No instruction, placeholders in a text are left alone (one-pass substitution).
    assert (
        build_prompt(terse, [("a {label} b", "up")], "c", ("down", "up"))
        == "a {label} b => up | c =>"
    )
    assert build_prompt(v, [], "x", ("bad", "good")) == (
        "Classify the sentiment of the financial news sentence as bad, good.\n\n"
        "Sentence: x\nSentiment:"
    )
    assert build_messages(v, demos[:1], "sales fell", LABELS) == [
        {"role": "system",
         "content": f"{INSTRUCTION} Answer with exactly one of: negative, neutral, positive."},
        {"role": "user",
         "content": "Sentence: profit rose\nSentiment: positive\n\n"
                    "Sentence: sales fell\nSentiment:"},
    ]  # fmt: skip
    # As chat turns: each demonstration a question answered by its label word.
    assert build_messages(v, demos, "sales fell", LABELS, turns=True)[1:] == [
        {"role": "user", "content": "Sentence: profit rose\nSentiment:"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "Sentence: loss grew\nSentiment:"},
        {"role": "assistant", "content": "negative"},
        {"role": "user", "content": "Sentence: sales fell\nSentiment:"},
    ]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("demo_template", "Sentence: {text}", r"must contain \{label\}"),
        ("query_template", "Sentiment:", r"must contain \{text\}"),
        ("query_template", "{text} and {text}:", "once"),
        ("instruction", "Classify as {classes}.", r"unknown placeholder.*\{classes\}"),
        ("demo_template", "{text} {label} {foo}", r"unknown placeholder.*\{foo\}"),
    ],
)
def test_bad_templates_are_refused(field: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=f"method.{field}.*{match}"):
        remote("http://127.0.0.1:9/v1", **{field: value})


def test_registered_as_frozen() -> None:
    assert "icl" in available_methods() and is_frozen("icl")
    cfg = method_config("icl", {"shots": 2, "selection": "similar"})
    assert isinstance(cfg, IclConfig) and cfg.shots == 2


# --- demonstration selection ------------------------------------------------------


def test_select_random_balanced_seeded_and_never_excluded() -> None:
    pool = [0] * 5 + [1] * 5 + [2] * 5
    picks = select_random(pool, {0, 5}, 6, True, np.random.default_rng([3, 1]))
    assert picks == select_random(pool, {0, 5}, 6, True, np.random.default_rng([3, 1]))
    assert len(set(picks)) == 6 and not {0, 5} & set(picks)
    assert sorted(pool[i] for i in picks) == [0, 0, 1, 1, 2, 2]
    one_each = select_random(pool, set(), 3, True, np.random.default_rng(0))
    assert sorted(pool[i] for i in one_each) == [0, 1, 2]
    # A label that runs out is skipped; never more than the pool.
    assert sorted(select_random([0, 1, 1, 1], {0}, 5, True, np.random.default_rng(0))) == [1, 2, 3]
    free = select_random(pool, {3}, 14, False, np.random.default_rng(0))
    assert sorted(free) == [i for i in range(15) if i != 3]


def test_random_demonstrations_per_query_deterministic() -> None:
    texts = [e.text for e in TRAIN] + ["unseen text"]
    a = remote("http://127.0.0.1:9/v1", shots=3, seed=0)
    a.fit(TRAIN)
    demos = a._demonstrations(texts)
    for text, picked in zip(texts, demos, strict=True):
        assert len(picked) == 3 and len(set(picked)) == 3
        assert text not in {TRAIN[i].text for i in picked}  # never the query itself
        assert len({TRAIN[i].label for i in picked}) == 3  # balanced: one per label
    # The same query gets the same demonstrations wherever it appears.
    assert a._demonstrations(texts[::-1]) == demos[::-1]
    b = remote("http://127.0.0.1:9/v1", shots=3, seed=0).fit(TRAIN)
    assert b._demonstrations(texts) == demos
    c = remote("http://127.0.0.1:9/v1", shots=3, seed=5).fit(TRAIN)
    assert c._demonstrations(texts) != demos


def test_similar_demonstrations_are_the_nearest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    pool = [
        Example("The weather in Helsinki was cold and snowy today", "neutral"),
        Example("Quarterly profit rose sharply thanks to strong sales", "positive"),
        Example("The football team won the championship final", "neutral"),
        Example("Operating profit increased strongly on higher sales", "positive"),
        Example("The recipe calls for two eggs and a cup of flour", "neutral"),
        Example("Net loss widened as revenue collapsed", "negative"),
    ]
    m = remote("http://127.0.0.1:9/v1", shots=2, selection="similar")
    m.fit(pool, tmp_path / "model")
    assert (tmp_path / "model" / "demos" / "index.json").is_file()
    queries = [
        "Quarterly profit rose sharply thanks to strong sales",
        "Revenue collapsed and losses widened",
    ]
    demos = m._demonstrations(queries)
    # The query itself (pool row 1) is skipped; its nearest other rows are the demos.
    assert 1 not in demos[0] and demos[0][0] == 3
    assert demos[1][0] == 5
    # Exactly the nearest by cosine similarity, nearest first.
    emb = m._get_embedder()
    sims = emb.embed(queries) @ emb.embed([e.text for e in pool]).T
    sims[0, 1] = -np.inf
    assert demos == [list(np.argsort(-s, kind="stable")[:2]) for s in sims]


# --- local scoring ------------------------------------------------------------------


def _hand_scores(path: str, prompt: str, words: tuple[str, ...], tail: str) -> np.ndarray:
    """log p(word | prompt) by hand, summing the word's tokens."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(prompt)["input_ids"]
    out = []
    for word in words:
        ctx = tok(tail, add_special_tokens=False)["input_ids"]
        full = tok(tail + " " + word, add_special_tokens=False)["input_ids"]
        assert full[: len(ctx)] == ctx
        target = full[len(ctx) :]
        with torch.no_grad():
            logits = model(torch.tensor([ids + target])).logits[0]
        logp = logits.log_softmax(-1)
        out.append(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(target)))
    return np.array(out)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_local_scores_are_label_likelihoods(tiny_models: dict[str, str], family: str) -> None:
    path = tiny_models[family]
    m = make(path, shots=2, seed=3).fit(TRAIN)
    texts = [*TEXTS[:3], "a new contract for the bank"]
    scores = m.predict_scores(texts)
    assert scores.shape == (4, 3) and np.isfinite(scores).all()
    assert set(m.predict(texts)) <= set(LABELS)
    assert m.notes == []  # everything fits the 128 positions
    q = texts[-1]
    prompt = build_prompt(m.variant, m._pairs(m._demonstrations([q])[0]), q, LABELS)
    assert prompt.count("Sentiment:") == 3
    np.testing.assert_allclose(scores[-1], _hand_scores(path, prompt, LABELS, "\nSentiment:"),
                               atol=1e-4)  # fmt: skip
    assert m.trainable_state() == {} and m.trainable_parameters() == 0
    assert m.base_parameters == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters()
    )
    metrics = m.evaluate(TRAIN)
    assert 0.0 <= metrics.accuracy <= 1.0
    # Counted without loading the weights (what a federation's server needs).
    fresh = make(path, shots=0)
    assert fresh.base_parameters == m.base_parameters and fresh._lm is None


def test_bf16_autocasts_the_scoring(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """train.bf16 (build_frozen passes it) autocasts ICL's forward passes: 2.5x the
    prompts per second on an AVX512-BF16 CPU (docs/benchmarks.md), scores within
    bf16's rounding of fp32's."""
    path = tiny_models["llama"]
    fp32 = make(path, shots=0).predict_scores(TEXTS)
    m = ICL(IclConfig(shots=0), ModelConfig(name=path), LABELS, bf16=True)
    m._load_lm()
    seen: list[bool] = []
    hook = m._lm.register_forward_pre_hook(
        lambda mod, args: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        bf16 = m.predict_scores(TEXTS)
    finally:
        hook.remove()
    assert seen and all(seen)
    assert not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(log_normalize(bf16), log_normalize(fp32), atol=0.05)
    m.save(tmp_path / "m")  # fedtune predict scores as the run did
    again = load_frozen(tmp_path / "m")
    assert again.bf16 and not load_frozen(make(path, shots=0).save(tmp_path / "f")).bf16
    np.testing.assert_allclose(again.predict_scores(TEXTS), bf16, atol=1e-6)


def test_zero_shot(tiny_models: dict[str, str]) -> None:
    path = tiny_models["gpt2"]
    m = make(path, shots=0)
    scores = m.predict_scores(TEXTS[:2])  # zero-shot needs no fit
    m.fit([])
    np.testing.assert_allclose(m.predict_scores(TEXTS[:2]), scores)
    prompt = f"{INSTRUCTION}\n\nSentence: {TEXTS[0]}\nSentiment:"
    np.testing.assert_allclose(scores[0], _hand_scores(path, prompt, LABELS, "\nSentiment:"),
                               atol=1e-4)  # fmt: skip


def test_contextual_calibration_math() -> None:
    """Zhao et al.: divide by the content-free label distribution, renormalise."""
    scores = np.log(np.array([[0.2, 0.3, 0.1], [0.05, 0.05, 0.4]]))
    prior = np.log(np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2]]))
    out = contextual_calibration(scores, prior, [[0, 1], [0]])
    p = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    q0 = p[0] / np.array([0.4, 0.4, 0.2])  # mean of the two priors
    q1 = p[1] / np.array([0.6, 0.2, 0.2])
    np.testing.assert_allclose(np.exp(out[0]), q0 / q0.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.exp(out[1]), q1 / q1.sum(), rtol=1e-6)
    # A prompt whose query is content-free itself comes out uniform.
    np.testing.assert_allclose(np.exp(contextual_calibration(prior, prior, [[0], [1]])), 1 / 3)


@pytest.mark.parametrize("shots", [0, 2])
def test_calibrated_scores_divide_by_the_content_free_prior(
    tiny_models: dict[str, str], shots: int
) -> None:
    path = tiny_models["llama"]
    plain = make(path, shots=shots, seed=1).fit(TRAIN)
    calibrated = make(path, shots=shots, seed=1, calibrate=True,
                      content_free=("N/A", "")).fit(TRAIN)  # fmt: skip
    texts = TEXTS[:3]
    got = calibrated.predict_scores(texts)
    raw = plain.predict_scores(texts)
    for i, text in enumerate(texts):
        pairs = plain._pairs(plain._demonstrations([text])[0])
        priors = [
            _hand_scores(path, build_prompt(plain.variant, pairs, c, LABELS), LABELS,
                         "\nSentiment:")
            for c in ("N/A", "")
        ]  # fmt: skip
        p = np.exp(raw[i] - np.logaddexp.reduce(raw[i]))
        prior = np.mean([np.exp(x - np.logaddexp.reduce(x)) for x in priors], axis=0)
        np.testing.assert_allclose(np.exp(got[i]), (p / prior) / (p / prior).sum(), atol=1e-4)
    assert np.allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)
    # prior = "train": then times the training labels' frequencies (add-one smoothed).
    toward = make(path, shots=shots, seed=1, calibrate=True, content_free=("N/A", ""),
                  prior="train").fit(TRAIN)  # fmt: skip
    counts = np.bincount([LABELS.index(e.label) for e in TRAIN], minlength=3) + 1.0
    np.testing.assert_allclose(toward.predict_scores(texts), got + np.log(counts / counts.sum()),
                               atol=1e-5)  # fmt: skip


def test_calibration_refusals(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match='remote_scoring = "logprobs"'):
        remote("http://127.0.0.1:9/v1", calibrate=True)
    with pytest.raises(ConfigError, match="top_logprobs = 21"):
        remote("http://127.0.0.1:9/v1", remote_scoring="logprobs", top_logprobs=21)
    with pytest.raises(ConfigError, match="content_free"):
        make(tiny_models["gpt2"], calibrate=True, content_free=())
    with pytest.raises(ConfigError, match="calibrate = true"):
        make(tiny_models["gpt2"], prior="train")
    with pytest.raises(ConfigError, match="needs training examples to count"):
        make(tiny_models["gpt2"], shots=0, calibrate=True, prior="train").fit([])


def test_chat_template_prompts(tiny_models: dict[str, str], chat_llama: str) -> None:
    """With a chat template the prompt is the rendered chat and the label word is
    the assistant's first words; `chat = "off"` keeps the plain prompt."""
    path = chat_llama
    # The tiny model's 128 positions hold no demonstrations and no instruction.
    m = make(path, shots=0, instruction="")
    assert m.uses_chat
    text = TEXTS[5]
    pairs: list[tuple[str, str]] = []
    tok = AutoTokenizer.from_pretrained(path)
    chat = tok.apply_chat_template(
        build_messages(m.variant, pairs, text, LABELS), tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("Sentiment:<|im_end|>\n<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    tail = "<|im_start|>assistant\n"
    expected = []
    for word in LABELS:  # no space before the answer's first word
        ctx = tok(tail, add_special_tokens=False)["input_ids"]
        target = tok(tail + word, add_special_tokens=False)["input_ids"][len(ctx) :]
        with torch.no_grad():
            logp = model(torch.tensor([ids + target])).logits[0].log_softmax(-1)
        expected.append(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(target)))
    np.testing.assert_allclose(m.predict_scores([text])[0], expected, atol=1e-4)
    assert m.notes == []  # nothing cut to fit
    off = make(path, shots=0, instruction="", chat="off")
    assert not off.uses_chat
    plain = build_prompt(off.variant, pairs, text, LABELS)
    hand = _hand_scores(path, plain, LABELS, "\nSentiment:")
    np.testing.assert_allclose(off.predict_scores([text])[0], hand, atol=1e-4)
    with pytest.raises(ConfigError, match=r"no chat\s+template"):
        _ = make(tiny_models["gpt2"], chat="on").uses_chat
    # Demonstrations as turns: the local prompt is that chat, ending as the inline one.
    turns = make(path, shots=1, instruction="", chat_demos="turns")
    render, tail = turns._renderer(turns.variant)
    demo = [("profit rose", "positive")]
    assert render(demo, text) == tok.apply_chat_template(
        build_messages(turns.variant, demo, text, LABELS, turns=True), tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    assert "<|im_start|>assistant\npositive<|im_end|>" in render(demo, text)
    assert tail == m._renderer(m.variant)[1]


def test_shots_without_training_data_is_refused(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="shots = 0"):
        make(tiny_models["gpt2"], shots=2).fit([])


def test_fit_to_budget_drops_last_demos_then_cuts_query() -> None:
    def render(ks: list[int], q: str) -> str:
        return " ".join(["instr", *(f"d{k}" for k in ks), q]).strip()

    def count(s: str) -> int:
        return len(s.split())

    def cut(s: str, n: int) -> str:
        return " ".join(s.split()[:n])

    assert fit_to_budget(render, count, cut, [0, 1, 2], "q q", 10) == ([0, 1, 2], "q q", False)
    assert fit_to_budget(render, count, cut, [0, 1, 2], "q q", 4) == ([0], "q q", False)
    assert fit_to_budget(render, count, cut, [0, 1], "a b c d", 3) == ([], "a b", True)
    with pytest.raises(ConfigError, match="max_context"):
        fit_to_budget(render, count, cut, [0], "a b", 1)


def test_context_overflow_drops_demonstrations_with_a_note(tiny_models: dict[str, str]) -> None:
    m = make(tiny_models["llama"], shots=4, max_context=60).fit(TRAIN)
    scores = m.predict_scores(TEXTS)
    assert scores.shape == (6, 3) and np.isfinite(scores).all()
    (note,) = m.notes
    assert note.endswith("of 6 prompts dropped demonstrations to fit 60 tokens")
    assert int(note.split()[1]) > 0
    # A query too long even alone is cut, and that is said too.
    long_text = " ".join(["profit rose by percent in the quarter"] * 20)
    m.predict_scores([long_text])
    assert m.notes[-2:] == [
        "icl: 1 of 1 prompts dropped demonstrations to fit 60 tokens",
        "icl: 1 of 1 query texts were truncated to fit 60 tokens",
    ]
    with pytest.raises(ConfigError, match="max_context"):
        make(tiny_models["llama"], shots=0, max_context=8).predict_scores(TEXTS[:1])


def test_encoder_with_local_backend_is_refused(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"causal LM.*method.model.*remote"):
        make(tiny_models["bert"])
    remote("http://127.0.0.1:9/v1", model=tiny_models["bert"])  # remote: any model name


def test_save_load_reproduces_local_predictions(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    m = make(tiny_models["gpt2"], shots=3, seed=7).fit(TRAIN)
    texts = [*TEXTS, "a new contract for the bank"]
    scores = m.predict_scores(texts)
    m.save(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {
        "fedtune.json", "prompt.json", "demonstrations.jsonl"}  # fmt: skip
    loaded = load_frozen(tmp_path / "model")
    assert isinstance(loaded, ICL) and loaded.seed == 7
    np.testing.assert_allclose(loaded.predict_scores(texts), scores, atol=1e-6)
    # Calibrated toward the training prior: the saved pool gives the same prior back.
    toward = make(tiny_models["gpt2"], shots=0, calibrate=True, prior="train").fit(TRAIN[:5])
    scores = toward.predict_scores(texts)
    toward.save(tmp_path / "toward")
    again = load_frozen(tmp_path / "toward")
    assert isinstance(again, ICL) and again.config.prior == "train"
    np.testing.assert_allclose(again.label_prior(), toward.label_prior())
    np.testing.assert_allclose(again.predict_scores(texts), scores, atol=1e-6)


# --- remote backend ---------------------------------------------------------------


def test_remote_parses_answers() -> None:
    with OpenAIStub(responder=gold_answer) as stub:
        m = remote(stub.url, shots=2, max_tokens=5).fit(TRAIN)
        assert m.predict(TEXTS) == [LABELS[y] for y in Y]
        assert m.extra_metrics["unparseable_share"] == 0.0 and m.notes == []
        body = stub.chat_requests[0].body
        assert body["temperature"] == 0.0 and body["max_tokens"] == 5
        assert body["messages"][0]["content"] == (
            f"{INSTRUCTION} Answer with exactly one of: negative, neutral, positive."
        )
        assert sum(x["content"].count("Sentence: ") for x in body["messages"]) == 3
        scores = m.predict_scores(TEXTS[:1])
        assert scores[0].tolist() == [-1e4, -1e4, 0.0]  # the parsed label, one-hot
    assert m.base_parameters == 0


def test_remote_demonstrations_as_chat_turns() -> None:
    with OpenAIStub(responder=gold_answer) as stub:
        m = remote(stub.url, shots=2, max_tokens=5, chat_demos="turns").fit(TRAIN)
        assert m.predict(TEXTS) == [LABELS[y] for y in Y]
        for req in stub.chat_requests:
            msgs = req.body["messages"]
            assert [x["role"] for x in msgs] == ["system", "user", "assistant", "user",
                                                 "assistant", "user"]  # fmt: skip
            demo_texts = [query_of({"messages": [None, x]}) for x in msgs[1:-1:2]]
            assert [x["content"] for x in msgs[2::2]] == [GOLD[t] for t in demo_texts]
            assert msgs[-1]["content"].count("Sentence: ") == 1
        inline = remote(stub.url, shots=2, max_tokens=5, chat_demos="inline").fit(TRAIN)
        assert inline.predict(TEXTS[:1]) == [LABELS[Y[0]]]
        msgs = stub.chat_requests[-1].body["messages"]
        assert [x["role"] for x in msgs] == ["system", "user"]
        assert msgs[1]["content"].count("Sentence: ") == 3


def test_remote_counts_unparseable_answers() -> None:
    def answer(body: dict[str, Any]) -> str:
        return "I cannot tell" if query_of(body) in TEXTS[:2] else gold_answer(body)

    with OpenAIStub(responder=answer) as stub:
        m = remote(stub.url, shots=0)
        scores = m.predict_scores(TEXTS)
        # Unparseable rows are wrong, never "the first label" (argmax of a tie).
        metrics = m.evaluate([Example(t, LABELS[y]) for t, y in zip(TEXTS, Y, strict=True)])
        assert m.extra_metrics["unparseable_share"] == pytest.approx(2 / 6)
        assert m.predict(TEXTS[:2]) == ["", ""]
    np.testing.assert_array_equal(scores[:2], 0.0)  # uniform: no label preferred
    assert metrics.accuracy == pytest.approx(4 / 6)
    assert m.notes[0] == "icl: 2 of 6 remote answers named no label (unparseable; counted as wrong)"


CONTENT_FREE = {"N/A": (0.1, 0.3, 0.6), "": (0.2, 0.3, 0.5)}
"""What logprob_answer gives a content-free query: label probabilities leaning positive."""


def logprob_answer(body: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """Top log-probabilities of a first answer token: the gold label's word leads a
    real query, a content-free query leans toward positive."""
    query = query_of(body)
    if query in CONTENT_FREE:
        lean = zip(LABELS, CONTENT_FREE[query], strict=True)
        return ("logprobs", {w.capitalize(): math.log(p) for w, p in lean})
    gold = GOLD.get(query, "neutral")
    top = {"The": math.log(0.1), "ne": math.log(0.05)}  # no label / two labels
    for label in LABELS:  # the gold word at 0.5, the others 0.15 and positive +0.1
        top[" " + label.capitalize()] = math.log(0.5 if label == gold else 0.15)
    top["pos"] = math.log(0.1)
    return ("logprobs", top)


def test_remote_logprobs_score_label_words() -> None:
    """remote_scoring = "logprobs": one token per request, its top_logprobs scored as
    label words (fedtune.remote.label_logprobs); answers are never parsed."""
    with OpenAIStub(responder=logprob_answer) as stub:
        m = remote(stub.url, shots=2, remote_scoring="logprobs", top_logprobs=7).fit(TRAIN)
        scores = m.predict_scores(TEXTS)
        body = stub.chat_requests[0].body
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 7
    assert len(stub.chat_requests) == len(TEXTS)  # no calibration: one request a text
    for row, y in zip(scores, Y, strict=True):
        want = np.log([0.5 if k == y else 0.15 for k in range(3)])
        want[2] = np.logaddexp(want[2], np.log(0.1))  # "pos" begins positive too
        np.testing.assert_allclose(row, want, rtol=1e-5)
    assert m.extra_metrics["unparseable_share"] == 0.0 and m.notes == []


def test_remote_logprobs_calibrated_like_the_local_backend() -> None:
    """Contextual calibration over the server's label scores: each content-free query
    is sent once (zero-shot) and divides every row's label probabilities, as
    contextual_calibration does locally; prior = "train" then aims at the training
    labels' frequencies."""
    with OpenAIStub(responder=logprob_answer) as stub:
        raw = remote(stub.url, shots=0, remote_scoring="logprobs").predict_scores(TEXTS)
        n = len(stub.chat_requests)
        m = remote(stub.url, shots=0, remote_scoring="logprobs", calibrate=True,
                   content_free=("N/A", "")).fit(TRAIN)  # fmt: skip
        got = m.predict_scores(TEXTS)
        assert len(stub.chat_requests) - n == len(TEXTS) + 2
        prior = np.log([CONTENT_FREE["N/A"], CONTENT_FREE[""]])
        np.testing.assert_allclose(got, contextual_calibration(raw, prior, [[0, 1]] * 6),
                                   atol=1e-6)  # fmt: skip
        toward = remote(stub.url, shots=0, remote_scoring="logprobs", calibrate=True,
                        content_free=("N/A", ""), prior="train").fit(TRAIN)  # fmt: skip
        counts = np.bincount([LABELS.index(e.label) for e in TRAIN], minlength=3) + 1.0
        np.testing.assert_allclose(toward.predict_scores(TEXTS),
                                   got + np.log(counts / counts.sum()), atol=1e-5)  # fmt: skip
    assert [LABELS[k] for k in raw.argmax(-1)] == [LABELS[y] for y in Y]


def test_remote_logprobs_calibration_per_prompt() -> None:
    """With demonstrations each query has its own content-free prompts (its own
    demonstrations, a content-free query): each row is divided by its own prior.
    Here a content-free answer leans toward its first demonstration's label."""
    def answer(body: dict[str, Any]) -> tuple[str, dict[str, float]]:
        if query_of(body) not in CONTENT_FREE:
            return logprob_answer(body)
        first = query_of({"messages": [None, body["messages"][1]]})
        lean = 0.7 if query_of(body) == "N/A" else 0.5
        return ("logprobs", {w.capitalize(): math.log(lean if w == GOLD[first] else 0.2)
                             for w in LABELS})  # fmt: skip

    with OpenAIStub(responder=answer) as stub:
        opts: dict[str, Any] = {"shots": 2, "remote_scoring": "logprobs", "seed": 3}
        raw = remote(stub.url, **opts).fit(TRAIN).predict_scores(TEXTS)
        m = remote(stub.url, calibrate=True, content_free=("N/A", ""), **opts).fit(TRAIN)
        got = m.predict_scores(TEXTS)
    firsts = [m._pairs(m._demonstrations([text])[0])[0][0] for text in TEXTS]
    assert len({GOLD[f] for f in firsts}) > 1  # the rows' priors differ
    for i, first in enumerate(firsts):
        prior = np.log([[lean if w == GOLD[first] else 0.2 for w in LABELS]
                        for lean in (0.7, 0.5)])  # fmt: skip
        np.testing.assert_allclose(got[i], contextual_calibration(raw[i:i + 1], prior, [[0, 1]])[0],
                                   atol=1e-6)  # fmt: skip


def test_remote_logprobs_without_a_label_are_counted() -> None:
    def answer(body: dict[str, Any]) -> str | tuple[str, dict[str, float]]:
        if query_of(body) in TEXTS[:2]:
            return ("logprobs", {"I": -0.3, "The": -1.4})
        return logprob_answer(body)

    with OpenAIStub(responder=answer) as stub:
        m = remote(stub.url, shots=0, remote_scoring="logprobs")
        assert m.predict(TEXTS[:3]) == ["", "", LABELS[Y[2]]]
        # Calibrated, such a row stays undecided (dividing a flat row by the prior
        # would pick the label the content-free prompt likes least).
        c = remote(stub.url, shots=0, remote_scoring="logprobs", calibrate=True).fit(TRAIN)
        assert c.predict(TEXTS[:3]) == ["", "", LABELS[Y[2]]]
        assert c.extra_metrics["unparseable_share"] == pytest.approx(2 / 3)
    assert m.extra_metrics["unparseable_share"] == pytest.approx(2 / 3)
    assert m.notes == ["icl: 2 of 3 remote answers put no label word among their top "
                       "log-probabilities"]  # fmt: skip
    with pytest.raises(ConfigError, match="cannot be told apart"):
        ICL(IclConfig(backend="remote", remote_scoring="logprobs"),
            ModelConfig(name="minilm", label_words=["Good", "good.", "bad"]), LABELS)  # fmt: skip


def test_remote_requests_in_flight_at_once_keep_their_order() -> None:
    """method.concurrency requests at once: every text's answer lands on its own row,
    and a request error stops the rest (not one failed request per text)."""
    import threading

    # The first request goes alone; then no answer until the other five are in the
    # server at once (a barrier, not a clock: a loaded machine only makes it slower).
    # Answers come back in a shuffled order of time; each must land on its own row.
    together = threading.Barrier(len(TEXTS) - 1, timeout=20)
    calls: list[str] = []

    def at_once(body: dict[str, Any]) -> tuple[Any, ...]:
        calls.append(query_of(body))
        if len(calls) > 1:
            together.wait()
        return ("sleep", 0.05 * (hash(query_of(body)) % 5), gold_answer(body))

    with OpenAIStub(responder=at_once) as stub:
        m = remote(stub.url, shots=2, concurrency=6).fit(TRAIN)
        assert m.predict(TEXTS) == [LABELS[y] for y in Y]
    arrivals: list[float] = []

    def slow(body: dict[str, Any]) -> tuple[Any, ...]:
        arrivals.append(time.perf_counter())
        return ("sleep", 0.3, gold_answer(body))

    with OpenAIStub(responder=slow) as stub:
        one = remote(stub.url, shots=2, concurrency=1).fit(TRAIN)
        assert one.predict(TEXTS[:2]) == [LABELS[y] for y in Y[:2]]
        assert max(arrivals) - min(arrivals) >= 0.3  # one at a time (the default)
    assert IclConfig().concurrency == 1
    with OpenAIStub(responder=lambda body: ("status", 400)) as stub:
        m = remote(stub.url, shots=0, concurrency=2)
        with pytest.raises(EndpointError, match="400"):
            m.predict(TEXTS * 5)
        assert len(stub.chat_requests) == 1  # of 30: the first goes alone, and fails
    with pytest.raises(ConfigError, match=r"method\.concurrency = 0 must be >= 1"):
        remote("http://127.0.0.1:9/v1", concurrency=0)


def test_remote_retries_then_fails_clearly() -> None:
    with OpenAIStub(responder=gold_answer) as stub:
        m = remote(stub.url, shots=0, retries=1)
        stub.push(("status", 500))
        assert m.predict(TEXTS[:1]) == ["positive"]
        assert len(stub.chat_requests) == 2
        stub.push(("status", 503), ("status", 503))
        with pytest.raises(EndpointError, match="503"):
            m.predict(TEXTS[:1])


def test_remote_timeout_is_an_endpoint_error_quickly() -> None:
    with OpenAIStub(responder=gold_answer) as stub:
        m = remote(stub.url, shots=0, timeout=0.2, retries=0)
        stub.push(("sleep", 3.0))
        t0 = time.perf_counter()
        with pytest.raises(EndpointError, match="timeout"):
            m.predict(TEXTS[:1])
        assert time.perf_counter() - t0 < 1.5


def test_remote_needs_url_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match=r"method\.base_url"):
        remote("", shots=0).fit([])
    with pytest.raises(ConfigError, match=r"method\.api_model"):
        remote("http://127.0.0.1:9/v1", api_model="", shots=0).fit([])


def test_remote_save_load_same_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`similar` fitted without a directory: save() writes the index; the loaded
    method sends exactly the same requests."""
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    texts = [*TEXTS[:3], "a new contract for the bank"]
    with OpenAIStub(responder=gold_answer) as stub:
        m = remote(stub.url, shots=2, selection="similar").fit(TRAIN)
        scores = m.predict_scores(texts)
        m.save(tmp_path / "model")
        assert (tmp_path / "model" / "demos" / "index.json").is_file()
        loaded = load_frozen(tmp_path / "model")
        np.testing.assert_array_equal(loaded.predict_scores(texts), scores)
        bodies = [json.dumps(r.body, sort_keys=True) for r in stub.chat_requests]
    assert sorted(bodies[:4]) == sorted(bodies[4:])  # requests run 4 at once: any order


# --- prompt variants --------------------------------------------------------------


VARIANTS = """
[[variant]]
name = "plain"
instruction = "Label the sentence as {labels}."

[[variant]]
name = "careful"
instruction = "Think like an analyst; answer {labels}."
query_template = "Sentence: {text}\\nSentiment:"

[[variant]]
name = "other"
instruction = "Sentiment? {labels}"
"""


def test_variants_best_on_validation(tmp_path: Path) -> None:
    path = tmp_path / "variants.toml"
    path.write_text(VARIANTS)

    def answer(body: dict[str, Any]) -> str:
        system = body["messages"][0]["content"]
        return gold_answer(body) if system.startswith("Think like an analyst") else "banana"

    with OpenAIStub(responder=answer) as stub:
        m = remote(stub.url, shots=1, variants=str(path), select_on=4)
        m.fit(TRAIN, validation=TRAIN)
        assert m.variant.name == "careful"
        assert m.notes == [
            "icl: prompt variant 'plain': validation accuracy 0.0000 on 4 examples",
            "icl: prompt variant 'careful': validation accuracy 1.0000 on 4 examples",
            "icl: prompt variant 'other': validation accuracy 0.0000 on 4 examples",
            "icl: chose prompt variant 'careful'",
        ]
        assert len(stub.chat_requests) == 12
        assert "unparseable_share" not in m.extra_metrics  # selection is not a prediction
        assert m.predict(TEXTS) == [LABELS[y] for y in Y]
        m.save(tmp_path / "model")
        assert load_frozen(tmp_path / "model").variant == m.variant
        first = remote(stub.url, shots=1, variants=str(path)).fit(TRAIN)
    assert first.variant.name == "plain" and "kept the first, 'plain'" in first.notes[0]


def test_stratified_subset() -> None:
    data = [Example(f"t{i}", LABELS[i % 3]) for i in range(30)]
    sub = stratified_subset(data, 6, seed=1)
    assert sub == stratified_subset(data, 6, seed=1)
    assert sorted(e.label for e in sub) == sorted(LABELS * 2)
    assert [data.index(e) for e in sub] == sorted(data.index(e) for e in sub)
    assert stratified_subset(data[:4], 6, seed=1) == data[:4]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such file"),
        ("[[variant]\nname = 1", "not valid TOML"),
        ("[prompt]\nname = 'x'", r"\[\[variant\]\]"),
        ("[[variant]]\ninstruction = 'x'", "needs a name"),
        ("[[variant]]\nname = 'a'\ncolour = 'x'", "unknown key.*colour"),
        ("[[variant]]\nname = 'a'\ndemo_template = '{text}'", r"must contain \{label\}"),
        ("[[variant]]\nname = 'a'\n[[variant]]\nname = 'a'", "two variants"),
    ],
)
def test_bad_variants_file(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "variants.toml"
    if content is not None:
        path.write_text(content)
    m = remote("http://127.0.0.1:9/v1", shots=1, variants=str(path))
    with pytest.raises(ConfigError, match=match) as err:
        m.fit(TRAIN, validation=TRAIN)
    assert str(path) in str(err.value)
