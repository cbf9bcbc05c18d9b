"""The generation task: data layouts, the SFT loss, decoding, metrics, every decoder
method, save/load/peft interop, ICL, `fedtune run` / `compare` / `predict`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedtune.adapted import AdaptedModel
from fedtune.cli import app
from fedtune.config import DataConfig, ModelConfig, load_config, method_config
from fedtune.data import example_groups, make_splits
from fedtune.data.sources import load_examples
from fedtune.errors import ConfigError, DataError
from fedtune.evaluate import Metrics
from fedtune.generate import InstructionLM, generate_texts, score_texts

DECODER_METHODS = ("full", "lora", "ptuning", "prompt", "prefix", "ia3")


def _rows(n: int = 60) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        if i % 2:
            rows.append({"instruction": f"What is {a} plus {b}? ({i})", "context": "",
                         "response": str(a + b), "category": "add"})  # fmt: skip
        else:
            rows.append({"instruction": f"Repeat the code. ({i})", "context": f"code {a}{b}",
                         "response": f"{a}{b}", "category": "copy"})  # fmt: skip
    return rows


@pytest.fixture
def dolly(tmp_path: Path) -> Path:
    path = tmp_path / "dolly.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows()))
    return path


def _gen_cfg(path: Path, model: str, tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(None, [
        f"output_dir={tmp_path / 'runs'}", "data.task=generation", "data.source=file",
        f"data.path={path}", f"model.name={model}", "model.max_length=24",
        "model.max_new_tokens=4", "train.epochs=1", "train.batch_size=8", "train.progress=false",
        *extra,
    ])  # fmt: skip


# --- data -------------------------------------------------------------------------------


def test_alpaca_dolly_and_messages_layouts(tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add.", "input": "2 and 3", "output": "5"},
                                  {"instruction": "Name a color.", "input": "", "output": "red"}]))
    ex = load_examples(DataConfig(task="generation", source="file", path=str(alpaca)))
    assert [(e.text, e.context, e.response, e.label) for e in ex] == [
        ("Add.", "2 and 3", "5", "all"), ("Name a color.", "", "red", "all")]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]}) + "\n")  # fmt: skip
    (e,) = load_examples(DataConfig(task="generation", source="file", path=str(chat)))
    assert (e.text, e.response) == ("2+2?", "4")
    assert e.context == "system: Be brief.\nuser: Hi?\nassistant: Hello."
    table = tmp_path / "t.csv"
    pd.DataFrame({"q": ["a?", "b?"], "a": ["x", "y"], "kind": ["k1", "k2"]}).to_csv(table,
                                                                                    index=False)
    ex = load_examples(DataConfig(task="generation", source="file", path=str(table),
                                  instruction_column="q", response_column="a",
                                  category_column="kind"))  # fmt: skip
    assert [(e.text, e.response, e.label) for e in ex] == [("a?", "x", "k1"), ("b?", "y", "k2")]


def test_generation_data_errors_name_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "reply": "r"}) + "\n")
    with pytest.raises(DataError, match=r"no response column.*available columns: question, "
                                        r"reply; set data.response_column"):
        load_examples(DataConfig(task="generation", source="file", path=str(bad)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "q", "response": " "}) + "\n")
    with pytest.raises(DataError, match=r"record 1: empty response"):
        load_examples(DataConfig(task="generation", source="file", path=str(empty)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="needs a user turn followed by a non-empty assistant"):
        load_examples(DataConfig(task="generation", source="file", path=str(chat)))
    with pytest.raises(DataError, match=r"set data\.task=generation"):
        load_examples(DataConfig(source="tatqa", path=str(tmp_path)))


def _tatqa(tmp_path: Path) -> Path:
    reports = []
    for r in range(12):
        reports.append({
            "table": {"uid": f"t{r}", "table": [["", "2019"], ["Revenue", f"{100 + r}"]]},
            "paragraphs": [{"uid": "p", "order": 1, "text": f"Revenue grew in year {r}."}],
            "questions": [
                {"uid": f"q{r}a", "question": f"What was revenue {r}?", "answer": f"{100 + r}",
                 "answer_type": "span", "answer_from": "table", "scale": "million"},
                {"uid": f"q{r}b", "question": f"What grew {r}?", "answer": ["Revenue"],
                 "answer_type": "multi-span", "answer_from": "text", "scale": ""},
                {"uid": f"q{r}c", "question": f"Change {r}?", "answer": 1.5,
                 "answer_type": "arithmetic", "answer_from": "table-text", "scale": ""},
            ]})  # fmt: skip
    path = tmp_path / "tatqa_dataset_dev.json"
    path.write_text(json.dumps(reports))
    return path


def test_tatqa_loader_and_split_keep_each_table_in_one_set(tmp_path: Path) -> None:
    path = _tatqa(tmp_path)
    cfg = DataConfig(task="generation", source="tatqa", path=str(tmp_path), test_size=0.25,
                     val_size=0.2, site_column="answer_from")  # fmt: skip
    ex = load_examples(cfg)
    assert len(ex) == 36 and ex[0].text == "What was revenue 0?" and ex[0].response == "100"
    assert ex[0].context.startswith("Table:\n | 2019\nRevenue | 100\n\nRevenue grew")
    assert ex[1].response == "Revenue" and ex[2].response == "1.5"
    assert {e.label for e in ex} == {"span", "multi-span", "arithmetic"}
    assert {e.site for e in ex} == {"table", "text", "table-text"}
    assert load_examples(DataConfig(task="generation", source="tatqa", path=str(path),
                                    site_column="answer_from")) == ex
    s = make_splits(cfg)
    groups = [{e.group for e in part} for part in (s.train, s.validation, s.test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(len(g) for g in groups) == 12 and s.labels == ("arithmetic", "multi-span", "span")
    assert any("whole groups" in n for n in s.notes)
    # What a paired interval resamples whole: each test question's report.
    assert example_groups(s.test) == [e.group for e in s.test] and len(set(example_groups(
        s.test))) == len(groups[2])
    assert example_groups([replace(e, group="") for e in s.test]) == []


def test_duplicate_questions_are_keyed_by_their_context(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "Total?", "context": f"table {i % 3}", "response": str(i)}
            for i in range(30)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    s = make_splits(DataConfig(task="generation", source="file", path=str(path), test_size=0.34,
                               val_size=0.0))  # fmt: skip
    assert len(s.train) + len(s.test) == 3  # one per context, the first copy kept
    assert any("duplicate examples (same instruction and context)" in n for n in s.notes)


# --- the formulation and decoding --------------------------------------------------------


def test_sft_loss_is_the_mean_nll_of_response_tokens_only(tiny_models: dict[str, str]) -> None:
    from fedtune.data import Example

    model = AdaptedModel.build(ModelConfig(name=tiny_models["llama"], max_length=32),
                               method_config("lora"), ("all",), task="generation")  # fmt: skip
    form = model.formulation
    assert isinstance(form, InstructionLM) and not form.chat
    exs = [Example("Say hi.", "all", response="hi there"),
           Example("Count.", "all", context="one two", response="three four five")]
    feats = form.encode_examples(exs)
    eos = form.tokenizer.eos_token_id
    for f, e in zip(feats, exs, strict=True):
        prompt = f["input_ids"][: f["prompt_len"]]
        assert form.tokenizer.decode(prompt).endswith("### Response:\n")
        assert f["input_ids"][f["prompt_len"] :] == (
            form.tokenizer(e.response, add_special_tokens=False)["input_ids"] + [eos])
    # A response cut at max_target_length ends without EOS (the model must not learn
    # to stop there).
    form.max_target_length = 2
    (cut,) = form.encode_examples([exs[1]])
    assert cut["input_ids"][cut["prompt_len"] :] == form.tokenizer(
        exs[1].response, add_special_tokens=False)["input_ids"][:2]
    form.max_target_length = 128
    batch = form.collate(feats)
    loss = form.loss(model.module, batch)
    # By hand: full logits, log p of each response token given everything before it.
    with torch.no_grad():
        logits = model.module(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits.float()
    terms = []
    for i, f in enumerate(feats):
        logp = logits[i].log_softmax(-1)
        terms += [logp[t - 1, f["input_ids"][t]] for t in range(f["prompt_len"], f["length"])]
    assert loss.item() == pytest.approx(-torch.stack(terms).mean().item(), rel=1e-5)
    sums, _ = form.evaluate(model.module, batch)
    assert sums[1].item() == len(terms)


def test_chat_template_prompts_and_long_contexts_cut_first(chat_llama: str) -> None:
    from fedtune.data import Example

    model = AdaptedModel.build(ModelConfig(name=chat_llama, max_length=12), method_config("lora"),
                               ("all",), task="generation")  # fmt: skip
    form = model.formulation
    assert isinstance(form, InstructionLM) and form.chat
    (f,) = form.encode_examples([Example("Why?", "all", context="word " * 50, response="ok")])
    text = form.tokenizer.decode(f["input_ids"][: f["prompt_len"]])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "Why?" in text and 0 < text.count("word") < 12  # the context cut, not dropped
    assert text.index("word") < text.index("Why?")  # its end cut, the question kept
    # Documents keep their start by default; model.context_keep = "end" keeps the end
    # (conversation history), either way the whole question stays.
    doc = "first " + "word " * 50 + "last"
    kept = {}
    for keep in ("auto", "start", "end"):
        m = AdaptedModel.build(ModelConfig(name=chat_llama, max_length=12, context_keep=keep),
                               method_config("lora"), ("all",), task="generation")  # fmt: skip
        (f,) = m.formulation.encode_examples([Example("Why?", "all", context=doc, response="ok")])
        kept[keep] = m.tokenizer.decode(f["input_ids"][: f["prompt_len"]])
        assert "Why?" in kept[keep] and 0 < kept[keep].count("word") < 12
    assert kept["auto"] == kept["start"]
    assert "first" in kept["start"] and "last" not in kept["start"]
    assert "last" in kept["end"] and "first" not in kept["end"]
    with pytest.raises(ConfigError, match="context_keep"):
        AdaptedModel.build(ModelConfig(name=chat_llama, context_keep="middle"),  # type: ignore[arg-type]
                           method_config("lora"), ("all",), task="generation")  # fmt: skip
    off = AdaptedModel.build(ModelConfig(name=chat_llama, chat="off"), method_config("lora"),
                             ("all",), task="generation")  # fmt: skip
    assert not off.formulation.chat  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "ptuning", "full"])
def test_the_lm_head_runs_on_response_tokens_only(
    tiny_models: dict[str, str], method: str, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SFT loss (and DPO's log-probs, which share `_target_logprobs`) run the LM
    head on the response tokens only, in chunks: the same loss and gradients as from
    the full logits, fewer head rows; soft-capped logits keep the general path."""
    import fedtune.classify as classify
    from fedtune.data.sources import Example

    model = AdaptedModel.build(ModelConfig(name=tiny_models[family]), method_config(method),
                               ("all",), seed=1, task="generation")  # fmt: skip
    model.module.eval()
    form = model.formulation
    exs = [Example("Say hi.", "all", response="hi there"),
           Example("Count the numbers up to six, please.", "all", context="one two",
                   response="three four five six")]  # fmt: skip
    batch = form.collate(form.encode_examples(exs))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.module.zero_grad()
        loss = form.loss(model.module, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.module.parameters()
                               if p.grad is not None]  # fmt: skip

    rows: list[int] = []
    hook = model.module.get_output_embeddings().register_forward_hook(
        lambda m, i, o: rows.append(o.shape[:-1].numel()))  # fmt: skip
    monkeypatch.setattr(classify, "HEAD_CHUNK", 3)
    loss, grads = loss_and_grads()
    hook.remove()
    n_targets = int(form._target_mask(batch).sum())  # type: ignore[attr-defined]
    assert sum(rows) == n_targets and max(rows) <= 3 < n_targets
    monkeypatch.setattr(classify, "_plain_head", lambda m: None)
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    assert classify._plain_head(model.module) is model.module.get_output_embeddings()
    monkeypatch.setattr(model.module.config, "final_logit_softcapping", 30.0, raising=False)
    assert classify._plain_head(model.module) is None
    monkeypatch.undo()
    monkeypatch.setattr(model.module.config, "model_type", "mamba")  # not known to be plain
    assert classify._plain_head(model.module) is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", DECODER_METHODS)
