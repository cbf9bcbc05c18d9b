"""The generative classifier (decoders): label scoring by likelihood, fast path
equals the general path, truncation keeps the template, bad label words refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LABELS, TEXTS, Y
from torch import Tensor

from fedtune.adapted import AdaptedModel
from fedtune.classify import GenerativeClassifier, HeadClassifier
from fedtune.config import ModelConfig, method_config
from fedtune.errors import ConfigError


def _decoder(path: str, **model_kw: object) -> AdaptedModel:
    return AdaptedModel.build(ModelConfig(name=path, **model_kw), method_config("lora"), LABELS)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_single_token_fast_path_equals_full_scoring(
    tiny_models: dict[str, str], family: str
) -> None:
    model = _decoder(tiny_models[family])
    form = model.formulation
    assert isinstance(form, GenerativeClassifier) and form.single_token
    fast = model.predict_scores(TEXTS)
    form.single_token = False  # force one forward pass per label
    slow = model.predict_scores(TEXTS)
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_scores_are_label_log_likelihoods(tiny_models: dict[str, str]) -> None:
    """The score of label k is log p(label word | prompt) under the causal LM."""
    model = _decoder(tiny_models["gpt2"])
    form = model.formulation
    assert isinstance(form, GenerativeClassifier)
    scores = model.predict_scores(TEXTS[:1])[0]
    prompt = form._prompt_ids(TEXTS[:1])[0]
    model.module.eval()
    with torch.no_grad():
        logits = model.module(input_ids=torch.tensor([prompt])).logits[0, -1]
    logp = logits.log_softmax(-1)
    expected = [logp[ids[0]].item() for ids in form.label_ids]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert set(model.predict(TEXTS)) <= set(LABELS)


def test_multi_token_label_words(tiny_models: dict[str, str]) -> None:
    words = ("very bad news", "nothing new", "good profit growth")
    model = _decoder(tiny_models["llama"], label_words=words)
    form = model.formulation
    assert isinstance(form, GenerativeClassifier) and not form.single_token
    batch = form.collate(form.encode(TEXTS, Y))
    (loss_sum, units), scores = form.evaluate(model.module, batch)
    # Eval loss per label token equals the training loss on the same batch.
    model.module.eval()
    with torch.no_grad():
        train_loss = form.loss(model.module, batch)
    assert units == sum(len(form.label_ids[y]) for y in Y)
    assert torch.allclose(loss_sum / units, train_loss, atol=1e-5)
    assert scores.shape == (len(TEXTS), 3)


def test_long_text_truncated_but_template_kept(tiny_models: dict[str, str]) -> None:
    model = _decoder(tiny_models["gpt2"], max_length=8)
    form = model.formulation
    assert isinstance(form, GenerativeClassifier)
    long = " ".join(["profit"] * 200)
    (ids,) = form._prompt_ids([long])
    assert model.tokenizer.decode(ids).endswith("\nSentiment:")
    assert len(ids) < 8 + len(model.tokenizer("Sentence: \nSentiment:")["input_ids"]) + 2


def test_bad_templates_and_label_words(tiny_models: dict[str, str]) -> None:
    tok = _decoder(tiny_models["gpt2"]).tokenizer
    with pytest.raises(ConfigError, match="template"):
        GenerativeClassifier(tok, LABELS, 16, "no placeholder")
    with pytest.raises(ConfigError, match="one word per label"):
        GenerativeClassifier(tok, LABELS, 16, "{text}", ("a", "b"))
    with pytest.raises(ConfigError, match="distinct"):
        GenerativeClassifier(tok, LABELS, 16, "{text}", ("same", "same", "other"))


def test_encoder_head_truncates_and_pads(tiny_models: dict[str, str]) -> None:
    model = AdaptedModel.build(
        ModelConfig(name=tiny_models["bert"], max_length=5), method_config("head"), LABELS
    )
    form = model.formulation
    assert isinstance(form, HeadClassifier)
    feats = form.encode(TEXTS, Y)
    assert max(f["length"] for f in feats) == 5
    batch = form.collate(feats)
    assert batch["input_ids"].shape == (len(TEXTS), 5)
    assert batch["labels"].tolist() == Y


@pytest.mark.parametrize("method", ["lora", "prompt", "ptuning", "prefix"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scores_with_virtual_tokens_and_padding(
    tiny_models: dict[str, str], family: str, method: str
) -> None:
    """Prompt-learning methods prepend virtual tokens to the logits and batches are
    right-padded: a text scored alone, in a padded batch, and by hand (the real
    positions are the last T of the logits) must agree."""
    model = AdaptedModel.build(ModelConfig(name=tiny_models[family]), method_config(method), LABELS)
    model.module.eval()
    form = model.formulation
    assert isinstance(form, GenerativeClassifier)
    batch_scores = model.predict_scores(TEXTS)  # lengths differ: padding in every batch
    for i, text in enumerate(TEXTS[:3]):
        alone = model.predict_scores([text])[0]
        np.testing.assert_allclose(batch_scores[i], alone, atol=1e-5)
        ids = torch.tensor([form._prompt_ids([text])[0]])
        with torch.no_grad():
            logits = model.module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        logp = logits[0, -ids.shape[1] :][-1].log_softmax(-1)
        np.testing.assert_allclose(alone, [logp[t[0]].item() for t in form.label_ids], atol=1e-5)


def _loss_grads_scores(
    model: AdaptedModel, batch: dict[str, Tensor]
) -> tuple[Tensor, list[Tensor], Tensor]:
    model.module.zero_grad()
    loss = model.formulation.loss(model.module, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.module.parameters() if p.grad is not None]
    with torch.no_grad():
        scores = model.formulation.scores(model.module, batch)
    return loss.detach(), grads, scores


@pytest.mark.parametrize("method", ["lora", "ptuning", "prefix", "ia3", "full"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_lm_head_only_where_labels_are_scored(
    tiny_models: dict[str, str], family: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LM head runs on the last positions only (`logits_to_keep`; the loss: on the
    target positions only, `_plain_head`), and loss, gradients and scores equal those
    from logits at every position."""
    words = ("very bad news", "nothing new", "good profit growth")
    for label_words in ((), words):
        model = AdaptedModel.build(
            ModelConfig(name=tiny_models[family], label_words=label_words),
            method_config(method),
            LABELS,
        )
        model.module.eval()
        form = model.formulation
        assert isinstance(form, GenerativeClassifier)
        batch = form.collate(form.encode(TEXTS, Y))
        rows: list[int] = []
        hook = model.module.get_output_embeddings().register_forward_hook(
            lambda m, i, o, seen=rows: seen.append(o.shape[:-1].numel())
        )
        loss, grads, scores = _loss_grads_scores(model, batch)
        hook.remove()
        # The head saw fewer positions than the batch has (the label words' only).
        assert max(rows) < batch["input_ids"].numel()
        monkeypatch.setattr("fedtune.classify._keeps_logits", lambda m: False)
        ref_loss, ref_grads, ref_scores = _loss_grads_scores(model, batch)
        monkeypatch.undo()
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
        assert len(grads) == len(ref_grads) > 0
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
