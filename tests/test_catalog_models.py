"""Every trainable method on every real catalog model (slow; each skips when its
packages are not installed: `fedtune models install NAME`): load by name, two
training steps, save, load with plain PEFT/transformers, same predictions.

The first run of a session converts the GGUF decoders and unpacks MPNet into
$FEDTUNE_CACHE_DIR (about 2 minutes on 2 cores); point it at a kept folder to reuse
them: FEDTUNE_CACHE_DIR=~/.cache/fedtune scripts/test -m slow tests/test_catalog_models.py"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABELS, TEXTS, Y

from fedtune.adapted import AdaptedModel
from fedtune.catalog import CATALOG
from fedtune.config import ModelConfig, TrainConfig, method_config
from fedtune.errors import ModelError
from fedtune.train import train

pytestmark = pytest.mark.slow

METHODS = ("head", "full", "lora", "ptuning", "prompt", "prefix", "ia3")
ADAPTERS = ("lora", "ptuning", "prompt", "prefix", "ia3")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CATALOG))
def test_method_on_catalog_model(name: str, method: str, tmp_path: Path) -> None:
    entry = CATALOG[name]
    if not entry.installed():
        pytest.skip(f"{name} is not installed: fedtune models install {name}")
    cfg = ModelConfig(name=name, max_length=48)
    if name == "mpnet" and method == "prefix":
        with pytest.raises(ModelError, match="MPNetForSequenceClassification has none"):
            AdaptedModel.build(cfg, method_config(method), LABELS)
        return
    model = AdaptedModel.build(cfg, method_config(method), LABELS, seed=0)
    assert model.kind == entry.kind
    feats = model.formulation.encode(TEXTS, Y)
    train(model, feats, None, TrainConfig(max_steps=2, batch_size=3, progress=False), lr=1e-3)
    ours = model.predict_scores(TEXTS[:3])
    model.save(tmp_path / "model")

    if entry.kind == "encoder":
        theirs = _plain_encoder_scores(tmp_path / "model", method)
    else:
        theirs = _plain_decoder_scores(tmp_path / "model", method, model)
    if theirs is not None:
        np.testing.assert_allclose(theirs, ours, atol=1e-4)
    again = AdaptedModel.load(tmp_path / "model")
    np.testing.assert_allclose(again.predict_scores(TEXTS[:3]), ours, atol=1e-4)


def _plain_encoder_scores(folder: Path, method: str) -> np.ndarray | None:
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if method == "prefix":
        return None  # plain PEFT refuses encoder prefixes on transformers 5.24 (README)
    tok = AutoTokenizer.from_pretrained(folder)
    if method in ADAPTERS:
        model = AutoPeftModelForSequenceClassification.from_pretrained(folder).eval()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.id2label == dict(enumerate(LABELS))
    enc = tok(TEXTS[:3], padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.log_softmax(-1).numpy()


def _plain_decoder_scores(folder: Path, method: str, ours: AdaptedModel) -> np.ndarray:
    """Log-probability of each label word's first token after the prompt (the tiny
    test's check, on the real model); single-token label words assumed, as for
    SmolLM2's and Gemma's vocabularies."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    form = ours.formulation
    label_ids = form.label_ids  # type: ignore[attr-defined]
    if any(len(ids) != 1 for ids in label_ids):
        pytest.skip("multi-token label words: covered by fedtune's own reload")
    if method in ADAPTERS:
        model = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for text in TEXTS[:3]:
            prompt = form._prompt_ids([text])[0]  # type: ignore[attr-defined]
            logp = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
            rows.append(logp[[ids[0] for ids in label_ids]].numpy())
    return np.stack(rows)


def test_ask_with_smollm2(tmp_path: Path) -> None:
    """`fedtune ask` end to end with a real instruction-tuned LM: index two
    documents, retrieve, answer through SmolLM2's chat template, cite the source."""
    if not CATALOG["smollm2"].installed():
        pytest.skip("smollm2 is not installed: fedtune models install smollm2")
    from fedtune.rag import answer_local, build_index, retrieve

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "acme.md").write_text(
        "# Acme Corp annual report 2024\n\nAcme Corp's revenue grew 12 percent in 2024 to EUR "
        "30 million, driven by new contracts in Finland. Operating profit rose to EUR 4.1 "
        "million from EUR 3.2 million.\n\nThe board proposes a dividend of EUR 0.40 per share.\n"
    )
    (docs / "weather.md").write_text(
        "# Weather\n\nIt rained in Helsinki for most of October. The harbour froze early.\n"
    )
    build_index(docs, tmp_path / "idx", "minilm")
    question = "How much did Acme's revenue grow in 2024?"
    hits = retrieve(tmp_path / "idx", question, k=1)
    assert hits[0].source.startswith("acme.md")
    answer = answer_local("smollm2", question, hits, max_new_tokens=24)
    assert answer.prompt.startswith("<|im_start|>system\n") and not answer.notes
    assert "12" in answer.text, answer.text


def test_remote_icl_against_a_real_llama_cpp_server() -> None:
    """Remote ICL end to end against llama-cpp-python's server on SmolLM2's GGUF file
    (`fedtune models serve`). Needs the server: in this environment, or a Python
    that has it in $FEDTUNE_LLAMA_PYTHON (docs/models.md)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from fedtune.data import Example
    from fedtune.methods.icl import ICL, IclConfig
    from fedtune.serve import gguf_of, llama_cpp_command

    if not CATALOG["smollm2"].installed():
        pytest.skip("smollm2 is not installed: fedtune models install smollm2")
    python = os.environ.get("FEDTUNE_LLAMA_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import llama_cpp.server.app"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("llama-cpp-python's server is not installed (set FEDTUNE_LLAMA_PYTHON)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gguf, alias = gguf_of("smollm2")
    cmd = llama_cpp_command(python, gguf, alias, "127.0.0.1", port, 2048, 0)
    server = subprocess.Popen(cmd.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, "the server exited"
            try:
                models = httpx.get(f"{url}/models", timeout=2.0).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start in 180 s"
                time.sleep(0.5)
        assert [m["id"] for m in models["data"]] == ["smollm2"]
        train = [Example(t, LABELS[y]) for t, y in zip(TEXTS, Y, strict=True)]
        cfg = IclConfig(backend="remote", base_url=url, api_model="smollm2", shots=2,
                        retries=0, timeout=120.0)  # fmt: skip
        method = ICL(cfg, ModelConfig(name="smollm2"), LABELS, seed=0).fit(train)
        scores = method.predict_scores(TEXTS)
        share = method.extra_metrics["unparseable_share"]
        # Every request answered. A 135M model often echoes a demonstration instead
        # of answering (measured: 4 of these 6): those rows are ties (no label), the
        # others one label, and the share says how many.
        decided = (scores.max(-1) > np.sort(scores, -1)[:, -2]).sum()
        assert scores.shape == (len(TEXTS), 3) and share < 1.0, method.notes
        assert decided == round((1 - share) * len(TEXTS))
    finally:
        server.terminate()
        server.wait(timeout=30)