def test_generation_is_greedy_decoding_of_the_trained_forward(
    tiny_models: dict[str, str], method: str, family: str
) -> None:
    """Batched, left-padded generation gives, for every method, the tokens of greedy
    decoding with the forward pass training uses (one prompt at a time, no cache).
    Catches PEFT paths that drop positions under padding (prompt, ptuning) or ignore
    the adapter in `generate` (prefix)."""
    model = AdaptedModel.build(ModelConfig(name=tiny_models[family], max_new_tokens=4),
                               method_config(method), ("all",), seed=1,
                               task="generation")  # fmt: skip
    for p in model.module.parameters():  # a trained-looking adapter, not the identity
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    model.module.eval()
    # Two prompts of one length, one shorter, one longer: one left-padded batch.
    questions = ["What is 2 plus 2?", "What is 3 plus 5?", "Hi",
                 "Name the largest city in a long country."]  # fmt: skip
    prompts = model.formulation.prompt_ids(questions, [""] * 4)  # type: ignore[attr-defined]
    assert len(prompts[0]) == len(prompts[1]) != len(prompts[2])
    expected = []
    for ids in prompts:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(4):
                x = torch.tensor([seq])
                logits = model.module(input_ids=x, attention_mask=torch.ones_like(x)).logits
                seq.append(int(logits[0, -1].argmax()))
        new = seq[len(ids):]
        if model.tokenizer.eos_token_id in new:
            new = new[: new.index(model.tokenizer.eos_token_id)]
        expected.append(model.tokenizer.decode(new, skip_special_tokens=True).strip())
    assert model.generate(questions, batch_size=4) == expected and any(expected)
    # The adapter changes the answers (prefix's key/values are not ignored).
    if method in ("prompt", "ptuning", "prefix"):  # the base model stays untouched
        base = model.module.get_base_model()  # type: ignore[operator]
        assert generate_texts(base, model.tokenizer, prompts, 4) != expected
    elif method != "full":  # adapters injected into the base's layers
        with model.module.disable_adapter():  # type: ignore[operator]
            assert model.generate(questions, batch_size=4) != expected


