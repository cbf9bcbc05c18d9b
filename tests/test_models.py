"""Base-model loading: the bundled MiniLM alias, kind detection, tiny models,
clear errors for a bad name."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.errors import ModelError
from fedtune.models import (
    detect_kind,
    load_base_model,
    load_config,
    load_tokenizer,
    resolve_model_name,
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


def test_encoder_gets_label_map(tiny_models: dict[str, str]) -> None:
    model = load_base_model(tiny_models["bert"], "encoder", ("neg", "pos"))
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.num_labels == 2


def test_unknown_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model"):
        load_config(str(tmp_path / "nowhere"))
