"""Every method x {tiny encoder, tiny GPT-2, tiny Llama} passes the Method contract:
trainable tensors change after training steps and frozen ones do not; the
trainable state holds exactly the trainable tensors; save -> load reproduces
predictions; the trainable state round-trips through load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, LABELS, TEXTS, Y

from fedtune.adapted import AdaptedModel
from fedtune.config import ModelConfig, method_config
from fedtune.errors import ModelError
from fedtune.methods import trainable_methods

METHODS = ("head", "full", "lora", "ptuning", "prompt", "prefix", "ia3")
PREFERENCE_METHODS = ("reward", "dpo", "rloo", "grpo")
"""Trained on preference pairs only: their conformance tests are in test_preference.py."""


def _build(path: str, method: str, seed: int = 0) -> AdaptedModel:
    return AdaptedModel.build(ModelConfig(name=path), method_config(method), LABELS, seed=seed)


def _steps(model: AdaptedModel, n: int = 3, lr: float = 1e-2) -> None:
    """n AdamW steps on the toy batch (LoRA's A gets gradient only once B != 0)."""
    params = [p for p in model.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = model.formulation.collate(model.formulation.encode(TEXTS, Y))
    model.module.train()
    for _ in range(n):
        model.formulation.loss(model.module, batch).backward()
        opt.step()
        opt.zero_grad()
    model.module.eval()


def test_registry_lists_every_method() -> None:
    assert set(trainable_methods()) == set(METHODS) | set(PREFERENCE_METHODS)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("method", METHODS)
def test_trainable_change_frozen_do_not(
    tiny_models: dict[str, str], family: str, method: str
) -> None:
    model = _build(tiny_models[family], method)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert trainable, "a trainable method must train something"
    _steps(model)
    for name, p in model.module.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("method", METHODS)
def test_trainable_state_is_exactly_the_trainable_tensors(
    tiny_models: dict[str, str], family: str, method: str
) -> None:
    model = _build(tiny_models[family], method)
    state = model.trainable_state()
    params = dict(model.module.named_parameters())
    assert set(state) == {n for n, p in params.items() if p.requires_grad}
    assert sum(t.numel() for t in state.values()) == model.trainable_parameters()
    for name, tensor in state.items():
        assert tensor.shape == params[name].shape
        assert tensor.data_ptr() != params[name].data_ptr(), "state must be a copy"
    if method != "full":
        assert model.trainable_parameters() < model.base_parameters


@pytest.mark.parametrize("method", METHODS)
def test_save_load_reproduces_predictions(
    tiny_models: dict[str, str], family: str, method: str, tmp_path: Path
) -> None:
    model = _build(tiny_models[family], method)
    _steps(model)
    scores = model.predict_scores(TEXTS)
    model.save(tmp_path / "model")
    loaded = AdaptedModel.load(tmp_path / "model")
    assert loaded.labels == LABELS and loaded.kind == model.kind
    np.testing.assert_array_equal(loaded.predict(TEXTS), model.predict(TEXTS))
    np.testing.assert_allclose(loaded.predict_scores(TEXTS), scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_trainable_state_round_trips(tiny_models: dict[str, str], family: str, method: str) -> None:
    trained = _build(tiny_models[family], method, seed=0)
    _steps(trained)
    state = trained.trainable_state()
    fresh = _build(tiny_models[family], method, seed=1)  # other random init
    assert any(not torch.equal(fresh.trainable_state()[n], t) for n, t in state.items())
    fresh.load_trainable_state(state)
    for name, tensor in fresh.trainable_state().items():
        assert torch.equal(tensor, state[name])
    np.testing.assert_array_equal(fresh.predict_scores(TEXTS), trained.predict_scores(TEXTS))


def test_loading_a_foreign_state_is_refused(tiny_models: dict[str, str]) -> None:
    lora = _build(tiny_models["bert"], "lora")
    ia3 = _build(tiny_models["bert"], "ia3")
    with pytest.raises(ModelError, match="does not fit"):
        lora.load_trainable_state(ia3.trainable_state())
    state = lora.trainable_state()
    name = next(iter(state))
    state[name] = torch.zeros(1)
    with pytest.raises(ModelError, match="shape"):
        lora.load_trainable_state(state)


def test_decoder_head_untied_from_embeddings(tiny_models: dict[str, str]) -> None:
    """GPT-2 ties the LM head to the input embeddings; `head` must train the head
    alone, so it is untied first and the embeddings stay frozen."""
    model = _build(tiny_models["gpt2"], "head")
    base = model.module
    assert base.get_output_embeddings().weight is not base.get_input_embeddings().weight
    assert not base.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_mean_pooling_is_kept_through_save_and_load(
    tiny_models: dict[str, str], method: str, tmp_path: Path
) -> None:
    """`method.pooling = "mean"` changes what the encoder's head reads, not which
    tensors are trained; a saved model loads with the same pooling (fedtune.json),
    for prediction and for further training."""
    cfg = method_config(method, {"pooling": "mean"})
    model = AdaptedModel.build(ModelConfig(name=tiny_models["bert"]), cfg, LABELS, seed=0)
    cls_model = _build(tiny_models["bert"], method)
    assert set(model.trainable_state()) == set(cls_model.trainable_state())
    assert not np.allclose(model.predict_scores(TEXTS), cls_model.predict_scores(TEXTS))
    _steps(model)
    scores = model.predict_scores(TEXTS)
    model.save(tmp_path / "model")
    loaded = AdaptedModel.load(tmp_path / "model")
    assert loaded.method.config.pooling == "mean"
    np.testing.assert_allclose(loaded.predict_scores(TEXTS), scores, rtol=0, atol=1e-5)
    if method in ("head", "full", "lora", "ia3"):  # prompt-learning adapters load frozen
        again = AdaptedModel.load(tmp_path / "model", trainable=True)
        np.testing.assert_allclose(again.predict_scores(TEXTS), scores, rtol=0, atol=1e-5)


def test_prefix_reaches_the_encoder_attention(tiny_models: dict[str, str]) -> None:
    """Changing the prefixes changes the encoder's output: they reach its attention
    (transformers 5.24 renamed the argument that carries them; fedtune passes them
    under the new name), they are not silently dropped."""
    model = _build(tiny_models["bert"], "prefix")
    before = model.predict_scores(TEXTS)
    tables = [
        p for n, p in model.module.named_parameters() if p.requires_grad and "prompt_encoder" in n
    ]
    assert tables, "no prefix table found"
    with torch.no_grad():
        for p in tables:
            p.add_(torch.randn_like(p))
    after = model.predict_scores(TEXTS)
    assert not np.allclose(after, before, atol=1e-4)
    # A copy runs its own prefixes (the prefix-passing forward is bound to the model,
    # not to the original it was copied from).
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in twin.module.named_parameters():
            if p.requires_grad and "prompt_encoder" in n:
                p.add_(torch.randn_like(p))
    assert not np.allclose(twin.predict_scores(TEXTS), after, atol=1e-4)
    np.testing.assert_allclose(model.predict_scores(TEXTS), after)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_ptuning_encoder_stays_fp32_under_bf16_autocast(tiny_models: dict[str, str],
                                                        family: str) -> None:  # fmt: skip
    """The virtual-token embeddings are computed in fp32 under bf16 autocast (rounding
    them to bf16 cost the demo's federated P-tuning a point), through PEFT's own call
    path too, and copies (federated sites) keep the behaviour."""
    import copy

    from peft.tuners.p_tuning import PromptEncoder

    model = _build(tiny_models[family], "ptuning")
    [encoder] = [m for m in model.module.modules() if isinstance(m, PromptEncoder)]
    plain = PromptEncoder(model.module.active_peft_config)  # PEFT's, as it builds it
    plain.load_state_dict(encoder.state_dict())
    idx = torch.arange(encoder.total_virtual_tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(idx).dtype == torch.bfloat16  # what PEFT's own encoder gives
        assert encoder(idx).dtype == torch.float32
        assert copy.deepcopy(encoder)(idx).dtype == torch.float32
        assert model.module.get_prompt(2).dtype == torch.float32  # PEFT's own call path
        batch = model.formulation.collate(model.formulation.encode(TEXTS, Y))
        assert model.formulation.loss(model.module, batch).isfinite()
    torch.testing.assert_close(encoder(idx), plain(idx))  # outside autocast: identical
    assert set(encoder.state_dict()) == set(plain.state_dict())


def test_prefix_on_an_encoder_without_a_cache_is_refused() -> None:
    """MPNet's attention takes no key/value cache: one clear error naming the methods
    that work, not PEFT's ValueError from the first forward pass."""
    from fedtune.methods import build_method

    mpnet = _tiny_mpnet()
    with pytest.raises(ModelError, match=r"MPNetForSequenceClassification has none.*ptuning"):
        build_method(method_config("prefix")).apply(mpnet, "encoder")


def _tiny_mpnet() -> object:
    from transformers import MPNetConfig, MPNetForSequenceClassification

    cfg = MPNetConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return MPNetForSequenceClassification(cfg)


@pytest.mark.parametrize(("method", "overrides"), [("ia3", {}), ("lora", {"target_modules": []})])
def test_default_targets_for_a_model_type_peft_has_none_for(method: str, overrides: dict) -> None:
    """PEFT has no IA3/LoRA defaults for MPNet (a catalog model); fedtune's follow
    PEFT's BERT pattern, and a type nobody has defaults for is refused with the
    model's own linear layer names."""
    from fedtune.methods import build_method

    module = build_method(method_config(method, overrides)).apply(_tiny_mpnet(), "encoder")
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any(".attn.v." in n and method in n for n in trainable), trainable
    unknown = _tiny_mpnet()
    unknown.config.model_type = "no-such-type"  # type: ignore[attr-defined]
    with pytest.raises(ModelError, match=r"no default target modules.*attn\.k.*output\.dense"):
        build_method(method_config(method, overrides)).apply(unknown, "encoder")


def test_ia3_with_only_target_modules_on_mpnet_is_not_a_peft_traceback() -> None:
    """Naming target modules without feed-forward ones, on a type PEFT has no table
    for: fedtune picks the feed-forward subset; a name that matches nothing is one
    ModelError, not PEFT's ValueError."""
    from fedtune.methods import build_method

    cfg = method_config("ia3", {"target_modules": ["attn.k", "attn.v", "output.dense"]})
    module = build_method(cfg).apply(_tiny_mpnet(), "encoder")
    assert any("output.dense.ia3_l" in n for n, _ in module.named_parameters())
    bad = method_config("ia3", {"target_modules": ["no_such_layer"]})
    with pytest.raises(ModelError, match="PEFT refused the config"):
        build_method(bad).apply(_tiny_mpnet(), "encoder")