def test_scores_are_rouge_l_and_squad_em_f1() -> None:
    (a, b, c) = score_texts(["15", "the cat sat", "Paris."], ["15", "a cat sat down", "London"])
    assert a == {"rougeL": 1.0, "exact_match": 1.0, "f1": 1.0}
    # ROUGE-L: LCS 2 of 3 and 4 tokens; SQuAD F1 drops articles: (cat sat) vs (cat sat down).
    assert b["rougeL"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4), abs=1e-4)
    assert b["exact_match"] == 0.0 and b["f1"] == pytest.approx(0.8)
    assert c == {"rougeL": 0.0, "exact_match": 0.0, "f1": 0.0}


# --- methods, runs, save/load ---------------------------------------------------------------


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_every_decoder_method_trains_saves_and_generates_the_same(
    tiny_models: dict[str, str], dolly: Path, tmp_path: Path, method: str
) -> None:
    from fedtune.regimes import run_centralized

    cfg = _gen_cfg(dolly, tiny_models["llama"], tmp_path, f"method.name={method}",
                   "method.lr=0.01", f"name={method}")  # fmt: skip
    summary = run_centralized(cfg)
    assert summary["task"] == "generation" and summary["primary"] == "rougeL"
    assert set(summary["report"]) == {"add", "copy"}
    assert 0 <= summary["rougeL"] <= 1 and not math.isnan(summary["loss"])
    run = Path(summary["run_dir"])
    report = (run / "report.md").read_text()
    assert "| ROUGE-L | EM | F1 | loss |" in report and "Generated answers" in report
    assert not (run / "confusion.png").exists()
    loaded = AdaptedModel.load(run / "model")
    assert loaded.task == "generation"
    samples = summary["samples"]
    assert any(s["context"] for s in samples) and any(not s["context"] for s in samples)
    assert loaded.generate([s["instruction"] for s in samples],
                           [s["context"] for s in samples]) == [s["prediction"] for s in samples]


def test_adapter_generates_the_same_text_in_plain_peft(
    tiny_models: dict[str, str], dolly: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM

    from fedtune.regimes import run_centralized

    summary = run_centralized(_gen_cfg(dolly, tiny_models["llama"], tmp_path,
                                       "method.name=lora", "method.lr=0.05"))  # fmt: skip
    model_dir = Path(summary["run_dir"]) / "model"
    ours = AdaptedModel.load(model_dir)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompt = ours.formulation.prompt_ids(["What is 3 plus 4?"], [""])[0]  # type: ignore[attr-defined]
    plain = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4,
                                do_sample=False, pad_token_id=ours.tokenizer.pad_token_id)
    text = ours.tokenizer.decode(plain[0, len(prompt):], skip_special_tokens=True).strip()
    assert ours.generate(["What is 3 plus 4?"], max_new_tokens=4) == [text]
    assert generate_texts(peft_model, ours.tokenizer, [prompt], 4) == [text]


def test_generate_texts_confidence_is_the_answers_mean_log_probability(
    tiny_models: dict[str, str],
) -> None:
    """What a site says with its federated answer: the mean log-probability of the
    answer's tokens (with the stop token that ended it), as a whole forward pass of the
    same model over prompt + answer gives it; for a plain LM and a P-tuning model."""
    from peft import PromptEncoderConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tok.pad_token = tok.pad_token or tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    ptuned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]),
                            PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                encoder_hidden_size=16)).eval()  # fmt: skip
    # unequal lengths in one batch: left padding, as the sites' batches have
    prompts = [tok(t)["input_ids"] for t in ("What is 3 plus 4? Say it in words.", "Repeat: ab")]
    for model, virtual in ((lm, 0), (ptuned, 3)):
        sure: list[float] = []
        answers = generate_texts(model, tok, prompts, 5, batch_size=2, confidences=sure)
        plain = generate_texts(model, tok, prompts, 5, batch_size=1)
        assert answers == plain and len(sure) == 2
        for p, got in zip(prompts, sure, strict=True):
            ids = list(p)
            for _ in range(5):  # greedy by whole forward passes, one token at a time
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits[0, virtual:]
                ids.append(int(logits[-1].argmax()))
                if ids[-1] == tok.eos_token_id:
                    break
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, virtual:].float()
            new = torch.tensor(ids[len(p) :])[:, None]
            logp = logits.log_softmax(-1)[len(p) - 1 : -1].gather(1, new)
            assert got == pytest.approx(float(logp.mean()), abs=1e-4)
            assert got <= 0


