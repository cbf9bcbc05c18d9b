"""Base-model loading: the bundled MiniLM alias, kind detection, tiny models,
clear errors for a bad name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.errors import ModelError
from fedtune.models import (
    build_tiny_model,
    detect_kind,
    load_base_model,
    load_config,
    load_tokenizer,
    resolve_model_name,
    set_pooling,
)


def test_minilm_alias_resolves_to_bundled_weights() -> None:
    path = Path(resolve_model_name("minilm"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert detect_kind(load_config("minilm")) == "encoder"


def test_minilm_hub_id_resolves_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_name("sentence-transformers/all-MiniLM-L6-v2") == resolve_model_name(
        "minilm"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_name("gpt2") == "gpt2"


def test_tiny_models_kinds_and_tokenizers(tiny_models: dict[str, str]) -> None:
    assert detect_kind(load_config(tiny_models["bert"])) == "encoder"
    for fam in ("gpt2", "llama", "qwen2"):
        assert detect_kind(load_config(tiny_models[fam])) == "decoder"
        tok = load_tokenizer(tiny_models[fam], "decoder")
        assert tok.pad_token is not None and tok.padding_side == "right"
        model = load_base_model(tiny_models[fam], "decoder", ("a", "b"))
        assert model.config.pad_token_id is not None


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_tiny_models_are_the_same_every_build(tmp_path: Path, family: str) -> None:
    """Every test on a tiny model assumes the same model each run. The WordPiece
    trainer used to give a different vocabulary (288 or 289 entries) from one
    build to the next, so a threshold that held here could fail on CI."""
    a, b = (build_tiny_model(tmp_path / name, family) for name in ("a", "b"))  # type: ignore[arg-type]
    for name in ("tokenizer.json", "model.safetensors"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
    tok = load_tokenizer(a, "encoder" if family == "bert" else "decoder")
    # Words outside the built-in corpus split into known pieces, not [UNK].
    assert tok.unk_token_id not in tok("zebra-like quokka!")["input_ids"]


def test_encoder_gets_label_map(tiny_models: dict[str, str]) -> None:
    model = load_base_model(tiny_models["bert"], "encoder", ("neg", "pos"))
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.num_labels == 2


def test_unknown_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model"):
        load_config(str(tmp_path / "nowhere"))


# --- pooling of the classification head --------------------------------------


def _masked_mean_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `mean` pooling must compute, written out: classifier(mean of real tokens)."""
    hidden = model.base_model(**batch).last_hidden_state  # [B, T, H]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
    return model.classifier((hidden * mask).sum(1) / mask.sum(1))


def test_mean_pooling_feeds_the_head_the_mean_of_real_tokens(tiny_models: dict[str, str]) -> None:
    model = load_base_model(tiny_models["bert"], "encoder", ("a", "b", "c")).eval()
    tok = load_tokenizer(tiny_models["bert"], "encoder")
    texts = ["the profit rose", "the company said its net sales fell by percent in quarter"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        cls_logits = model(**batch).logits
        set_pooling(model, "mean", "encoder")
        set_pooling(model, "mean", "encoder")  # idempotent: one hook
        mean_logits = model(**batch).logits
        expected = _masked_mean_logits(model, batch)
        alone = model(**dict(tok(texts[:1], return_tensors="pt"))).logits
    assert len(model.base_model._forward_hooks) == 1
    torch.testing.assert_close(mean_logits, expected)
    torch.testing.assert_close(mean_logits[:1], alone, rtol=0, atol=1e-5)  # padding ignored
    assert not torch.allclose(mean_logits, cls_logits)


def test_cls_pooling_leaves_the_model_alone(tiny_models: dict[str, str]) -> None:
    model = load_base_model(tiny_models["bert"], "encoder", ("a", "b"))
    assert set_pooling(model, "cls", "encoder") is model
    assert not model.base_model._forward_hooks


def test_mean_pooling_refuses_decoders_and_heads_without_pooler(
    tiny_models: dict[str, str],
) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    gpt2 = load_base_model(tiny_models["gpt2"], "decoder", ("a", "b"))
    with pytest.raises(ModelError, match="applies to encoders"):
        set_pooling(gpt2, "mean", "decoder")
    cfg = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    distil = DistilBertForSequenceClassification(cfg)  # classifies from the first token
    with pytest.raises(ModelError, match="pooler output"):
        set_pooling(distil, "mean", "encoder")