def test_answers_end_where_the_plain_prompt_starts_its_next_block(
    tiny_models: dict[str, str],
) -> None:
    """A base model prompted with the plain template writes the next "### Instruction:"
    block after its answer (Gemma 3 270M few-shot did): the answer ends there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.generate import _stop_at, _tokens_writing

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tok.pad_token = tok.pad_token or tok.eos_token
    form = InstructionLM(tok, ("all",), 64, ModelConfig().prompt_template, "off", 8)
    assert form.stop_texts == ("### Instruction:", "### Response:", "### Context:")
    custom = InstructionLM(tok, ("all",), 64, "Q: {instruction}\n{context}A:", "off", 8)
    assert custom.stop_texts == ("Q:", "A:", "### Context:")
    text = "-33640\n\n### Instruction:\nWhat was the net income?\n\n### Context"
    assert text[: _stop_at(text, form.stop_texts)].strip() == "-33640"
    assert _stop_at("see ### Response: inline", form.stop_texts) == 24  # not a line start
    assert _stop_at("  ### Context:\nx", form.stop_texts) == 0
    # The tokens that wrote a cut answer: the fewest whose text reaches the cut.
    ids = tok("12 apples\n\n### Instruction:\nmore", add_special_tokens=False)["input_ids"]
    whole = tok.decode(ids)
    end = _stop_at(whole, form.stop_texts)
    k = _tokens_writing(tok, ids, end)
    assert len(tok.decode(ids[:k])) >= end > len(tok.decode(ids[: k - 1]))
    assert tok.decode(ids[:k])[:end].strip() == "12 apples"
    assert _tokens_writing(tok, ids, len(whole) + 5) == len(ids)
    # Through decoding: a stop text the answer starts with leaves it empty, and its
    # confidence is the first token's log-probability alone.
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    prompt = [tok("What is 3 plus 4?")["input_ids"]]
    sure: list[float] = []
    (full,) = generate_texts(lm, tok, prompt, 5, confidences=sure)
    assert full
    cut: list[float] = []
    assert generate_texts(lm, tok, prompt, 5, confidences=cut, stop_texts=(full[:2],)) == [""]
    with torch.no_grad():
        first = lm(input_ids=torch.tensor(prompt)).logits[0, -1].float().log_softmax(-1).max()
    assert cut[0] == pytest.approx(float(first), abs=1e-4)


def test_icl_zero_and_few_shot_generate(tiny_models: dict[str, str], dolly: Path,
                                        tmp_path: Path) -> None:  # fmt: skip
    from fedtune.regimes import run_centralized

    for shots in (0, 2):
        s = run_centralized(_gen_cfg(dolly, tiny_models["llama"], tmp_path, "method.name=icl",
                                     f"method.shots={shots}", f"name=icl{shots}"))  # fmt: skip
        assert s["kind"] == "frozen" and s["task"] == "generation" and len(s["samples"]) == 5
    r = CliRunner().invoke(app, ["predict", s["run_dir"], "--text", "What is 1 plus 1?"])
    assert r.exit_code == 0, r.output
    # Federated by query: each site answers from its own demonstrations; the server
    # keeps the answer of the surest site (tests/test_frozen.py: the classification form).
    from fedtune.federated import apps
    from fedtune.federated.compare import run_regimes
    from fedtune.methods.icl_generate import GenerationICL

    cfg = _gen_cfg(dolly, tiny_models["llama"], tmp_path, "method.name=icl", "name=fed",
                   "method.shots=2", "federated.sites=2")  # fmt: skip
    out = run_regimes(cfg, ["icl"], ("centralized", "federated"))
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["regime"] for r in rows] == ["centralized", "federated"]
    fed = rows[-1]
    assert fed["strategy"] == "query" and fed["task"] == "generation"
    assert fed["primary"] == "rougeL" and 0 <= fed["rougeL"] <= 1
    run = out / "icl-federated"
    report = (run / "report.md").read_text()
    assert "the answer its site's LM was surest of" in report and "| ROUGE-L | EM | F1 |" in report
    assert not (run / "confusion.png").exists()
    rows_out = [json.loads(line) for line in (run / "answers.jsonl").open()]
    got = [(r["prediction"], r["site"]) for r in rows_out]
    # By hand: every site's ICL on its own examples; per question the surest answer.
    ws = apps.workspace(cfg)
    test = ws.splits.test
    per_site = []
    for site in ws.partition.sites:
        icl = GenerationICL(cfg.method, cfg.model, ws.splits.labels, seed=cfg.seed).fit(site.train)
        sure: list[float] = []
        per_site.append((icl.answer(test, sure), sure))
    assert all(len(a) == len(c) == len(test) for a, c in per_site)
    names = [site.name for site in ws.partition.sites]
    # the surest site per question; a tie goes to the first (sites reply in their order)
    best = [min(range(len(per_site)), key=lambda s, q=q: (-per_site[s][1][q], s))
            for q in range(len(test))]  # fmt: skip
    assert got == [(per_site[s][0][q], names[s]) for q, s in enumerate(best)]
    assert any(n.startswith("answers kept per site: ") for n in fed["notes"]), fed["notes"]
    assert per_site[0][1] != per_site[1][1]  # other prompts, other certainties
    # The server combines the replies in the sites' order, not in its nodes' order
    # (a deployed federation's node ids are random; the order decides ties): with the
    # nodes in reverse, the method still sees the sites in order, and answers the same.
    from fedtune.federated.grid import InProcessGrid
    from fedtune.federated.query import federated_answers
    from fedtune.federated.runner import _run_id, make_contexts

    class Reversed(InProcessGrid):  # node ids in reverse, as a SuperLink's are in any order
        def get_node_ids(self):  # type: ignore[no-untyped-def]
            return list(super().get_node_ids())[::-1]

    grid = Reversed(apps.client_app, make_contexts(cfg, len(names), names, None), _run_id(cfg))
    server = GenerationICL(cfg.method, cfg.model, ws.splits.labels)
    order: list[list[str]] = []
    combine = server.combine_answers

    def spy(answers):  # type: ignore[no-untyped-def]
        if all("site" in a for a in answers):  # (not the check of each reply alone)
            order.append([a["site"][0] for a in answers])
        return combine(answers)

    server.combine_answers = spy  # type: ignore[method-assign]
    combined = federated_answers(grid, server, server.query_payload(test), len(test), 1, [], {})
    assert order == [names] and [tuple(a) for a in combined] == got
    # The choice itself (the tiny random LM gives every prompt the same answer).
    icl = GenerationICL(cfg.method, cfg.model, ws.splits.labels)
    sites = [{"answer": ["a0", "b0", "c0"], "confidence": np.array([-1.0, -0.2, -3.0])},
             {"answer": ["a1", "b1", "c1"], "confidence": np.array([-0.5, -0.9, -3.0])}]
    # c: a tie, kept from the first site
    assert icl.combine_answers(sites).tolist() == [("a1", ""), ("b0", ""), ("c0", "")]
    sites[0]["site"], sites[1]["site"] = ["x"] * 3, ["y"] * 3  # as the server adds them
    assert [site for _, site in icl.combine_answers(sites)] == ["y", "x", "x"]
    # An empty answer (the model ended at once) loses to any answer, however sure.
    sites[1]["answer"][0] = " "
    assert icl.combine_answers(sites)[0] == ("a0", "x")
    # Not a log-probability, or not one per question: the reply is malformed (the
    # server leaves it out and names the site: fedtune.federated.query._checked).
    for bad in (np.array([0.5, -1.0, -1.0]), np.array([-np.inf, -1.0, -1.0]),
                np.array([-1.0, -1.0])):
        with pytest.raises(ValueError):
            icl.combine_answers([{"answer": ["a", "b", "c"], "confidence": bad}])


def _solve(body: dict[str, object]) -> str:
    """What a perfect server answers to a question of `_rows`: the sum, or the code."""
    import re

    user = str(body["messages"][-1]["content"])  # type: ignore[index]
    if m := re.search(r"What is (\d) plus (\d)\?", user):
        return f" {int(m[1]) + int(m[2])}\n"
    return user.split("\n\n", 1)[0].removeprefix("code ")


def test_icl_generation_answers_from_a_remote_server(dolly: Path, tmp_path: Path) -> None:
    """method.backend = "remote" on the generation task: each question goes to an
    OpenAI-compatible server as a conversation (demonstrations as user / assistant
    turns, the context before the question), greedy, model.max_new_tokens long, several
    requests in flight; the answers are scored like the local LM's and the run
    predicts again from its saved demonstrations."""
    import threading

    from openai_stub import OpenAIStub

    from fedtune.regimes import run_centralized

    # The first request goes alone; the other five are answered only once all five are
    # in the server at once (concurrency 5; a barrier, not a clock).
    together = threading.Barrier(5, timeout=20)
    seen = []
    lock = threading.Lock()

    def slow(body: dict[str, object]) -> tuple[object, ...]:
        with lock:
            seen.append(body)
            wait = 2 <= len(seen) <= 6  # the run's test questions after the first
        if wait:
            together.wait()
        return ("sleep", 0.01, _solve(body))

    with OpenAIStub(responder=slow) as stub:
        cfg = _gen_cfg(dolly, "minilm", tmp_path, "method.name=icl", "method.backend=remote",
                       f"method.base_url={stub.url}", "method.api_model=stub-model",
                       "method.shots=2", "method.concurrency=5", "model.system_prompt=Be brief.",
                       "data.test_size=0.1")  # fmt: skip
        s = run_centralized(cfg)
        bodies = [r.body for r in stub.chat_requests]
        assert len(bodies) == s["n_test"] == 6
        assert s["exact_match"] == 1.0 and s["model"] == f"stub-model at {stub.url}"
        assert s["base_parameters"] == 0
        for body in bodies:
            assert body["max_tokens"] == 4 and body["temperature"] == 0.0
            roles = [m["role"] for m in body["messages"]]
            assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
            assert body["messages"][0]["content"] == "Be brief."
        copy = next(b for b in bodies if "code" in b["messages"][-1]["content"])
        assert copy["messages"][-1]["content"].startswith("code ")  # context, then question
        answers = [json.loads(x) for x in (Path(s["run_dir"]) / "answers.jsonl").read_text()
                   .splitlines()]  # fmt: skip
        assert all(a["prediction"] == a["reference"] for a in answers)
        r = CliRunner().invoke(app, ["predict", s["run_dir"], "--text", "What is 2 plus 3?"])
        assert r.exit_code == 0, r.output
        assert "5" in r.output
        # A budget in tokens (4 characters a token without method.model): the
        # demonstrations go first, then the end of a long context.
        from fedtune.data import Example
        from fedtune.methods.icl_generate import GenerationICL

        tight = GenerationICL(method_config("icl", {"backend": "remote", "base_url": stub.url,
                                                    "api_model": "stub-model", "shots": 2,
                                                    "max_context": 12}),
                              ModelConfig(name="minilm", max_new_tokens=4), [], seed=0)  # fmt: skip
        tight.fit([Example(r["instruction"], r["category"], context=r["context"],
                           response=r["response"]) for r in _rows(10)])  # fmt: skip
        long = Example("Repeat the code.", "copy", context="code 12 " + "x" * 80, response="12")
        assert tight.answer([long])[0].startswith("12 x")  # the start of the context kept
        sent = stub.chat_requests[-1].body["messages"]
        assert [m["role"] for m in sent] == ["user"] and len(sent[0]["content"]) <= 4 * 8
        assert tight.notes == ["2 demonstrations dropped to fit the context budget of 8 prompt "
                               "tokens", "1 of 1 contexts cut to fit 8 prompt tokens"]  # fmt: skip
        # Demonstrations too long are cut to model.max_length tokens before any is
        # dropped (as the local prompt's always are): here both fit once cut to 10.
        wordy = GenerationICL(replace(tight.config, max_context=60),
                              ModelConfig(name="minilm", max_new_tokens=4, max_length=10),
                              [], seed=0)  # fmt: skip
        wordy.fit([replace(e, context=f"code {e.response} " + "y" * 120) for e in tight._pool])
        wordy.answer([Example("Repeat the code.", "copy", context="code 56", response="56")])
        sent = stub.chat_requests[-1].body["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant"] * 2 + ["user"]
        demo_contexts = [m["content"].split("\n\n")[0] for m in sent[:-1:2]]
        assert all(c.startswith("code ") and 4 <= len(c) <= 4 * 10 for c in demo_contexts)
        assert wordy.notes == ["2 demonstrations cut to model.max_length = 10 tokens to fit "
                               "the context budget of 56 prompt tokens"]  # fmt: skip
        # model.context_keep = "end" keeps a context's end, as the local prompt does; a
        # question longer than the budget alone goes as it is, and the notes say so.
        ends = GenerationICL(tight.config, ModelConfig(name="minilm", max_new_tokens=4,
                                                       context_keep="end"), [], seed=0)  # fmt: skip
        ends.fit(tight._pool)
        ends.answer([replace(long, context="x" * 80 + " code 34")])
        assert stub.chat_requests[-1].body["messages"][-1]["content"].startswith("x")
        assert "code 34" in stub.chat_requests[-1].body["messages"][-1]["content"]
        ends.answer([Example("Repeat the code. " * 4, "copy", context="code 56", response="")])
        assert stub.chat_requests[-1].body["messages"][-1]["content"] == "Repeat the code. " * 4
        assert ends.notes[-1].startswith("1 of 1 prompts are over the budget of 8 prompt tokens")


def test_remote_demonstrations_are_cut_as_the_local_prompt_cuts_them(
    tiny_models: dict[str, str],
) -> None:
    """A remote prompt's demonstrations, once cut to `model.max_length` (to fit
    `method.max_context`), are what InstructionLM.fit_texts makes of them locally,
    counted with `method.model`'s tokenizer (here one that adds [CLS] and [SEP], which
    are not the text's)."""
    from fedtune.data import Example
    from fedtune.generate import InstructionLM
    from fedtune.methods.icl import token_counter
    from fedtune.methods.icl_generate import GenerationICL
    from fedtune.models import load_tokenizer

    counter = tiny_models["bert"]
    tok = load_tokenizer(counter, "decoder")
    assert len(tok("")["input_ids"]) == 2  # special tokens the count must leave out
    tok.eos_token = tok.sep_token  # (InstructionLM wants one; fit_texts never adds it)
    cfg = method_config("icl", {"backend": "remote", "base_url": "http://127.0.0.1:9/v1",
                                "api_model": "m", "model": counter, "max_context": 400})
    words = " ".join(f"w{i}" for i in range(40))
    cases = [Example("Which value?", "all", context=words, response="1"),  # context cut
             Example(words, "all", context="ctx", response="2"),  # instruction cut, no context
             Example("Short?", "all", context="tiny", response="3")]  # fmt: skip
    for keep in ("start", "end"):
        mc = ModelConfig(name=counter, max_length=12, context_keep=keep)
        icl = GenerationICL(cfg, mc, [], seed=0)
        icl._counter = token_counter(counter)
        form = InstructionLM(tok, ("all",), 12, mc.prompt_template, "off", 8, context_keep=keep)
        for e in cases:
            cut = icl._fitted(e)
            assert (cut.text, cut.context) == form.fit_texts(e.text, e.context), (keep, e.text)
        assert icl._fitted(cases[2]) is cases[2]  # fits: untouched


def test_icl_generation_remote_refuses_label_options(dolly: Path, tmp_path: Path) -> None:
    from fedtune.regimes import run_centralized

    base = ("method.name=icl", "method.backend=remote", "method.base_url=http://127.0.0.1:9/v1",
            "method.api_model=m")  # fmt: skip
    for extra, pattern in (
        ("method.remote_scoring=logprobs", r"logprobs.*scores label words"),
        ("method.max_tokens=32", r"max_tokens = 32.*model\.max_new_tokens = 4"),
        ("method.concurrency=0", r"method\.concurrency = 0 must be >= 1"),
        ("method.max_context=4", r"max_context = 4 leaves no room"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            run_centralized(_gen_cfg(dolly, "minilm", tmp_path, *base, extra))
    with pytest.raises(ConfigError, match=r"needs method\.api_model"):
        run_centralized(_gen_cfg(dolly, "minilm", tmp_path, *base[:3]))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_classification_only_methods_and_encoders_refuse_generation(
    tiny_models: dict[str, str], dolly: Path, tmp_path: Path
) -> None:
    from fedtune.regimes import run_centralized

    with pytest.raises(ConfigError, match=r"knn classifies; it has no form for data\.task"):
        run_centralized(_gen_cfg(dolly, tiny_models["llama"], tmp_path, "method.name=knn"))
    with pytest.raises(ConfigError, match=r"needs a decoder.*is an encoder"):
        run_centralized(_gen_cfg(dolly, tiny_models["bert"], tmp_path, "method.name=lora"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_compare_runs_three_regimes_on_generation(
    tiny_models: dict[str, str], dolly: Path, tmp_path: Path,
    check_paired_findings: Callable[[Path, str], None],
) -> None:  # fmt: skip
    from fedtune.federated.compare import run_regimes

    cfg = _gen_cfg(dolly, tiny_models["llama"], tmp_path, "method.name=lora",
                   "federated.rounds=2", "federated.partition=dirichlet",
                   "federated.min_site_size=3", "name=cmp")  # fmt: skip
    out = run_regimes(cfg)
    rows = json.loads((out / "comparison.json").read_text())
    assert {r["regime"] for r in rows} == {"centralized", "local", "federated"}
    assert all(r["task"] == "generation" and "rougeL" in r for r in rows)
    report = (out / "report.md").read_text()
    assert "| ROUGE-L | EM | F1 |" in report
    assert "## Generated answers side by side: lora" in report
    assert "| instruction | reference | centralized | local site-1 |" in report
    # Rounds are checked on the loss alone (no decoding between rounds).
    rounds = [json.loads(line) for line in
              (out / "lora-federated" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r.get("event") == "round"]
    assert len(rounds) == 2 and all("val_loss" in r and "val_rougeL" not in r for r in rounds)
    check_paired_findings(out, "rougeL")
    for r in rows:  # every test answer beside its reference, in every regime's run
        answers = [json.loads(x) for x in (out / r["name"] / "answers.jsonl").read_text()
                   .splitlines()]  # fmt: skip
        assert len(answers) == r["n_test"]
        assert {"instruction", "category", "reference", "prediction", "rougeL", "exact_match",
                "f1"} <= set(answers[0])  # fmt: skip
        assert sum(a["rougeL"] for a in answers) / len(answers) == pytest.approx(r["rougeL"])
        assert "answers.jsonl" in (out / r["name"] / "report.md").read_text()


def test_predict_answers_from_a_file(tiny_models: dict[str, str], dolly: Path,
                                     tmp_path: Path) -> None:  # fmt: skip
    from fedtune.regimes import run_centralized

    s = run_centralized(_gen_cfg(dolly, tiny_models["llama"], tmp_path, "method.name=lora"))
    questions = tmp_path / "q.csv"
    pd.DataFrame({"id": [7, 8], "question": ["Repeat.", "What is 1 plus 2?"],
                  "ctx": ["code 12", ""]}).to_csv(questions, index=False)  # fmt: skip
    out = tmp_path / "answers.jsonl"
    r = CliRunner().invoke(app, ["predict", s["run_dir"], "--input", str(questions),
                                 "--text-column", "question", "--context-column", "ctx",
                                 "--output", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model = AdaptedModel.load(Path(s["run_dir"]) / "model")
    assert [str(x["id"]) for x in rows] == ["7", "8"]
    assert [x["answer"] for x in rows] == model.generate(["Repeat.", "What is 1 plus 2?"],
                                                         ["code 12", ""])  # fmt: skip


def test_sites_by_category_and_personalized_generation(tiny_models: dict[str, str], dolly: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    """Non-IID by construction (one site per category, as FLARE's per-dataset sites),
    each site's own validation set, and per-site personalization scored by ROUGE-L."""
    from fedtune.federated.runner import run_federated

    cfg = _gen_cfg(dolly, tiny_models["llama"], tmp_path, "method.name=lora", "name=p",
                   "data.site_column=category", "federated.partition=column",
                   "federated.sites=2", "federated.rounds=1", "federated.validation=site",
                   "federated.site_val_size=0.2", "federated.personalize_epochs=1")  # fmt: skip
    summary = run_federated(cfg)
    assert summary["sites"] == ["add", "copy"]
    rows = summary["personalized"]
    assert [r["site"] for r in rows] == ["add", "copy"]
    assert all("personal_val_rougeL" in r and "global_val_loss" in r for r in rows)
    report = (tmp_path / "runs" / "p" / "report.md").read_text()
    assert "| site | global ROUGE-L | personalized ROUGE-L | global loss |" in report


def test_retrieval_grounded_answers_use_the_nearest_passages(tiny_models: dict[str, str],
                                                             tmp_path: Path) -> None:  # fmt: skip
    """icl with method.retrieve: each question's context is replaced by the passages
    nearest to it from the whole collection (here, its own report's is the nearest)."""
    from fedtune.data import Example
    from fedtune.methods.icl import IclConfig
    from fedtune.methods.icl_generate import GenerationICL

    icl = GenerationICL(IclConfig(shots=0, retrieve=1),
                        ModelConfig(name=tiny_models["llama"], max_length=64,
                                    max_new_tokens=2), ("all",))  # fmt: skip
    pool = [Example("q", "all", context="Bananas are yellow fruit grown in the tropics.",
                    response="x"),
            Example("q", "all", context="The company revenue rose to 40 million dollars.",
                    response="y")]  # fmt: skip
    icl.fit(pool)
    queries = [Example("What was the revenue of the company?", "all", context="unrelated")]
    grounded = icl._grounded(queries)
    assert grounded[0].context == "The company revenue rose to 40 million dollars."
    assert "a passage of the question's own context among them for 0 of 1" in icl.notes[-1]
    assert len(icl.answer(queries)) == 1


@pytest.mark.parametrize("method", ["lora", "ptuning", "full"])
def test_gradient_checkpointing_trains_the_same(tiny_models: dict[str, str], dolly: Path,
                                                method: str) -> None:  # fmt: skip
    """train.gradient_checkpointing recomputes activations: the same trained state."""
    from fedtune.config import TrainConfig
    from fedtune.data import make_splits
    from fedtune.train import train

    splits = make_splits(DataConfig(task="generation", source="file", path=str(dolly)))
    states = []
    for checkpointing in (False, True):
        model = AdaptedModel.build(ModelConfig(name=tiny_models["llama"]), method_config(method),
                                   splits.labels, seed=3, task="generation")  # fmt: skip
        feats = model.formulation.encode_examples(splits.train[:16])
        cfg = TrainConfig(max_steps=2, batch_size=8, progress=False,
                          gradient_checkpointing=checkpointing)  # fmt: skip
        train(model, feats, None, cfg, lr=0.01, seed=3)
        module = model.module
        base = module.get_base_model() if method != "full" else module
        assert base.is_gradient_checkpointing == checkpointing
        states.append(model.trainable_state())
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=1e-4, atol=1e-6)


def test_classification_reports_keep_their_layout(tiny_models: dict[str, str], table: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    """The task layer leaves classification's report and summary as they were."""
    from fedtune.regimes import run_centralized

    cfg = load_config(None, [f"output_dir={tmp_path}", "name=c", "data.source=file",
                             f"data.path={table}", f"model.name={tiny_models['bert']}",
                             "method.name=lora", "train.epochs=1", "train.progress=false"])
    s = run_centralized(cfg)
    assert {"accuracy", "macro_f1", "weighted_f1", "loss", "confusion"} <= set(s)
    assert s["task"] == "classification" and s["primary"] == "accuracy" and not s["samples"]
    report = (tmp_path / "c" / "report.md").read_text()
    assert "| accuracy | macro-F1 | weighted F1 | loss |" in report
    assert "| class | precision | recall | F1 | support |" in report
    assert report.index("![training curves]") < report.index("![confusion matrix](confusion.png)")


def test_seeds_report_uses_the_generation_metrics(tiny_models: dict[str, str], dolly: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    from fedtune.federated.compare import run_seeds

    cfg = _gen_cfg(dolly, tiny_models["llama"], tmp_path, "method.name=lora", "name=seeds")
    out = run_seeds(cfg, [1, 2], regimes=("centralized",))
    report = (out / "report.md").read_text()
    assert "| method | regime | site | seeds | ROUGE-L | EM | F1 | min–max ROUGE-L |" in report
    rows = json.loads((out / "seeds.json").read_text())
    assert {r["seed"] for r in rows} == {1, 2} and all("rougeL" in r for r in rows)


def test_system_prompt_leads_every_prompt(tiny_models: dict[str, str], chat_llama: str) -> None:
    from fedtune.data import Example
    from fedtune.methods.icl import IclConfig
    from fedtune.methods.icl_generate import GenerationICL

    system = "Answer with the value only."
    for name, start in ((chat_llama, "<|im_start|>system\n" + system), (tiny_models["llama"],
                                                                        system + "\n\n###")):
        model = AdaptedModel.build(ModelConfig(name=name, system_prompt=system),
                                   method_config("lora"), ("all",), task="generation")
        (f,) = model.formulation.encode_examples([Example("Why?", "all", response="ok")])
        prompt = model.tokenizer.decode(f["input_ids"][: f["prompt_len"]])
        assert prompt.find(start) in (0, 1, 3, 4)  # first, after a BOS token at most
        icl = GenerationICL(IclConfig(shots=2, max_context=512),
                            ModelConfig(name=name, system_prompt=system),
                            ("all",))  # fmt: skip
        icl.fit([Example(f"q{i}", "all", response=f"a{i}") for i in range(3)])
        form = icl._load()
        text = form.tokenizer.decode(icl._prompt(form, icl._pool[:2], Example("Why?", "all")))
        assert text.count(system) == 1 and text.index(system) < text.index("q")


def test_a_chat_template_that_refuses_a_system_turn_names_the_fix(chat_llama: str,
                                                                  tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.data import Example

    dest = tmp_path / "no-system"
    tok = AutoTokenizer.from_pretrained(chat_llama)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                         "'System role not supported') }}{% endif %}"
                         "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok.save_pretrained(dest)
    AutoModelForCausalLM.from_pretrained(chat_llama).save_pretrained(dest)
    model = AdaptedModel.build(ModelConfig(name=str(dest), system_prompt="Be brief."),
                               method_config("lora"), ("all",), task="generation")
    with pytest.raises(ConfigError, match=r"System role not supported.*clear "
                                          r"model\.system_prompt"):
        model.formulation.encode_examples([Example("Why?", "all", response="ok")])


def test_too_few_groups_to_split_name_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"q{i}", "response": "a",
                                          "report": "one"}) for i in range(10)))  # fmt: skip
    with pytest.raises(DataError, match=r"groups \(data\.group_column\) are too few"):
        make_splits(DataConfig(task="generation", source="file", path=str(path),
                               group_column="report"))  # fmt: skip


def test_select_by_rouge_decodes_validation_and_keeps_its_best(
    tiny_models: dict[str, str], dolly: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train.select_by = "rougeL"`: validation answers are decoded at every check
    (steps centrally, rounds federated) and the step or round kept is the one with the
    highest validation ROUGE-L; the summary and the report say so."""
    from fedtune.federated.runner import run_federated
    from fedtune.regimes import run_centralized

    extra = ("method.name=lora", "method.lr=0.05", "train.select_by=rougeL")
    s = run_centralized(_gen_cfg(dolly, tiny_models["llama"], tmp_path, *extra, "name=c",
                                 "train.eval_every=2", "train.epochs=2"))  # fmt: skip
    run = Path(s["run_dir"])
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "val_rougeL" in r]  # fmt: skip
    assert len(evals) >= 3 and all("val_exact_match" in r for r in evals)
    best = max(evals, key=lambda r: (r["val_rougeL"], -r["step"]))
    assert (s["select_by"], s["best_step"]) == ("rougeL", best["step"])
    assert (s["best_val_score"], s["best_val_loss"]) == (best["val_rougeL"], best["val_loss"])
    assert "| kept: best validation ROUGE-L (step) |" in (run / "report.md").read_text()

    # Federated: the server decodes the shared validation set each round (not round 0,
    # never kept); scripted scores over the real ones, so that ROUGE-L and loss disagree.
    from fedtune.federated.apps import Workspace

    real, calls = Workspace.evaluate, []
    script = iter([(0.1, 3.0), (0.5, 2.0), (0.3, 1.0)])  # (ROUGE-L, loss) of rounds 1-3

    def scripted(self: Workspace, key: str, examples: list, generate: bool = True) -> Metrics:
        m = real(self, key, examples, generate)
        calls.append((key, generate))
        if key == "shared-val" and generate:
            rouge, loss = next(script)
            m = replace(m, loss=loss, values={**m.values, "rougeL": rouge})
        return m

    monkeypatch.setattr(Workspace, "evaluate", scripted)
    f = run_federated(_gen_cfg(dolly, tiny_models["llama"], tmp_path, *extra, "name=f",
                               "federated.rounds=3"))  # fmt: skip
    assert [c for c in calls if c[0] == "shared-val"] == [("shared-val", False)] + [
        ("shared-val", True)] * 3
    assert (f["best_round"], f["best_val_score"], f["best_val_loss"]) == (2, 0.5, 2.0)
    report = (Path(f["run_dir"]) / "report.md").read_text()
    assert "| kept: best validation ROUGE-L (round) | 0.5000 (2); its validation loss 2.0000 |" \
        in report and "the highest shared validation ROUGE-L" in report
    assert "| round | sites | train loss | val loss | val ROUGE-L |" in report

    with pytest.raises(ConfigError, match=r"select_by = 'accuracy'.*loss, rougeL, exact_match"):
        _gen_cfg(dolly, tiny_models["llama"], tmp_path, "train.select_by=accuracy")
